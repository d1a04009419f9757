"""The real game end to end through the command line: a short `fit` on configs/impala.yaml, `test`
on the held-out track (table and JSON with race columns) and `record` (GIF and trajectory plot).

Minutes in all (marked slow); the ROM comes from $KART_LIGHTNING_TEST_ROM_DIR (conftest.py)."""

import json
from collections.abc import Callable
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

pytestmark = [pytest.mark.slow, pytest.mark.needs_rom]

FIT_FRAMES = 1920
"""Twelve learner steps of configs/impala.yaml: 2 fresh unrolls each (replay ratio 7) of unroll_length 20
x frame_skip 4 frames; from the ninth step on, the buffer holds a batch's worth and 14 replayed
unrolls join them."""
FIT_STEPS = 12


@pytest.fixture(scope="module")
def run_dir(kart: Callable, rom_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/impala.yaml trained for FIT_FRAMES env frames: a real, barely trained run (with
    mirror augmentation, the config's default, named here so that the game's mirrored actions
    reach the learner's batches whatever the default: one fit serves every test here)."""
    run_dir = tmp_path_factory.mktemp("impala")
    kart("fit", "--config", "configs/impala.yaml", "--model.max_frames", str(FIT_FRAMES),
         "--model.augmentation", "mirror",
         "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(run_dir),
         "--checkpoint.dirpath", str(run_dir / "checkpoints"),
         timeout_s=600, env={"KART_LIGHTNING_CACHE": str(rom_cache)})  # fmt: skip
    return run_dir


def test_a_short_fit_stops_at_its_frame_budget_with_a_checkpoint_and_events(run_dir: Path) -> None:
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == FIT_STEPS
    assert int(checkpoint["state_dict"]["env_frames"]) == FIT_FRAMES
    # The drive actions' mirror images, from the game: left and right swapped.
    assert checkpoint["hyper_parameters"]["mirrored_actions"] == [0, 1, 3, 2, 5, 4, 6]
    assert list(run_dir.glob("lightning_logs/version_*/events.out.tfevents.*"))


def test_test_on_the_held_out_track_reports_race_results(
    kart: Callable, rom_cache: Path, run_dir: Path
) -> None:
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    result = kart("test", "--config", "configs/impala.yaml", "--ckpt_path", str(checkpoint),
                  "--data.eval_episodes", "1", "--trainer.enable_progress_bar", "false",
                  "--trainer.default_root_dir", str(run_dir), env={"KART_LIGHTNING_CACHE": str(rom_cache)})
    row = next(line for line in result.stdout.splitlines() if line.startswith("MarioCircuit.Act4 "))
    assert len(row.split()) == 11, row
    report = json.loads(checkpoint.with_suffix(".test.json").read_text())
    track = report["tracks"]["MarioCircuit.Act4"]
    assert set(track) == {
        "episodes", "return_mean", "return_min", "return_max", "length_mean",
        "checkpoints_mean", "laps_mean", "finished_sum", "race_time_s_mean", "best_lap_s_min",
    }  # fmt: skip
    # configs/impala.yaml evaluates its validation course too, first: the held-out track's episode.
    episode = next(episode for episode in report["episodes"] if episode["track"] == "MarioCircuit.Act4")
    # A barely trained kart: no lap, so no finish, race time or best lap.
    assert episode["laps"] == 0 and not episode["finished"]
    assert episode["race_time_s"] is None and episode["best_lap_s"] is None
    assert track["finished_sum"] == 0 and track["race_time_s_mean"] is None
    assert track["length_mean"] == episode["length"] > 10


def test_record_writes_a_full_resolution_gif_and_the_trajectory_over_the_map(
    kart: Callable, rom_cache: Path, run_dir: Path, tmp_path: Path
) -> None:
    gif = tmp_path / "act4.gif"
    result = kart("record", "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"),
                  "--track", "MarioCircuit.Act4", "--out", str(gif), "--max_frames", "30", "--fps", "15",
                  env={"KART_LIGHTNING_CACHE": str(rom_cache)})  # fmt: skip
    assert "MarioCircuit.Act4: return" in result.stdout
    frames = iio.imread(gif, index=None)
    assert frames.shape[1:3] == (224, 256), "the SNES screen, driver's view and minimap"
    # Identical consecutive frames are merged into one longer frame: count time, not frames.
    frame_ms = [frame.info["duration"] for frame in ImageSequence.Iterator(Image.open(gif))]
    assert len(frame_ms) == len(frames) <= 30 and sum(frame_ms) == 30 * 70, "30 frames at 15 frames/s"
    plot = iio.imread(gif.with_suffix(".png"))
    assert plot.shape[0] > 300 and plot.shape[1] > 300
    assert len(np.unique(plot[..., :3].reshape(-1, 3), axis=0)) > 100, "a map, not a blank canvas"
