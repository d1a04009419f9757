"""IMPALA learns: CartPole-v1 through the real command line, actors and all (minutes: marked slow)."""

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from kart_lightning.checkpointing import read_checkpoint

STOP_AT_400 = ["--stop.monitor", "train/episode_return", "--stop.threshold", "400"]


def reached_400(result: subprocess.CompletedProcess, run_dir: Path) -> int:
    """The env frames of the run when its mean return reached 400 and ended it (fails if it never did)."""
    assert "past stop.threshold 400: fit ends here." in result.stdout + result.stderr, "the mean return never reached 400"
    checkpoint = read_checkpoint(run_dir / "checkpoints" / "last.ckpt", mmap=True)
    return int(checkpoint["state_dict"]["env_frames"])


@pytest.mark.slow
# Learner inference (the slowest on CartPole: every env step is a round trip to the learner) runs
# with replay on, so one run covers both. Replaying each unroll once more learns faster per frame
# (400 at 152k frames, against 314k without: README "Measured"), so that run gets half the budget
# and half the minutes.
@pytest.mark.parametrize(("inference", "replay_ratio", "budget"), [("actor", 0, 600_000), ("learner", 1, 300_000)])
def test_cartpole_reaches_a_mean_return_of_400_within_its_frame_budget(
    kart: Callable, tmp_path, inference, replay_ratio, budget
):
    # configs/cartpole.yaml: seed 0, budget 600k env frames (a minute or two on 2 cores). With
    # replay, half of each batch is replayed and the budget counts fresh frames only. The run ends
    # at the first step whose mean return of the last 100 training episodes (sampled actions, not
    # greedy) reaches 400, or at its budget.
    result = kart("fit", "--config", "configs/cartpole.yaml", "--data.inference", inference,
                  "--data.replay.ratio", str(replay_ratio), "--model.max_frames", str(budget), *STOP_AT_400,
                  "--checkpoint.dirpath", str(tmp_path / "checkpoints"), "--trainer.default_root_dir", str(tmp_path),
                  "--trainer.enable_progress_bar", "false", timeout_s=900)  # fmt: skip
    frames = reached_400(result, tmp_path)
    assert frames <= budget
    if replay_ratio:
        (events,) = tmp_path.glob("lightning_logs/version_*")
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        ratios = [scalar.value for scalar in accumulator.Scalars("train/replay_ratio_effective")]
        assert ratios[-1] == replay_ratio


@pytest.mark.slow
def test_cartpole_reaches_400_within_1m_frames_with_two_ranks(kart: Callable, tmp_path):
    # Two DDP ranks (gloo) of one actor with 4 envs each: the 8 envs of one rank of cartpole.yaml,
    # so only the ranks differ. A step trains on 2 x 16 unrolls at the sqrt-scaled lr, and the
    # counter is the job's. Two ranks take half the learner steps per frame and vary more from run
    # to run than one (README "Measured": 400 at 198k-480k frames in 8 runs, 192k-355k with one
    # rank; one run missed 600k), so they get 1M frames, which every measured run met with room.
    result = kart("fit", "--config", "configs/cartpole.yaml", "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
                  "--trainer.devices", "2", "--data.num_actors", "1", "--model.max_frames", "1000000", *STOP_AT_400,
                  "--checkpoint.dirpath", str(tmp_path / "checkpoints"), "--trainer.default_root_dir", str(tmp_path),
                  "--trainer.enable_progress_bar", "false", timeout_s=900)  # fmt: skip
    assert reached_400(result, tmp_path) <= 1_000_000
