"""Evaluation on held-out envs: the `test` table and JSON, evaluation during fit in its own process,
recordings, and the exported TorchScript policy. Mario Kart recordings are in test_mario_kart_eval.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image, ImageSequence

from kart_lightning.callbacks import HeldOutEvaluation
from kart_lightning.checkpointing import CheckpointFiles, policy_path
from kart_lightning.data import ImpalaDataModule, WeightPublisher
from kart_lightning.envs import EnvConfig, make_env
from kart_lightning.errors import ConfigError
from kart_lightning.evaluation import format_table, metric_names, play_episode, scalar_metrics, summarize
from kart_lightning.module import ImpalaModule
from kart_lightning.recording import RecordOptions, record_episode

REPO = Path(__file__).resolve().parents[1]
CARTPOLE = EnvConfig(id="CartPole-v1")
STEPS = 60



@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, kart) -> Path:
    """A short CartPole fit: STEPS learner steps, checkpoints and exported policies."""
    run_dir = tmp_path_factory.mktemp("cartpole")
    kart("fit", "--config", "configs/cartpole.yaml", "--model.max_frames", str(STEPS * 320),
         "--checkpoint.dirpath", str(run_dir / "checkpoints"), "--trainer.default_root_dir", str(run_dir),
         "--trainer.enable_progress_bar", "false")
    return run_dir


# test


@pytest.mark.slow
def test_test_prints_a_table_and_writes_json_beside_the_checkpoint(run_dir, kart):
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    result = kart("test", "--config", "configs/cartpole.yaml", "--ckpt_path", str(checkpoint),
                  "--data.eval_episodes", "3", "--data.eval_seed", "7", "--data.eval_greedy", "false",
                  "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false")
    header = next(line for line in result.stdout.splitlines() if line.startswith("track"))
    assert header.split()[:5] == ["track", "episodes", "return", "mean", "min"]
    assert any(line.startswith("CartPole-v1 ") for line in result.stdout.splitlines())

    report = json.loads(checkpoint.with_suffix(".test.json").read_text())
    assert report["checkpoint"] == str(checkpoint) and report["global_step"] == STEPS
    row = report["tracks"]["CartPole-v1"]
    assert row["episodes"] == 3
    assert 1 <= row["return_min"] <= row["return_mean"] <= row["return_max"] <= 500
    # CartPole pays 1 per step: the return is the length.
    assert row["length_mean"] == pytest.approx(row["return_mean"])
    assert [episode["seed"] for episode in report["episodes"]] == [7, 8, 9]
    assert "checkpoints_mean" not in row, "race columns only for races"


KART = "SuperMarioKart-Snes-v0"
RACES = [
    {"track": "MarioCircuit.Act4", "env_id": KART, "seed": 0, "return": 60.0, "length": 900,
     "checkpoints": 150, "laps": 5, "finished": True, "race_time_s": 95.5, "best_lap_s": 18.2},
    {"track": "MarioCircuit.Act4", "env_id": KART, "seed": 1, "return": 20.0, "length": 400,
     "checkpoints": 40, "laps": 1, "finished": False, "race_time_s": None, "best_lap_s": 19.0},
    {"track": "DonutPlains.Act1", "env_id": KART, "seed": 0, "return": -3.0, "length": 150,
     "checkpoints": 2, "laps": 0, "finished": False, "race_time_s": None, "best_lap_s": None},
]


def test_races_are_summed_up_as_the_game_family_says_checkpoints_laps_finishes_and_times():
    summary = summarize(RACES)
    assert summary["MarioCircuit.Act4"] == {
        "episodes": 2, "return_mean": 40.0, "return_min": 20.0, "return_max": 60.0, "length_mean": 650.0,
        "checkpoints_mean": 95.0, "laps_mean": 3.0, "finished_sum": 1.0, "race_time_s_mean": 95.5,
        "best_lap_s_min": 18.2,
    }
    assert summary["DonutPlains.Act1"]["best_lap_s_min"] is None
    table = format_table(summary).splitlines()
    assert table[0].split() == ["track", "episodes", "return", "mean", "min", "max", "steps", "checkpoints",
                                "laps", "finished", "race", "time", "s", "best", "lap", "s"]
    assert table[3].split()[-2:] == ["-", "-"]


def test_fit_refuses_an_evaluation_monitor_that_the_evaluation_never_computes():
    """fit checks evaluation.monitor against the names an evaluation can give before it starts:
    every name a summary of real races gives is among them; a track not played is refused, and so
    is a stat the game does not have."""
    evaluated = EnvConfig(id=KART, retro_state=["MarioCircuit.Act4", "DonutPlains.Act1"])
    given = scalar_metrics("val", summarize(RACES))
    assert "val/DonutPlains.Act1/checkpoints_mean" in given and set(given) <= set(metric_names("val", evaluated))
    HeldOutEvaluation(monitor="val/DonutPlains.Act1/return_mean").check_monitor(evaluated)
    with pytest.raises(ConfigError, match="plays MarioCircuit.Act4 only .* or add DonutPlains.Act1 to"):
        HeldOutEvaluation(monitor="val/DonutPlains.Act1/return_mean").check_monitor(
            EnvConfig(id=KART, retro_state="MarioCircuit.Act4"))
    with pytest.raises(ConfigError, match="val/DonutPlains.Act1/laps_mean"):
        HeldOutEvaluation(monitor="val/DonutPlains.Act1/lap_mean").check_monitor(evaluated)
    HeldOutEvaluation(monitor="val/DonutPlains.Act1/lap_mean", save_best=False).check_monitor(evaluated)


# Evaluation during fit


class StepWatch(HeldOutEvaluation):
    """Counts the learner steps taken while an evaluation was in flight."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.steps_while_evaluating = 0
        self.replies = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.worker.pending is not None:
            self.steps_while_evaluating += 1
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def handle_reply(self, trainer, reply):
        self.replies.append(reply)
        super().handle_reply(trainer, reply)


