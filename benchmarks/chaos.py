"""Fault injection on real runs: kill actors and break envs during fit, kill the trainer and resume
it, fill the disk while it saves. Not a test: it takes about 45 minutes and reports what survived.

    python benchmarks/chaos.py --parts actors,trainer,disk --out chaos.json

- actors: `fit` on Airstriker (configs/quickstart.yaml) for `--before_minutes` undisturbed, then
  `--minutes` during which a random actor process is SIGKILLed every `--kill_every_s` seconds
  and a random env raises in `step` every `--raise_every_s` seconds, then a minute without. Reports actor restarts, env
  rebuilds, env frames/s and learner steps/s before and during, the process tree's memory and the
  training return over time, from the run's TensorBoard events.
- trainer: `fit` on CartPole (configs/cartpole.yaml), SIGKILLed `--trainer_kills` times at random
  moments (every third one while a checkpoint file is being written) and resumed each time with
  `--ckpt_path last`. After each kill: the orphans (processes of the killed trainer still alive),
  last.ckpt's learner step, env-frame counter, optimizer step count, lr-scheduler step and lr, and
  whether they agree with each other; the steps lost (trained but not in last.ckpt) against the
  checkpoint interval; and the step the next run starts from.
- ranks: `fit` on CartPole with 2 DDP ranks (gloo, CPU), `--rank_faults` times, each ended by a
  fault in turn: rank 1 SIGKILLed, rank 0 SIGKILLed, or every actor of rank 1 killed until it gives
  up; each next run resumes the last with `--ckpt_path last`. Reports how long the job took to end
  after the fault (until the last of its processes was gone), its exit code, the sentences it
  printed and whether they named the lost rank, tracebacks, orphans, and the step each resume
  started from against last.ckpt's.
- disk: `fit` on CartPole saving into a small tmpfs (needs root to mount it), filled up once a
  checkpoint is there: the run must stop with one sentence, leave last.ckpt whole, and resume
  from it once there is space again.

The runs go through this file (`chaos.py fit ARGS` is `python -m kart_lightning fit ARGS` plus the
instruments below): spawned actors import it as their main module, so they find the `Chaos/` env
family it registers, and a callback appends the trainer's progress to files the controller reads.
"""

import argparse
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import gymnasium
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from curve import series
from memory import stop, tree_memory, trend

from kart_lightning.envs.registry import find_family, register_env_family

CHAOS_DIR = "KART_CHAOS_DIR"
"""The controller's folder, as an environment variable the trainer and its actors inherit."""
PREFIX = "Chaos/"


class EnvFault(RuntimeError):
    """The failure the controller asked for."""


class FaultyEnv(gymnasium.Wrapper):
    """Raises EnvFault in `step` when it claims one of the controller's trigger files (each is
    claimed by exactly one env: the first to delete it); announces its process as an actor."""

    def __init__(self, env: gymnasium.Env, folder: Path) -> None:
        super().__init__(env)
        self.triggers = folder / "raise"
        (folder / "actors" / str(os.getpid())).touch()

    def step(self, action):
        for entry in os.scandir(self.triggers):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:  # another env claimed it first
                continue
            raise EnvFault(f"fault injected by benchmarks/chaos.py ({entry.name})")
        return self.env.step(action)


def register_chaos_family() -> None:
    """`Chaos/ID` is env ID (any registered family) wrapped in FaultyEnv, in actor processes only."""
    folder = os.environ.get(CHAOS_DIR)

    def make(config, env_index: int) -> gymnasium.Env:
        inner = dataclasses.replace(config, id=config.id.removeprefix(PREFIX))
        return FaultyEnv(find_family(inner.id).make(inner, env_index), Path(folder))

    def frames_per_step(config) -> int:
        inner = dataclasses.replace(config, id=config.id.removeprefix(PREFIX))
        return find_family(inner.id).frames_per_step(inner)

    register_env_family(dataclasses.replace(
        find_family("Airstriker-Genesis-v0"), name="chaos", matches=lambda env_id: env_id.startswith(PREFIX),
        make=make, frames_per_step=frames_per_step, known_ids=None,
    ))


