"""Several ranks through Lightning's DDP on CPU (gloo): the real command line, real rank processes
(Lightning's launcher, and torchrun as two "nodes" on this host), each with its own actor pool.
Each rank writes what it did through tests/helpers/rank_report.py (minutes: marked slow)."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from kart_lightning.checkpointing import read_checkpoint

REPO = Path(__file__).resolve().parents[1]
FRAMES_PER_RANK_STEP = 20 * 16  # cartpole.yaml: T=20, B=16, one env frame per agent step
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "helpers"), os.environ.get("PYTHONPATH", "")])}
LOSS_BOUND_S = 60

pytestmark = pytest.mark.slow


def fit_args(tmp_path: Path, max_frames: int, *extra: str) -> list[str]:
    reports = tmp_path / "report.yaml"
    reports.write_text(
        f"trainer:\n  callbacks:\n    - class_path: rank_report.RankReport\n      init_args:\n"
        f"        folder: {tmp_path / 'ranks'}\n"
    )
    return [
        "fit", "--config", "configs/cartpole.yaml", "--config", str(reports),
        "--trainer.accelerator", "cpu", "--model.max_frames", str(max_frames),
        "--data.num_actors", "1", "--data.envs_per_actor", "2", "--evaluation.every_n_steps", "null",
        "--trainer.enable_progress_bar", "false", "--checkpoint.dirpath", str(tmp_path / "checkpoints"),
        "--trainer.default_root_dir", str(tmp_path), *extra,
    ]  # fmt: skip


def kart(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "kart_lightning", *args], cwd=REPO, env=ENV,
                            capture_output=True, text=True, timeout=timeout_s, check=False)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-3000:]}"
    return result


def reports(tmp_path: Path, ranks: int, suffix: str = "") -> list[dict]:
    found = [json.loads((tmp_path / "ranks" / f"rank-{rank}{suffix}.json").read_text()) for rank in range(ranks)]
    for path in (tmp_path / "ranks").glob("*.json"):
        path.unlink()  # the next run writes its own
    return found


def test_two_ranks_count_every_frame_stop_together_agree_and_resume_on_two_or_one(tmp_path):
    result = kart(*fit_args(tmp_path, 12_800, "--trainer.strategy", "ddp", "--trainer.devices", "2"))
    first = reports(tmp_path, 2)
    steps = {report["global_step"] for report in first}
    assert len(steps) == 1, f"the ranks stopped at different steps: {steps}"
    (step,) = steps
    # The job's counter is the sum of the fresh frames both ranks trained on, and the budget
    # (12,800 = 20 steps of 2 x 320) ends the run on it.
    assert all(report["env_frames"] == sum(r["own_frames"] for r in first) for report in first)
    assert all(report["own_frames"] == step * FRAMES_PER_RANK_STEP for report in first)
    assert step == 20
    assert first[0]["weights"] == first[1]["weights"], "the ranks' weights differ after the run"
    # Each rank's actors are seeded apart: their first batches differ.
    assert first[0]["first_observations"] != first[1]["first_observations"]
    assert first[0]["lr"] == pytest.approx(0.003 * 2**0.5)  # cartpole.yaml's lr, sqrt-scaled for 2 ranks
    saved = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == step and int(saved["state_dict"]["env_frames"]) == 12_800
    assert sorted(path.name for path in (tmp_path / "checkpoints").iterdir()) == ["last.ckpt", "last.policy.pt"]
    (run,) = (tmp_path / "lightning_logs").iterdir()
    assert len(list(run.glob("events.out.tfevents.*"))) == 1
    # Rank 0 alone says what the ranks are; each rank's actors are seeded apart.
    assert (result.stdout + result.stderr).count("2 ranks, each with its own actor pool: 2 x 1 actors seeded apart") == 1

    # Resumed on two ranks: both start from last.ckpt's step and counter.
    kart(*fit_args(tmp_path, 19_200, "--trainer.strategy", "ddp", "--trainer.devices", "2", "--ckpt_path", "last"))
    second = reports(tmp_path, 2)
    assert [r["start"] for r in second] == [{"step": 20, "env_frames": 12_800}] * 2
    assert {r["global_step"] for r in second} == {30} and second[0]["weights"] == second[1]["weights"]

    # ... and on one: the counters are the job's, so the budget still holds.
    kart(*fit_args(tmp_path, 22_400, "--ckpt_path", "last"))
    (third,) = reports(tmp_path, 1)
    assert third["start"] == {"step": 30, "env_frames": 19_200}
    assert third["global_step"] == 40 and third["env_frames"] == 22_400
    assert third["lr"] == pytest.approx(0.003), "one rank trains at the config's lr, not the 2-rank one saved"


def test_with_lr_decay_time_two_ranks_follow_rank_0s_clock_to_the_same_rate_and_weights(tmp_path):
    # A frame budget far beyond what 15 s give: the time budget decides the schedule, and each
    # rank's own clock would give it another rate, and the ranks other weights.
    kart(*fit_args(tmp_path, 10**9, "--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.max_time",
                   "00:00:00:15", "--model.lr_decay", "true", "--model.lr_decay_time", "true"))
    first, second = reports(tmp_path, 2)
    assert first["global_step"] == second["global_step"] > 10
    assert first["lr_now"] == second["lr_now"] < 0.1 * first["lr"]
    assert first["weights"] == second["weights"], "the ranks' weights differ after the run"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_nodes_through_torchrun_agree_on_the_step_count(tmp_path, jobs):
    port = free_port()
    nodes = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
             "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
             "-m", "kart_lightning", *fit_args(tmp_path, 12_800, "--trainer.strategy", "ddp",
                                               "--trainer.num_nodes", "2", "--trainer.devices", "1")],
            cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )
        for node in (0, 1)
    ]
    jobs.extend(nodes)
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    ranks = reports(tmp_path, 2)
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 20
    assert ranks[0]["env_frames"] == 12_800 and ranks[0]["weights"] == ranks[1]["weights"]


@pytest.fixture
def jobs() -> Iterator[list[subprocess.Popen]]:
    """Jobs started in sessions of their own: whatever of them a failed test leaves is killed."""
    started: list[subprocess.Popen] = []
    yield started
    for job in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(job.pid, signal.SIGKILL)


def start_two_ranks(tmp_path: Path, jobs: list, *extra: str) -> tuple[subprocess.Popen, list[dict]]:
    """A 2-rank fit with no end in sight, once both ranks train (their started reports)."""
    job = subprocess.Popen(
        [sys.executable, "-m", "kart_lightning", *fit_args(tmp_path, 10**9, "--trainer.strategy", "ddp",
                                                          "--trainer.devices", "2", *extra)],
        cwd=REPO, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
        # As from a terminal: a test run started in the background passes on an ignored SIGINT.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509 - no threads at fork
    )  # fmt: skip
    jobs.append(job)
    deadline = time.monotonic() + 180
    started = [tmp_path / "ranks" / f"rank-{rank}-started.json" for rank in (0, 1)]
    while not all(path.exists() for path in started):
        assert job.poll() is None and time.monotonic() < deadline, job.stderr.read()[-3000:]
        time.sleep(0.5)
    time.sleep(2)  # some learner steps
    return job, [json.loads(path.read_text()) for path in started]


def ended(job: subprocess.Popen, processes: list[psutil.Process]) -> str:
    """The job's stderr, read to its end: it closes when the last process holding it (any rank,
    actor or worker) is gone. Past twice the bound, whatever is left is killed and the test fails."""
    try:
        return job.communicate(timeout=2 * LOSS_BOUND_S)[1]
    except subprocess.TimeoutExpired:
        for process in processes:
            process.kill()
        raise AssertionError(f"the job did not end in {2 * LOSS_BOUND_S} s") from None


def tree(pid: int) -> list[psutil.Process]:
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def still_running(processes: list[psutil.Process]) -> list[str]:
    _gone, alive = psutil.wait_procs(processes, timeout=10)
    return [f"{p.pid} {' '.join(p.cmdline())[:80]}" for p in alive if p.status() != psutil.STATUS_ZOMBIE]


@pytest.mark.parametrize("killed", [1, 0])
def test_a_rank_killed_ends_the_job_in_bounded_time_naming_it_with_no_process_left(tmp_path, jobs, killed):
    job, started = start_two_ranks(tmp_path, jobs)
    processes = tree(job.pid)
    assert len(processes) >= 4  # 2 ranks, an actor each, and the resource trackers
    os.kill(started[killed]["pid"], signal.SIGKILL)
    killed_at = time.monotonic()
    stderr = ended(job, processes)
    took = time.monotonic() - killed_at
    assert took < LOSS_BOUND_S, f"the job took {took:.0f} s to end"
    survivor = 1 - killed
    assert f"kart_lightning: error: rank {survivor}: rank {killed} " in stderr, stderr[-3000:]
    assert "the whole job stops" in stderr and "Traceback" not in stderr
    assert job.returncode != 0
    assert still_running(processes) == []


def actors_of(pid: int) -> list[psutil.Process]:
    """The live actor processes of the rank whose learner is `pid`."""
    actors = []
    for child in psutil.Process(pid).children():
        try:
            command = " ".join(child.cmdline())
        except psutil.Error:  # gone, or a zombie not yet reaped
            continue
        if "spawn_main" in command and "resource_tracker" not in command:
            actors.append(child)
    return actors


def test_a_rank_whose_actors_all_die_ends_the_job_naming_it(tmp_path, jobs):
    # One failure in a row is enough: the actor killed twice, the second time before its first unroll.
    job, started = start_two_ranks(tmp_path, jobs, "--data.max_actor_failures", "1")
    processes = tree(job.pid)
    rank1 = started[1]["pid"]
    first = actors_of(rank1)
    assert len(first) == 1
    first[0].kill()
    deadline = time.monotonic() + 30
    while True:  # its restart, killed as soon as it appears
        restarted = [actor for actor in actors_of(rank1) if actor.pid != first[0].pid]
        if restarted:
            restarted[0].kill()
            break
        assert time.monotonic() < deadline, "the killed actor was never restarted"
        time.sleep(0.02)
    killed_at = time.monotonic()
    stderr = ended(job, processes)
    assert time.monotonic() - killed_at < LOSS_BOUND_S
    assert "kart_lightning: error: rank 1: actor 0 died 1 time in a row" in stderr, stderr[-3000:]
    assert "kart_lightning: error: rank 0: rank 1 failed: actor 0 died 1 time in a row before finishing an unroll " \
           "(exit code -9); the whole job stops" in stderr
    assert job.returncode != 0
    assert still_running(processes) == []


def test_ctrl_c_stops_every_rank_after_the_same_step_and_saves_last(tmp_path, jobs):
    job, _started = start_two_ranks(tmp_path, jobs)
    processes = tree(job.pid)
    os.killpg(job.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: every rank, actor and worker
    stderr = ended(job, processes)
    assert job.returncode == 0, stderr[-3000:]
    assert "Ctrl-C: every rank stops after this step and saves last.ckpt" in stderr
    assert "Traceback" not in stderr
    ranks = reports(tmp_path, 2)
    assert ranks[0]["global_step"] == ranks[1]["global_step"] > 0
    saved = read_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
    assert saved["global_step"] == ranks[0]["global_step"]
    assert int(saved["state_dict"]["env_frames"]) == ranks[0]["env_frames"] == 2 * ranks[0]["own_frames"]
    assert still_running(processes) == []