class LastSavedBeforeAnyScore(Callback):
    """Notes last.ckpt's step as the first evaluation's score is still out."""

    def __init__(self, evaluation: StepWatch, step: int) -> None:
        self.evaluation, self.step, self.seen = evaluation, step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step + 1 and not self.evaluation.replies:
            last = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
            self.seen = torch.load(last, weights_only=True)["global_step"] if last.is_file() else "missing"


@pytest.mark.slow
def test_evaluation_runs_in_its_own_process_while_training_goes_on_and_keeps_the_best_checkpoint(tmp_path):
    data = ImpalaDataModule(env=CARTPOLE, num_actors=1, unroll_length=5, batch_size=2, eval_episodes=20)
    model = ImpalaModule(obs_shape=data.obs_shape, num_actions=data.num_actions, torso="mlp", hidden_size=16)
    evaluation = StepWatch(every_n_steps=10, final_wait_s=300, monitor="val/episode_return", mode="max")
    early_last = LastSavedBeforeAnyScore(evaluation, step=10)
    folder = tmp_path / "checkpoints"
    checkpoint = ModelCheckpoint(dirpath=folder, every_n_train_steps=10, save_top_k=0, save_last=True)
    trainer = Trainer(default_root_dir=tmp_path, max_steps=300, logger=False, enable_progress_bar=False,
                      callbacks=[evaluation, early_last, checkpoint, CheckpointFiles(), WeightPublisher()])
    trainer.fit(model, datamodule=data)

    assert evaluation.replies, "no evaluation came back"
    assert {reply["pid"] for reply in evaluation.replies}.isdisjoint({os.getpid()})
    assert evaluation.steps_while_evaluating >= 20, "training waited for the evaluation"
    assert trainer.callback_metrics["val/CartPole-v1/episodes"] == 20
    assert 1 <= float(trainer.callback_metrics["val/episode_return"]) <= 500
    assert evaluation.worker.process is None, "the worker is stopped with fit"

    # best.ckpt holds the weights that earned the best score, at their step, though the score came
    # back some steps later; the other evaluated checkpoints are gone.
    scores = {reply["step"]: np.mean([episode["return"] for episode in reply["results"]]) for reply in evaluation.replies}
    best_step = max(scores, key=lambda step: (scores[step], -step))
    assert evaluation.best_score == pytest.approx(scores[best_step]) and evaluation.best_step == best_step
    kept = torch.load(folder / "best.ckpt", weights_only=True)
    assert kept["global_step"] == best_step
    assert sorted(path.name for path in folder.iterdir()) == ["best.ckpt", "best.policy.pt", "last.ckpt", "last.policy.pt"]
    policy = torch.jit.load(policy_path(folder / "best.ckpt"), _extra_files=(extra := {"kart_lightning.json": ""}))
    assert json.loads(extra["kart_lightning.json"])["learner_step"] == best_step
    for name, tensor in policy.state_dict().items():
        assert torch.equal(tensor, kept["state_dict"][f"policy.{name}"]), name
    # last.ckpt from the first interval on, without waiting for a score; and at the last step,
    # with the best score so far, for a resumed run to compare with.
    assert early_last.seen == 10
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["global_step"] == 300
    saved_best = last["callbacks"]["StepWatch"]
    assert saved_best["best_step"] in scores and saved_best["best_score"] == pytest.approx(scores[saved_best["best_step"]])
    resumed = HeldOutEvaluation(monitor="val/episode_return", mode="max")
    resumed.load_state_dict(saved_best)
    assert (resumed.best_score, resumed.best_step) == (saved_best["best_score"], saved_best["best_step"])
    if best_step != 300:
        assert not torch.equal(last["state_dict"]["policy.torso.0.weight"], kept["state_dict"]["policy.torso.0.weight"])