if os.environ.get(CHAOS_DIR):
    register_chaos_family()


def fit(args: list[str]) -> None:
    """`python -m kart_lightning fit ARGS`, with a callback that appends to the controller's files."""
    from lightning.pytorch import Callback

    from kart_lightning import cli

    folder = Path(os.environ[CHAOS_DIR])

    class Progress(Callback):
        """`events.jsonl`: each run's first step and frame counter; `step`: the last trained step."""

        def __init__(self) -> None:
            self.step_file = os.open(folder / "step", os.O_WRONLY | os.O_CREAT, 0o644)

        def on_train_start(self, trainer, pl_module) -> None:
            event = {"event": "start", "pid": os.getpid(), "time": time.time(), "step": trainer.global_step,
                     "env_frames": int(pl_module.env_frames), "rank": trainer.global_rank}
            with open(folder / "events.jsonl", "a") as file:
                file.write(json.dumps(event) + "\n")

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.is_global_zero:
                os.pwrite(self.step_file, f"{trainer.global_step:>12}".encode(), 0)

    cli.TRAINER_DEFAULTS = {**cli.TRAINER_DEFAULTS, "callbacks": [Progress()]}
    # sys.argv stays as it is: Lightning's DDP launcher starts the further ranks with it.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    cli.main(["fit", *args])


# ---- the controller -------------------------------------------------------------------------


def start_fit(folder: Path, args: list[str], log: Path) -> subprocess.Popen:
    environment = {**os.environ, CHAOS_DIR: str(folder), "PYTHONPATH": str(REPO)}
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, __file__, "fit", *args], cwd=REPO, env=environment,
                                stdout=out, stderr=out, start_new_session=True)


def prepare(folder: Path) -> None:
    for name in ("raise", "actors"):
        (folder / name).mkdir(parents=True, exist_ok=True)


def trained_step(folder: Path) -> int | None:
    try:
        return int((folder / "step").read_text())
    except (FileNotFoundError, ValueError):
        return None


def starts(folder: Path) -> list[dict]:
    path = folder / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def next_start(folder: Path, before: int, timeout_s: float = 300) -> dict:
    """The start event after the first `before` ones, once the run writes it."""
    return wait_for(lambda: len(starts(folder)) > before and starts(folder)[before], timeout_s)


def wait_for(condition, timeout_s: float, poll_s: float = 0.1):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"waited {timeout_s:.0f} s for {condition.__name__ if hasattr(condition, '__name__') else 'it'}")


def rate(series: list[tuple[float, int, float]], start: float, end: float, use_step: bool) -> float:
    """Per second over [start, end] of the value (or the step) of a counter series."""
    inside = [row for row in series if start <= row[0] <= end]
    if len(inside) < 2:
        return math.nan
    (t0, s0, v0), (t1, s1, v1) = inside[0], inside[-1]
    return ((s1 - s0) if use_step else (v1 - v0)) / (t1 - t0)


