"""Memory soak: runs `python -m kart_lightning fit` for a while and samples resident memory of the
learner and of the whole process tree, to show it stays flat after warm-up.

    python benchmarks/memory.py --minutes 30 --warmup_minutes 3 --out mem.json -- \
        --config configs/atari.yaml --data.replay.ratio 0 --trainer.precision 32-true --data.batch_size 8
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def tree_memory(root: psutil.Process) -> dict:
    """Learner RSS, and the tree's PSS: shared rollout slots mapped in every process count once."""
    processes = [root, *root.children(recursive=True)]
    pss = 0
    for process in processes:
        try:
            pss += process.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return {"learner_rss_mib": root.memory_info().rss / MIB, "tree_pss_mib": pss / MIB,
            "processes": len(processes)}


def trend(samples: list, key: str, window: int = 10) -> float:
    """Change from the median of the first `window` samples to that of the last, in percent.

    Medians, because a single sample can land mid training step, when activations are alive.
    """
    first = statistics.median(sample[key] for sample in samples[:window])
    last = statistics.median(sample[key] for sample in samples[-window:])
    return (last - first) / first * 100


def stop(trainer: subprocess.Popen) -> int:
    """Ctrl-C the run's process group; escalate if SIGINT is ignored (as in a background job).
    Returns the run's exit code."""
    for sig, wait_s in ((signal.SIGINT, 90), (signal.SIGTERM, 30), (signal.SIGKILL, 30)):
        try:
            os.killpg(trainer.pid, sig)
        except ProcessLookupError:  # the group is gone: the run has exited
            pass
        try:
            return trainer.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            continue
    return trainer.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="measured window after warm-up")
    parser.add_argument("--warmup_minutes", type=float, default=3.0)
    parser.add_argument("--interval_s", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--out", help="write the samples and the summary as JSON")
    parser.add_argument("--log_dir", help="keep the run's TensorBoard events and checkpoints here")
    parser.add_argument("fit_args", nargs=argparse.REMAINDER, help="after --: arguments for fit")
    args = parser.parse_args()
    fit_args = [a for a in args.fit_args if a != "--"]

    with tempfile.TemporaryDirectory() as scratch:
        run_dir = args.log_dir or scratch
        command = [sys.executable, "-m", "kart_lightning", "fit", *fit_args,
                   "--model.max_frames", str(10**15), "--trainer.enable_progress_bar", "false",
                   "--trainer.val_check_interval", str(10**9), "--trainer.default_root_dir", run_dir,
                   "--checkpoint.dirpath", os.path.join(run_dir, "checkpoints")]
        trainer = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                   start_new_session=True)
        root = psutil.Process(trainer.pid)
        start = time.monotonic()
        samples = []
        try:
            while time.monotonic() - start < 60 * (args.warmup_minutes + args.minutes):
                time.sleep(args.interval_s)
                if trainer.poll() is not None:
                    raise SystemExit(f"the trainer exited early with code {trainer.returncode}")
                sample = {"t_s": round(time.monotonic() - start, 1), **tree_memory(root)}
                print(json.dumps(sample), flush=True)
                samples.append(sample)
        finally:
            if trainer.poll() is None:
                stop(trainer)

    steady = [s for s in samples if s["t_s"] >= 60 * args.warmup_minutes]
    summary = {
        "fit_args": fit_args,
        "minutes": args.minutes,
        "warmup_minutes": args.warmup_minutes,
        "samples_after_warmup": len(steady),
        "learner_rss_mib_range": [min(s["learner_rss_mib"] for s in steady), max(s["learner_rss_mib"] for s in steady)],
        "tree_pss_mib_range": [min(s["tree_pss_mib"] for s in steady), max(s["tree_pss_mib"] for s in steady)],
        "learner_rss_trend_pct": trend(steady, "learner_rss_mib"),
        "tree_pss_trend_pct": trend(steady, "tree_pss_mib"),
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps({"summary": summary, "samples": samples}, indent=2))


if __name__ == "__main__":
    main()