# Recording


def test_a_sampled_episode_depends_on_its_seed_alone_and_leaves_the_callers_generator_alone():
    torch.manual_seed(0)
    policy = ImpalaModule(obs_shape=[4], num_actions=2, torso="mlp", hidden_size=16).policy
    env = make_env(CARTPOLE, seed=0)
    try:
        first = play_episode(policy, env, seed=5, greedy=False)
        torch.rand(1000)  # whatever ran before must not matter
        before = torch.get_rng_state()
        again = play_episode(policy, env, seed=5, greedy=False)
        assert torch.equal(torch.get_rng_state(), before)
        others = [play_episode(policy, env, seed=seed, greedy=False)["length"] for seed in range(6, 12)]
    finally:
        env.close()
    assert again == first
    assert len({first["length"], *others}) > 1, "different seeds sample different episodes"


def test_record_writes_a_full_resolution_gif_of_an_atari_episode(tmp_path):
    torch.manual_seed(0)
    pong = EnvConfig(id="ALE/Pong-v5")
    model = ImpalaModule(obs_shape=[4, 84, 84], num_actions=6, torso="shallow", hidden_size=32)
    gif = tmp_path / "pong.gif"
    result = record_episode(model.policy, pong, gif, RecordOptions(fps=15, max_frames=40, seed=3))
    frames = iio.imread(gif, index=None)
    assert frames.shape[1:3] == (210, 160), "the Atari screen's full resolution"
    # Identical consecutive frames are merged into one longer frame: count time, not frames.
    frame_ms = [frame.info["duration"] for frame in ImageSequence.Iterator(Image.open(gif))]
    assert len(frame_ms) == len(frames) <= 40 and sum(frame_ms) == 40 * 70, "40 frames at 15 frames/s"
    assert len(np.unique(frames[-1].reshape(-1, frames.shape[-1]), axis=0)) > 2
    assert result["length"] > 40 and result["return"] <= 0
    assert "png" not in result, "no map outside races"


# Export


EXPORT_CHECK = r"""
import json, sys, torch
extra = {"kart_lightning.json": ""}
policy = torch.jit.load(sys.argv[1], _extra_files=extra)
inputs = torch.load(sys.argv[2])
state = policy.initial_state(inputs["obs"].shape[0])
action, logits, value, state = policy.act(inputs["obs"], inputs["prev_action"], inputs["reward"], inputs["done"], state, True)
assert "kart_lightning" not in sys.modules
torch.save({"action": action, "logits": logits, "metadata": json.loads(extra["kart_lightning.json"])}, sys.argv[3])
"""