def actors_part(work: Path, args) -> dict:
    """Actor SIGKILLs and env exceptions during a long fit."""
    folder = work / "actors"
    prepare(folder)
    fit_args = ["--config", "configs/quickstart.yaml", "--data.env.id", f"{PREFIX}Airstriker-Genesis-v0",
                "--data.eval_env.id", "Airstriker-Genesis-v0", "--trainer.enable_progress_bar", "false",
                "--trainer.default_root_dir", str(folder), "--checkpoint.dirpath", str(folder / "checkpoints")]
    process = start_fit(folder, fit_args, folder / "fit.log")
    root = psutil.Process(process.pid)
    wait_for(lambda: trained_step(folder) is not None, 300)
    first_step = time.time()
    faults_from = first_step + 60 * args.before_minutes
    faults_until = faults_from + 60 * args.minutes
    # A last minute without faults: the counters the run logs catch up with every fault.
    end = faults_until + 60
    kills, raises, memory = [], 0, []
    next_kill, next_raise, next_sample = faults_from + args.kill_every_s, faults_from + args.raise_every_s, 0.0
    rng = random.Random(args.seed)
    while time.time() < end:
        now = time.time()
        if process.poll() is not None:
            raise SystemExit(f"the trainer exited early with code {process.returncode}; see {folder / 'fit.log'}")
        if now >= next_sample:
            memory.append({"t_s": round(now - first_step, 1), **tree_memory(root)})
            next_sample = now + 30
        if now >= next_kill and now < faults_until:
            descendants = {child.pid for child in root.children(recursive=True)}
            candidates = [int(p.name) for p in (folder / "actors").iterdir() if int(p.name) in descendants]
            if candidates:
                victim = rng.choice(candidates)
                os.kill(victim, signal.SIGKILL)
                kills.append({"t_s": round(now - first_step, 1), "pid": victim})
            next_kill += args.kill_every_s
        if now >= next_raise and now < faults_until:
            raises += 1
            (folder / "raise" / f"{raises:05d}").touch()
            next_raise += args.raise_every_s
        time.sleep(0.2)
    unclaimed = len(list((folder / "raise").iterdir()))
    exit_code = stop(process)

    frames, returns = series(folder, "env_frames"), series(folder, "train/episode_return")
    windows = {"before": (first_step + 60, faults_from), "during": (faults_from, faults_until),
               "after": (faults_until, end)}
    result = {
        "config": "configs/quickstart.yaml (Airstriker-Genesis-v0, 2 actors x 1 env)",
        "before_minutes": args.before_minutes, "minutes": args.minutes,
        "actor_kills": len(kills), "env_raises": raises - unclaimed,
        "actor_restarts": series(folder, "pool/actor_restarts")[-1][2],
        "env_rebuilds": series(folder, "pool/env_rebuilds")[-1][2],
        "exit_code": exit_code,
    }
    for name, (start, until) in windows.items():
        result[f"frames_per_s_{name}"] = rate(frames, start, until, use_step=False)
        result[f"learner_steps_per_s_{name}"] = rate(frames, start, until, use_step=True)
    # The running mean of the last 100 episodes' returns, every 5 minutes.
    result["return_by_minute"] = {}
    for minute in range(5, int(args.before_minutes + args.minutes + 1) + 1, 5):
        upto = [row for row in returns if row[0] <= first_step + 60 * minute]
        if upto:
            result["return_by_minute"][minute] = round(upto[-1][2], 2)
    # Samples every 30 s swing by a learner step's activations: medians of the first and last
    # 5 minutes with faults, and the lowest sample of each.
    steady = [sample for sample in memory if 60 * args.before_minutes <= sample["t_s"] <= faults_until - first_step]
    for key in ("learner_rss_mib", "tree_pss_mib"):
        first, last = steady[:10], steady[-10:]
        result[f"{key}_median_first_last_5min"] = [round(statistics.median(s[key] for s in part)) for part in (first, last)]
        result[f"{key}_lowest_first_last_5min"] = [round(min(s[key] for s in part)) for part in (first, last)]
        result[f"{key}_trend_pct"] = round(trend(steady, key, window=10), 1)
    result["memory_samples"] = memory
    return result


def read_state(path: Path) -> dict:
    """last.ckpt's counters, read as `fit --ckpt_path last` would (weights_only)."""
    from kart_lightning.checkpointing import read_checkpoint

    checkpoint = read_checkpoint(path)
    optimizer = checkpoint["optimizer_states"][0]
    adam_steps = {int(state["step"]) for state in optimizer["state"].values()}
    scheduler = checkpoint["lr_schedulers"][0]
    hparams = checkpoint["hyper_parameters"]
    return {
        "step": checkpoint["global_step"],
        "env_frames": int(checkpoint["state_dict"]["env_frames"]),
        "optimizer_steps": sorted(adam_steps),
        "scheduler_steps": scheduler["last_epoch"],
        "lr": optimizer["param_groups"][0]["lr"],
        "expected_lr": hparams["learning_rate"] * max(0.0, 1 - int(checkpoint["state_dict"]["env_frames"]) / hparams["max_frames"]),
    }


