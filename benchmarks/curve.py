"""A learning curve from a run's TensorBoard events, as a PNG: an episode statistic on the training
tracks (the running mean the module logs, `train/episode_KEY`) and on the held-out ones (the
evaluation's `val/episode_KEY`), against env frames and against minutes of training.

    python benchmarks/curve.py RUN_DIR [RUN_DIR ...] --key checkpoints --out docs/curve.png

RUN_DIR is a run's folder (its `lightning_logs/version_*` are read, resumed parts joined in
order), or the JSON of an ablation row (benchmarks/ablation.py keeps the curves there); several
draw one line each, labelled by folder or file name (or `--labels`). `--per_state` adds a dotted
line for each training state (track) the envs play in turn (`train/STATE/episode_KEY`). A run
evaluated on several tracks gets a line for each (`val/TRACK/KEY_mean`).
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import SCALARS, EventAccumulator


def series(run: Path, tag: str) -> list[tuple[float, int, float]]:
    """(wall time, step, value) of `tag` across every events file under `run`, by wall time."""
    rows = []
    for events in sorted(run.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={SCALARS: 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            rows += [(event.wall_time, event.step, event.value) for event in accumulator.Scalars(tag)]
    return sorted(rows)


def scalar_tags(run: Path) -> set[str]:
    """Every scalar tag in the events files under `run`."""
    tags = set()
    for events in sorted(run.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events), size_guidance={SCALARS: 1})
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


def state_tags(tags: set[str], name: str) -> list[str]:
    """The per-state tags `train/STATE/NAME` among `tags`, by state."""
    return sorted(tag for tag in tags if tag.startswith("train/") and tag.count("/") == 2 and tag.endswith(f"/{name}"))


def evaluated_track_tags(tags: set[str], key: str) -> list[str]:
    """The evaluation's per-track tags `val/TRACK/KEY_mean` among `tags`, by track."""
    return sorted(tag for tag in tags if tag.startswith("val/") and tag.count("/") == 2 and tag.endswith(f"/{key}_mean"))


def lines(tags: set[str], key: str, per_state: bool) -> list[tuple[str, str, str]]:
    """(tag, style, what) of each line to draw for episode statistic `key`: the training mean (and
    per training state), and the evaluation's, one line per evaluated track where there are several
    (a validation course and the held-out one, say: their mean would hide both)."""
    drawn = [(f"train/episode_{key}", "-", "training")]
    if per_state:
        drawn += [(tag, ":", tag.split("/")[1]) for tag in state_tags(tags, f"episode_{key}")]
    evaluated = evaluated_track_tags(tags, key)
    if len(evaluated) > 1:
        return [*drawn, *((tag, "o--", f"evaluation, {tag.split('/')[1]}") for tag in evaluated)]
    return [*drawn, (f"val/episode_{key}", "o--", "evaluation")]


def training_minutes(frames: list[tuple[float, int, float]]) -> dict[int, float]:
    """Minutes of training at each step, not counting the gaps between a stop and its resume."""
    minutes, elapsed, previous = {}, 0.0, None
    for wall_time, step, _ in frames:
        if previous is not None and wall_time - previous < 300:
            elapsed += wall_time - previous
        previous = wall_time
        minutes[step] = elapsed / 60
    return minutes


def at_steps(values: list[tuple[float, int, float]], by_step: dict[int, float]) -> tuple[list[float], list[float]]:
    """The values whose step has an x in `by_step` (the nearest earlier logged step otherwise)."""
    steps = sorted(by_step)
    xs, ys = [], []
    for _, step, value in values:
        earlier = [s for s in steps if s <= step]
        if earlier:
            xs.append(by_step[earlier[-1]])
            ys.append(value)
    return xs, ys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--key", default="checkpoints", help="episode statistic: return, checkpoints, laps, ...")
    parser.add_argument("--per_state", action="store_true", help="a line per training state (track) too")
    parser.add_argument("--labels", nargs="*")
    parser.add_argument("--title", default="")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    labels = args.labels or [run.stem.removeprefix("ablation-") if run.suffix == ".json" else run.name
                             for run in args.runs]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for run, label in zip(args.runs, labels):
        if run.suffix == ".json":
            curves = json.loads(run.read_text()).get("curve", {})
            for tag, style, part in lines(set(curves), args.key, args.per_state):
                if tag in curves:
                    for axis, x in zip(axes, ("frames_m", "minutes")):
                        axis.plot(curves[tag][x], curves[tag]["values"], style, label=f"{label}: {part}", markersize=4)
            continue
        frames = series(run, "env_frames")
        if not frames:
            raise SystemExit(f"{run} holds no TensorBoard events with env_frames: pass a run folder of fit.")
        by_frames = {step: value / 1e6 for _, step, value in frames}
        by_minutes = training_minutes(frames)
        for tag, style, part in lines(scalar_tags(run), args.key, args.per_state):
            values = series(run, tag)
            if not values:
                continue
            for axis, x_of in zip(axes, (by_frames, by_minutes)):
                xs, ys = at_steps(values, x_of)
                axis.plot(xs, ys, style, label=f"{label}: {part}", markersize=4)
    axes[0].set_xlabel("env frames (millions)")
    axes[1].set_xlabel("minutes of training")
    axes[0].set_ylabel(f"{args.key} per episode")
    for axis in axes:
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    figure.suptitle(args.title)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