@pytest.mark.slow
def test_exported_policy_runs_in_a_fresh_interpreter_without_the_project_and_acts_like_the_module(run_dir, tmp_path):
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    exported = policy_path(checkpoint)
    assert exported.name == "last.policy.pt" and exported.is_file()
    generator = torch.Generator().manual_seed(0)
    inputs = {"obs": torch.randn(64, 4, generator=generator), "prev_action": torch.randint(0, 2, (64,), generator=generator),
              "reward": torch.ones(64), "done": torch.zeros(64, dtype=torch.bool)}
    torch.save(inputs, tmp_path / "inputs.pt")
    # A fresh interpreter started outside the repository, so kart_lightning cannot be imported by accident.
    subprocess.run([sys.executable, "-c", EXPORT_CHECK, str(exported), str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                   cwd=tmp_path, check=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    out = torch.load(tmp_path / "out.pt")

    module = ImpalaModule.load_from_checkpoint(checkpoint, map_location="cpu")
    with torch.no_grad():
        action, logits, _, _ = module.policy.act(inputs["obs"], inputs["prev_action"], inputs["reward"], inputs["done"],
                                                 module.policy.initial_state(64), True)
    assert torch.equal(out["action"], action)
    torch.testing.assert_close(out["logits"], logits)
    assert out["metadata"]["obs_shape"] == [4] and out["metadata"]["num_actions"] == 2
    assert out["metadata"]["learner_step"] == STEPS and out["metadata"]["env"]["id"] == "CartPole-v1"


@pytest.mark.slow
def test_recorder_writes_a_gif_under_the_run_folder_and_logs_it_to_tensorboard(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kart_lightning.callbacks import EpisodeRecorder

    airstriker = EnvConfig(id="Airstriker-Genesis-v0")
    data = ImpalaDataModule(env=airstriker, num_actors=1, unroll_length=5, batch_size=1)
    model = ImpalaModule(obs_shape=data.obs_shape, num_actions=data.num_actions, torso="shallow", hidden_size=32)
    recorder = EpisodeRecorder(every_n_steps=2, max_frames=20, final_wait_s=300)
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = Trainer(default_root_dir=tmp_path, max_steps=4, logger=logger, enable_checkpointing=False,
                      enable_progress_bar=False, callbacks=[recorder, WeightPublisher()])
    trainer.fit(model, datamodule=data)

    # Step 2, and step 4: the last step records the final weights, and fit waits for it.
    gifs = sorted(Path(logger.log_dir, "recordings").glob("*.gif"))
    assert [gif.name for gif in gifs] == ["step_2-Airstriker-Genesis-v0.gif", "step_4-Airstriker-Genesis-v0.gif"]
    assert iio.imread(gifs[0], index=None).shape[:3] == (20, 224, 320), "Genesis screens at full resolution"
    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert [image.step for image in events.Images("record/gif")] == [2, 4]


@pytest.mark.slow
def test_no_worker_outlives_a_learner_killed_in_the_middle_of_an_evaluation(tmp_path):
    import signal
    import time

    import psutil

    # 3 spawned children: 2 actors and the evaluation worker, busy with 20,000 episodes (minutes) from step 1.
    process = subprocess.Popen(
        [sys.executable, "-m", "kart_lightning", "fit", "--config", "configs/cartpole.yaml",
         "--evaluation.every_n_steps", "1", "--evaluation.episodes", "20000",
         "--checkpoint.dirpath", str(tmp_path / "checkpoints"), "--trainer.default_root_dir", str(tmp_path),
         "--trainer.enable_progress_bar", "false"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    parent = psutil.Process(process.pid)
    deadline = time.monotonic() + 120
    children = []
    while len(children) < 3 and time.monotonic() < deadline:
        time.sleep(0.5)
        children = [child for child in parent.children(recursive=True) if "spawn_main" in " ".join(child.cmdline())]
    assert len(children) == 3, "the actors and the evaluation worker never started"
    time.sleep(2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    _gone, alive = psutil.wait_procs(children, timeout=15)
    assert alive == [], f"orphans: {alive}"