def trainer_part(work: Path, args) -> dict:
    """SIGKILL the trainer at random moments and resume it each time with --ckpt_path last."""
    folder = work / "trainer"
    prepare(folder)
    checkpoints = folder / "checkpoints"
    interval = args.checkpoint_every
    frames_per_step = 20 * 16  # configs/cartpole.yaml: T=20, B=16, no frame skip
    fit_args = ["--config", "configs/cartpole.yaml", "--model.max_frames", str(10**9),
                "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(folder),
                "--checkpoint.dirpath", str(checkpoints), "--checkpoint.every_n_train_steps", str(interval)]
    rng = random.Random(args.seed)
    rows, orphans = [], []
    for kill in range(args.trainer_kills + 1):
        resume = ["--ckpt_path", "last"] if kill else []
        before = len(starts(folder))
        process = start_fit(folder, [*fit_args, *resume], folder / "fit.log")
        root = psutil.Process(process.pid)
        started = next_start(folder, before)
        row = {"kill": kill, "resumed_step": started["step"], "resumed_env_frames": started["env_frames"]}
        if kill:
            previous = rows[-1]
            row["resumed_as_saved"] = (started["step"], started["env_frames"]) == (
                previous["saved"]["step"], previous["saved"]["env_frames"])
        if kill == args.trainer_kills:  # the last resume: check it, then stop it as a user would
            row["exit_code_on_ctrl_c"] = stop(process)
            rows.append(row)
            break
        during_save = kill % 3 == 2
        # Not before the run's first save, so that a last.ckpt is there to resume from.
        wait_for(lambda: (checkpoints / "last.ckpt").is_file(), 300)
        time.sleep(rng.uniform(1, 5) if during_save else rng.uniform(2, 25))
        children = root.children(recursive=True)
        writing = None
        if during_save:
            deadline = time.monotonic() + 60
            while writing is None and time.monotonic() < deadline:
                writing = next((entry.name for entry in os.scandir(checkpoints) if entry.name.endswith(".tmp")), None)
                time.sleep(0.001)
        process.send_signal(signal.SIGKILL)
        process.wait()
        _, alive = psutil.wait_procs(children, timeout=15)
        for child in alive:
            orphans.append({"kill": kill, "pid": child.pid, "cmdline": " ".join(child.cmdline()[:4])})
            child.kill()
        left = sorted(path.name for path in checkpoints.glob("*.tmp"))
        saved = read_state(checkpoints / "last.ckpt")
        consistent = (saved["env_frames"] == saved["step"] * frames_per_step
                      and saved["optimizer_steps"] == [saved["step"]] and saved["scheduler_steps"] == saved["step"]
                      and math.isclose(saved["lr"], saved["expected_lr"], rel_tol=1e-6))
        lost = trained_step(folder) - saved["step"]
        row.update({"during_save": during_save, "writing": writing, "temporary_left": left,
                    "children": len(children), "orphans": len(alive), "saved": saved,
                    "consistent": consistent, "trained_step": trained_step(folder), "steps_lost": lost,
                    "at_most_one_interval_lost": lost <= interval})
        print(json.dumps(row), flush=True)
        rows.append(row)
    killed = rows[:-1]
    return {
        "config": f"configs/cartpole.yaml, checkpoint every {interval} steps",
        "kills": len(killed),
        "kills_while_writing": sum(1 for row in killed if row["writing"]),
        "resumed_from_readable_last_ckpt": sum(1 for row in rows[1:] if row["resumed_as_saved"]),
        "consistent_checkpoints": sum(1 for row in killed if row["consistent"]),
        "at_most_one_interval_lost": sum(1 for row in killed if row["at_most_one_interval_lost"]),
        "max_steps_lost": max(row["steps_lost"] for row in killed),
        "mean_steps_lost": statistics.mean(row["steps_lost"] for row in killed),
        "orphans": orphans,
        "final_step": rows[-1]["resumed_step"],
        "final_exit_code_on_ctrl_c": rows[-1]["exit_code_on_ctrl_c"],
        "rows": rows,
    }


RANK_FAULTS = ("kill rank 1", "kill rank 0", "actors of rank 1 die")


