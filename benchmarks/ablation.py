"""One row of the Mario Kart ablation table: `fit` for a fixed number of env frames, then `test` on
Mario Circuit 1-4 (10 sampled and 10 greedy episodes per track), summed up as a table row.

    python benchmarks/ablation.py --name baseline --out benchmarks/results/ablation-baseline.json -- \
        --data.replay.ratio 0 --data.replay.self_imitation 0 --model.augmentation none --trainer.precision 32-true --evaluation.every_n_steps 1000 --data.eval_episodes 2 --data.env.options.speed_reward 0
    python benchmarks/ablation.py --name replay1 --out ... -- --data.replay.ratio 1 --data.replay.self_imitation 0 --model.augmentation none --trainer.precision 32-true --evaluation.every_n_steps 1000 --data.eval_episodes 2 --data.env.options.speed_reward 0

Every row uses configs/impala.yaml (or `--config`) with `--model.max_frames FRAMES` (the lr
decays to zero over them) and the overrides after `--`; the run's folder keeps its TensorBoard
events, checkpoints and the two `test` reports. Run it alone on the machine.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's kart_lightning, as the fit and test subprocesses run it
TRACKS = ["MarioCircuit.Act1", "MarioCircuit.Act2", "MarioCircuit.Act3", "MarioCircuit.Act4"]


def kart(*args: str, log: Path) -> None:
    with open(log, "ab") as out:
        subprocess.run([sys.executable, "-m", "kart_lightning", *args], cwd=REPO, stdout=out, stderr=out, check=True)


def test(run: Path, config: list[str], greedy: bool, episodes: int) -> dict:
    checkpoint = run / "checkpoints" / "last.ckpt"
    kart("test", *config, "--ckpt_path", str(checkpoint), "--data.eval_env.retro_state", f"[{', '.join(TRACKS)}]",
         "--data.eval_episodes", str(episodes), "--data.eval_greedy", str(greedy).lower(),
         "--trainer.default_root_dir", str(run), log=run / "test.log")
    report = checkpoint.with_suffix(".test.json")
    kept = run / f"test-{'greedy' if greedy else 'sampled'}.json"
    report.replace(kept)
    return json.loads(kept.read_text())


def row(name: str, fit: dict, sampled: dict, greedy: dict) -> str:
    """Markdown: name, frames, minutes, then per track `checkpoints / laps / finished (sampled; greedy)`."""
    cells = [name, f"{fit['env_frames'] / 1e6:.2f}M", f"{fit['minutes']:.0f}"]
    for track in TRACKS:
        s, g = sampled["tracks"][track], greedy["tracks"][track]
        time_s = s.get("race_time_s_mean")
        cells.append(
            f"{s['checkpoints_mean']:.1f} / {s['laps_mean']:.2f} / {s['finished_sum']:.0f}"
            f"{f' ({time_s:.1f} s)' if time_s else ''}; "
            f"{g['checkpoints_mean']:.1f} / {g['laps_mean']:.2f} / {g['finished_sum']:.0f}"
        )
    return "| " + " | ".join(cells) + " |"


def learning_curve(run: Path, points: int = 200) -> dict[str, dict[str, list[float]]]:
    """The run's learning curves, kept in the row's JSON (run folders are not kept): for the
    training means and the held-out evaluations of checkpoints and laps per episode (and, per
    training state, checkpoints, laps and share of frames; per evaluated track, checkpoints and laps), the values with their env frames
    (millions) and minutes of training, thinned to about `points` each."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from curve import at_steps, evaluated_track_tags, scalar_tags, series, state_tags, training_minutes

    frames = series(run, "env_frames")
    by_frames = {step: value / 1e6 for _, step, value in frames}
    by_minutes = training_minutes(frames)
    curves = {}
    tags = scalar_tags(run)
    per_state = [tag for name in ("episode_checkpoints", "episode_laps", "frame_share") for tag in state_tags(tags, name)]
    per_track = [tag for key in ("checkpoints", "laps") for tag in evaluated_track_tags(tags, key)]
    for tag in ("train/episode_checkpoints", "train/episode_laps", "val/episode_checkpoints", "val/episode_laps",
                *per_state, *per_track):
        values = series(run, tag)
        values = values[:: max(1, len(values) // points)]
        xs, ys = at_steps(values, by_frames)
        minutes, _ = at_steps(values, by_minutes)
        if ys:
            curves[tag] = {"frames_m": xs, "minutes": minutes, "values": ys}
    return curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--frames", type=int, default=4_000_000)
    parser.add_argument("--config", default="configs/impala.yaml")
    parser.add_argument("--episodes", type=int, default=10, help="test episodes per track, sampled and greedy each")
    parser.add_argument("--runs_dir", default="runs/ablation")
    parser.add_argument("--out", help="write the row's figures as JSON")
    parser.add_argument("--skip_fit", action="store_true", help="test the run's fit again (its fit.json) without refitting")
    parser.add_argument("overrides", nargs=argparse.REMAINDER, help="after --: fit and test arguments")
    args = parser.parse_args()
    overrides = [a for a in args.overrides if a != "--"]
    run = (REPO / args.runs_dir / args.name).resolve()
    if args.skip_fit and not (run / "fit.json").is_file():
        parser.error(f"--skip_fit needs the fit's figures in {run / 'fit.json'}: run the row once without --skip_fit.")
    run.mkdir(parents=True, exist_ok=True)
    config = ["--config", args.config, *overrides]
    if not args.skip_fit:
        load = os.getloadavg()[0]
        start = time.monotonic()
        kart("fit", *config, "--model.max_frames", str(args.frames), "--trainer.enable_progress_bar", "false",
             "--trainer.default_root_dir", str(run), "--checkpoint.dirpath", str(run / "checkpoints"),
             log=run / "fit.log")
        minutes = (time.monotonic() - start) / 60
        from kart_lightning.checkpointing import read_checkpoint

        checkpoint = read_checkpoint(run / "checkpoints" / "last.ckpt", mmap=True)
        fit = {"env_frames": int(checkpoint["state_dict"]["env_frames"]), "learner_steps": checkpoint["global_step"],
               "minutes": minutes, "load_average_1min_at_start": load}
        (run / "fit.json").write_text(json.dumps(fit, indent=2) + "\n")
    fit = json.loads((run / "fit.json").read_text())
    sampled = test(run, config, greedy=False, episodes=args.episodes)
    greedy = test(run, config, greedy=True, episodes=args.episodes)
    result = {"name": args.name, "config": args.config, "overrides": overrides, "fit": fit,
              "sampled": sampled["tracks"], "greedy": greedy["tracks"], "row": row(args.name, fit, sampled, greedy),
              "curve": learning_curve(run)}
    print(result["row"])
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
