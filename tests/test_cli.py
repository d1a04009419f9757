"""The command line end to end, in subprocesses: fit, resume, test, bad input, Ctrl-C."""

import gzip
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

REPO = Path(__file__).resolve().parents[1]
# Every test here runs the command line in a subprocess (seconds each) or trains.
pytestmark = pytest.mark.slow
# T=20, B=16 from configs/cartpole.yaml: 320 env frames per learner step.
FRAMES_PER_STEP = 320



def cartpole_args(run_dir: Path, max_frames: int) -> list:
    return [
        "--config", "configs/cartpole.yaml",
        "--model.max_frames", str(max_frames),
        "--checkpoint.dirpath", str(run_dir / "checkpoints"),
        "--trainer.default_root_dir", str(run_dir),
        "--trainer.val_check_interval", "100000",
        "--trainer.enable_progress_bar", "false",
    ]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, kart) -> Path:
    """A CartPole run of 200 learner steps, stopped by its frame budget between two checkpoint
    intervals (every 7 steps: the last periodic save is at 196)."""
    run_dir = tmp_path_factory.mktemp("cartpole")
    kart("fit", *cartpole_args(run_dir, 200 * FRAMES_PER_STEP), "--checkpoint.every_n_train_steps", "7")
    return run_dir


def test_fit_stops_at_its_frame_budget_with_a_checkpoint_and_tensorboard_events(trained):
    checkpoint = load(trained / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == 200
    assert int(checkpoint["state_dict"]["env_frames"]) == 200 * FRAMES_PER_STEP
    # Nothing else: no top-k copy of last.ckpt, no evaluated checkpoint (no evaluation in 200 steps).
    assert sorted(path.name for path in (trained / "checkpoints").iterdir()) == ["last.ckpt", "last.policy.pt"]
    assert list(trained.glob("lightning_logs/version_*/events.out.tfevents.*"))


def test_fit_ends_after_the_first_step_at_which_the_monitored_metric_reaches_the_threshold(tmp_path, kart):
    result = kart("fit", *cartpole_args(tmp_path, 200 * FRAMES_PER_STEP),
                  "--stop.monitor", "train/episode_return", "--stop.threshold", "30",
                  "--trainer.log_every_n_steps", "1")  # fmt: skip
    said = re.search(r"train/episode_return is ([\d.]+) at step (\d+), past stop.threshold 30: fit ends here.",
                     result.stdout + result.stderr)  # fmt: skip
    assert said, result.stderr[-2000:]
    value, step = float(said[1]), int(said[2])
    assert value >= 30
    checkpoint = load(tmp_path / "checkpoints" / "last.ckpt")
    assert checkpoint["global_step"] == step < 200
    # Lightning logs a step's metrics at the step before its count (every step here); those before it were below.
    (events,) = tmp_path.glob("lightning_logs/version_*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    logged = {scalar.step: scalar.value for scalar in accumulator.Scalars("train/episode_return")}
    assert logged[step - 1] == pytest.approx(value, rel=1e-4)
    assert all(mean < 30 for at, mean in logged.items() if at < step - 1)


def test_resume_continues_steps_frames_optimizer_and_lr_schedule(trained, tmp_path, kart):
    run_dir = tmp_path / "resumed"
    run_dir.mkdir()
    (run_dir / "checkpoints").symlink_to(trained / "checkpoints", target_is_directory=True)
    before = load(trained / "checkpoints" / "last.ckpt")
    kart("fit", *cartpole_args(run_dir, 300 * FRAMES_PER_STEP), "--checkpoint.every_n_train_steps", "7",
         "--ckpt_path", "last")
    after = load(trained / "checkpoints" / "last.ckpt")
    # The config's budget, not the checkpoint's (see test_checkpointing for why this can break).
    assert after["hyper_parameters"]["max_frames"] == 300 * FRAMES_PER_STEP
    assert after["global_step"] == 300
    assert int(after["state_dict"]["env_frames"]) == 300 * FRAMES_PER_STEP
    assert after["lr_schedulers"][0]["last_epoch"] == before["lr_schedulers"][0]["last_epoch"] + 100
    adam_steps = [state["step"] for state in after["optimizer_states"][0]["state"].values()]
    assert all(int(step) == 300 for step in adam_steps)
    # The lr decays linearly over the (new) budget of 300 steps' frames from where it stopped.
    logged = learning_rates(run_dir)
    assert min(logged) > 200
    for step, lr in logged.items():
        assert lr == pytest.approx(0.003 * (1 - step / 300), abs=1e-6)


def test_with_lr_decay_time_the_lr_falls_with_the_time_spent_to_near_zero_at_max_time(tmp_path, kart):
    # A frame budget far beyond what 15 s give: the time budget decides the schedule.
    kart("fit", *cartpole_args(tmp_path, 10**9), "--trainer.max_time", "00:00:00:15",
         "--model.lr_decay_time", "true", "--trainer.log_every_n_steps", "1")
    assert int(load(tmp_path / "checkpoints" / "last.ckpt")["state_dict"]["env_frames"]) < 10**9 / 100
    (events,) = tmp_path.glob("lightning_logs/version_*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    logged = sorted((scalar.step, scalar.wall_time, scalar.value) for scalar in accumulator.Scalars("learning_rate"))
    assert len(logged) > 10
    rates = [rate for _, _, rate in logged]
    assert all(later <= earlier for earlier, later in itertools.pairwise(rates))
    # Linear in the time spent: from the first step logged, the lr has lost 1/15 of 0.003 per
    # second (give or take the step between the clock read and the rate it sets).
    _, start, first = logged[0]
    for _, wall_time, rate in logged[1:]:
        assert (first - rate) / 0.003 == pytest.approx((wall_time - start) / 15, abs=0.1)
    assert rates[-1] < 0.003 * 0.1


def learning_rates(run_dir: Path) -> dict:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = run_dir.glob("lightning_logs/version_*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return {scalar.step: scalar.value for scalar in accumulator.Scalars("learning_rate")}


def test_a_run_over_several_states_logs_episode_statistics_per_state(tmp_path, kart):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from kart_lightning.envs import EnvConfig, make_env

    env = make_env(EnvConfig(id="Airstriker-Genesis-v0", noop_max=0))
    try:
        env.reset(seed=0)
        for _ in range(100):
            env.step(1)
        later = tmp_path / "later.state"
        with gzip.open(later, "wb") as file:
            file.write(env.unwrapped.em.get_state())
    finally:
        env.close()
    # Airstriker with a 25-step time limit: every episode is 25 agent steps, on either state.
    kart("fit", "--config", "configs/quickstart.yaml", "--data.env.retro_state", f"[Level1, {later}]",
         "--data.env.max_episode_steps", "25", "--model.max_frames", str(8 * 2560),
         "--checkpoint.dirpath", str(tmp_path / "checkpoints"), "--trainer.default_root_dir", str(tmp_path),
         "--trainer.enable_progress_bar", "false", "--trainer.log_every_n_steps", "1")
    (events,) = tmp_path.glob("lightning_logs/version_*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    last = {tag: accumulator.Scalars(tag)[-1].value for tag in accumulator.Tags()["scalars"]}
    for state in ("Level1", "later"):
        assert last[f"train/{state}/episode_length"] == 25
        # Episodes of equal length; each env's count per state differs by at most one.
        assert last[f"train/{state}/frame_share"] == pytest.approx(0.5, abs=0.05)
        assert f"train/{state}/episode_return" in last
    assert last["train/episode_length"] == 25 and "train/episode_state" not in last


def test_test_subcommand_plays_held_out_episodes_from_a_checkpoint(trained, kart):
    result = kart("test", "--config", "configs/cartpole.yaml",
                  "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"),
                  "--trainer.default_root_dir", str(trained), "--data.eval_episodes", "3")
    assert "test/episode_return" in result.stdout


@pytest.fixture(scope="module")
def quick(kart_servers):
    """The command line for runs of a second or two (config printing, refusals), forked from a
    process that imported it once (tests/cli_server.py) instead of paying ~3 s of imports each.
    Not for what imports print: that stays in the server's output."""
    server = kart_servers()

    def run(*args: str) -> subprocess.CompletedProcess:
        return server(*args, timeout_s=120)

    return run


def test_an_incompatible_checkpoint_is_refused_in_one_sentence(trained, quick):
    result = quick("test", "--config", "configs/cartpole.yaml", "--model.hidden_size", "32",
                   "--ckpt_path", str(trained / "checkpoints" / "last.ckpt"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "use the config it was trained with" in result.stderr.strip().splitlines()[-1]


def test_print_config_round_trips(tmp_path, quick):
    printed = quick("fit", "--config", "configs/cartpole.yaml", "--print_config").stdout
    (tmp_path / "printed.yaml").write_text(printed)
    again = quick("fit", "--config", str(tmp_path / "printed.yaml"), "--print_config").stdout
    assert again == printed
    assert "CartPole-v1" in printed and "max_frames: 600000" in printed


def actor_children(process: psutil.Process) -> list:
    children = []
    for child in process.children(recursive=True):
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                children.append(child)
        except psutil.NoSuchProcess:
            pass
    return children


@pytest.mark.parametrize("stop", ["ctrl_c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_fit_saves_last_and_leaves_no_actor_process(stop, tmp_path):
    process = subprocess.Popen(
        [sys.executable, "-m", "kart_lightning", "fit", *cartpole_args(tmp_path, 10**9),
         "--checkpoint.every_n_train_steps", str(10**9)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        # As from a terminal: a test run started in the background (`cmd &` in a script) passes on
        # an ignored SIGINT, and Python then never raises KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509 - no threads at fork
    )
    parent = psutil.Process(process.pid)
    deadline = time.monotonic() + 120
    while len(actor_children(parent)) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    actors = actor_children(parent)
    assert len(actors) == 2, "the actors never started"
    time.sleep(15)  # let training run
    if stop == "ctrl_c":
        os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole group
    else:
        process.send_signal(signal.SIGTERM)  # what `kill`, a scheduler or torchrun does: the trainer
    process.wait(timeout=60)
    _gone, alive = psutil.wait_procs(actors, timeout=10)
    assert alive == []
    stderr = process.stderr.read()
    # The steps taken are kept, though no checkpoint interval was reached.
    last = load(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] > 0 and (tmp_path / "checkpoints" / "last.policy.pt").is_file()
    frames_past_last_step = int(last["state_dict"]["env_frames"]) - last["global_step"] * FRAMES_PER_STEP
    if stop == "ctrl_c":
        assert "KeyboardInterrupt" in stderr
        # Ctrl-C may land inside a learner step, after its frames were counted.
        assert 0 <= frames_past_last_step <= FRAMES_PER_STEP
    else:
        # Lightning ends fit between two steps; one sentence says so, no notice or traceback.
        assert frames_past_last_step == 0
        assert process.returncode == 0, stderr
        assert stderr.strip().splitlines()[-1] == (
            f"kart_lightning: SIGTERM: fit stopped after step {last['global_step']} and saved last.ckpt "
            "(resume with --ckpt_path last)."
        ), stderr
        assert "Received SIGTERM" not in stderr and "Traceback" not in stderr


def test_fit_with_no_config_runs_the_quickstart_settings(quick):
    default = quick("fit", "--print_config")
    quickstart = quick("fit", "--config", "configs/quickstart.yaml", "--print_config")
    assert default.returncode == quickstart.returncode == 0, default.stderr[-2000:] + quickstart.stderr[-2000:]
    assert default.stdout == quickstart.stdout


LIBRARY_NOISE = re.compile(r"(?i)warning|deprecat|tip:|args parameter|A\.L\.E:|Powered by Stella|\.py:\d+: ")
"""What a library notice looks like (Lightning prints its warnings as `FILE.py:LINE: message`):
none of our own sentences does."""


@pytest.mark.parametrize("config, precision", [
    ("configs/cartpole.yaml", "32-true"), ("configs/atari.yaml", "32-true"), ("configs/atari.yaml", "bf16-mixed"),
])
def test_help_and_a_short_fit_print_no_library_warnings_or_notices(config, precision, tmp_path, kart):
    help_text = kart("fit", "--config", config, "--help")
    assert LIBRARY_NOISE.findall(help_text.stderr) == []
    run = kart("fit", "--config", config, "--trainer.precision", precision,
               "--model.max_frames", "2560", "--data.batch_size", "2",
               "--data.envs_per_actor", "1", "--checkpoint.dirpath", str(tmp_path / "checkpoints"),
               "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
               "--trainer.max_time", "00:00:30:00")  # a Timer in the checkpoint, which `test` has not
    assert LIBRARY_NOISE.findall(run.stderr) == [], run.stderr
    # The model summary lists what the run has: the policy, no metric of another game.
    summary_rows = [line for line in run.stdout.splitlines() + run.stderr.splitlines() if line.startswith("0 |")]
    assert len(summary_rows) == 1 and "policy" in summary_rows[0]
    # `test` of that checkpoint, saved elsewhere than the config's checkpoint.dirpath.
    tested = kart("test", "--config", config, "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt"),
                  "--data.eval_episodes", "1", "--data.env.max_episode_steps", "200",
                  "--trainer.default_root_dir", str(tmp_path))
    assert LIBRARY_NOISE.findall(tested.stderr) == [], tested.stderr


def test_a_checkpoint_of_an_earlier_version_is_tested_and_resumed(tmp_path, kart):
    """tests/data holds a CartPole checkpoint of 100 learner steps written by commit 21fcd2a (its
    env settings under `mario_kart`-era keys, its callbacks' states under other names)."""
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(gzip.decompress((REPO / "tests" / "data" / "cartpole-21fcd2a.ckpt.gz").read_bytes()))
    tested = kart("test", "--config", "configs/cartpole.yaml", "--ckpt_path", str(checkpoint),
                  "--trainer.default_root_dir", str(tmp_path), "--data.eval_episodes", "2")
    assert "CartPole-v1" in tested.stdout and "Traceback" not in tested.stderr
    kart("fit", *cartpole_args(tmp_path, 110 * FRAMES_PER_STEP), "--ckpt_path", str(checkpoint))
    resumed = load(checkpoint)
    assert resumed["global_step"] == 110
    assert int(resumed["state_dict"]["env_frames"]) == 110 * FRAMES_PER_STEP