def kill_actors_until_failed(learner: psutil.Process, deadline: float) -> None:
    """SIGKILL every actor of `learner` as soon as it appears, until the learner is gone."""
    while time.monotonic() < deadline and learner.is_running() and learner.status() != psutil.STATUS_ZOMBIE:
        for child in learner.children():
            try:
                command = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if "spawn_main" in command and "resource_tracker" not in command:
                child.kill()
        time.sleep(0.02)


def ranks_part(work: Path, args) -> dict:
    """End a 2-rank run by each fault in turn; time its end, read its sentences, count orphans."""
    folder = work / "ranks"
    prepare(folder)
    checkpoints = folder / "checkpoints"
    fit_args = ["--config", "configs/cartpole.yaml", "--trainer.accelerator", "cpu", "--trainer.strategy", "ddp",
                "--trainer.devices", "2", "--data.num_actors", "1", "--model.max_frames", str(10**9),
                "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(folder),
                "--checkpoint.dirpath", str(checkpoints), "--checkpoint.every_n_train_steps", "50",
                "--data.max_actor_failures", "1"]
    rng = random.Random(args.seed)
    rows = []
    saved_step = 0  # what the next run should resume from
    for trial in range(args.rank_faults):
        fault = RANK_FAULTS[trial % len(RANK_FAULTS)]
        resume = ["--ckpt_path", "last"] if trial else []
        before = len(starts(folder))
        log = folder / f"fit-{trial}.log"
        process = start_fit(folder, [*fit_args, *resume], log)
        ranks = {event["rank"]: event for event in
                 [next_start(folder, before), next_start(folder, before + 1)]}
        time.sleep(rng.uniform(5, 20))
        tree = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
        faulted = time.monotonic()
        if fault == "actors of rank 1 die":
            kill_actors_until_failed(psutil.Process(ranks[1]["pid"]), faulted + 120)
        else:
            os.kill(ranks[int(fault[-1])]["pid"], signal.SIGKILL)
        gone, alive = psutil.wait_procs(tree, timeout=args.rank_bound_s * 2)
        alive = [p for p in alive if p.status() != psutil.STATUS_ZOMBIE]
        ended_s = time.monotonic() - faulted
        for child in alive:
            child.kill()
        # psutil reaped the job's first process, so its exit code is psutil's to tell.
        exit_code = next((p.returncode for p in gone if p.pid == process.pid), None)
        text = log.read_text(errors="replace")
        sentences = [line for line in text.splitlines() if line.startswith("kart_lightning: error:")]
        lost = "1" if fault != "kill rank 0" else "0"
        row = {"trial": trial, "fault": fault, "ended_s": round(ended_s, 2), "exit_code": exit_code,
               "sentences": sentences, "named": any(f"rank {lost} " in s or f"rank {lost}:" in s for s in sentences),
               "traceback": "Traceback" in text, "processes": len(tree), "orphans": len(alive),
               "resumed_step": ranks[0]["step"], "last_ckpt_step": saved_step,
               "resumed_as_saved": ranks[0]["step"] == saved_step and ranks[1]["step"] == saved_step}
        if (checkpoints / "last.ckpt").is_file():
            saved_step = read_state(checkpoints / "last.ckpt")["step"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    summary = {}
    for fault in RANK_FAULTS:
        mine = [row for row in rows if row["fault"] == fault]
        if mine:
            summary[fault] = {
                "trials": len(mine), "ended_within_bound": sum(row["ended_s"] <= args.rank_bound_s for row in mine),
                "max_ended_s": max(row["ended_s"] for row in mine),
                "median_ended_s": statistics.median(row["ended_s"] for row in mine),
                "named_the_rank": sum(row["named"] for row in mine),
                "tracebacks": sum(row["traceback"] for row in mine),
                "orphans": sum(row["orphans"] for row in mine),
            }
    return {"config": "configs/cartpole.yaml, 2 ranks (gloo) of 1 actor each", "bound_s": args.rank_bound_s,
            "faults": summary, "resumed_as_saved": sum(row["resumed_as_saved"] for row in rows[1:]),
            "resumes": len(rows) - 1, "rows": rows}


def disk_part(work: Path, args) -> dict:
    """Fill the checkpoint folder's file system while the run saves into it."""
    folder = work / "disk"
    prepare(folder)
    mount = folder / "small-disk"
    mount.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        raise SystemExit("the disk part mounts a small tmpfs, which needs root: run it as root, or leave it out of --parts.")
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={args.disk_mib}m", "tmpfs", str(mount)], check=True)
    checkpoints = mount / "checkpoints"
    fit_args = ["--config", "configs/cartpole.yaml", "--model.max_frames", str(10**9),
                "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(folder),
                "--checkpoint.dirpath", str(checkpoints), "--checkpoint.every_n_train_steps", str(args.checkpoint_every)]
    try:
        log = folder / "fit.log"
        process = start_fit(folder, fit_args, log)
        wait_for(lambda: (checkpoints / "last.ckpt").is_file(), 300)
        time.sleep(3)
        # Fill what is left: the next save finds no space.
        filler = os.open(mount / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            while True:
                os.write(filler, b"\0" * 65536)
        except OSError:
            pass
        finally:
            os.close(filler)
        filled_at = trained_step(folder)
        try:
            exit_code = process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            exit_code = None
            stop(process)
        output = log.read_text().strip().splitlines()
        saved = read_state(checkpoints / "last.ckpt")
        left = sorted(path.name for path in checkpoints.glob("*.tmp"))
        (mount / "filler").unlink()
        before = len(starts(folder))
        resumed = start_fit(folder, [*fit_args, "--ckpt_path", "last"], folder / "resume.log")
        started = next_start(folder, before)
        time.sleep(5)
        resume_exit = stop(resumed)
        return {
            "tmpfs_mib": args.disk_mib, "filled_at_step": filled_at, "exit_code": exit_code,
            "last_lines": output[-3:], "traceback": any("Traceback" in line for line in output),
            "last_ckpt_step": saved["step"], "temporary_left": left,
            "resumed_step": started["step"], "resumed_as_saved": started["step"] == saved["step"],
            "resume_exit_code_on_ctrl_c": resume_exit,
        }
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def main() -> None:
    if sys.argv[1:2] == ["fit"]:
        fit(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="actors,trainer,disk")
    parser.add_argument("--minutes", type=float, default=20.0, help="actors: minutes with faults")
    parser.add_argument("--before_minutes", type=float, default=3.0, help="actors: minutes without, first")
    parser.add_argument("--kill_every_s", type=float, default=60.0)
    parser.add_argument("--raise_every_s", type=float, default=30.0)
    parser.add_argument("--trainer_kills", type=int, default=20)
    parser.add_argument("--checkpoint_every", type=int, default=100, help="trainer, disk: steps between checkpoints")
    parser.add_argument("--disk_mib", type=int, default=8)
    parser.add_argument("--rank_faults", type=int, default=9, help="ranks: runs, each ended by a fault")
    parser.add_argument("--rank_bound_s", type=float, default=60.0, help="ranks: the time a job may take to end")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work_dir", help="keep the runs' logs and checkpoints here (default: a temporary folder)")
    parser.add_argument("--out", help="write the results as JSON")
    args = parser.parse_args()
    # A shell's background job ignores SIGINT, and so would the runs it starts: they get Ctrl-C back
    # (a handled signal is reset to its default in a child).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parts = {"actors": actors_part, "trainer": trainer_part, "ranks": ranks_part, "disk": disk_part}
    unknown = set(args.parts.split(",")) - set(parts)
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}: choose from {', '.join(parts)}")
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="kart-chaos-"))
    results = {"load_average_1min": os.getloadavg()[0], "cores": os.cpu_count()}
    try:
        for name in args.parts.split(","):
            print(f"chaos: {name} ...", flush=True)
            results[name] = parts[name](work, args)
            print(json.dumps({name: {k: v for k, v in results[name].items() if k not in ("rows", "memory_samples")}},
                             indent=2), flush=True)
    finally:
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
