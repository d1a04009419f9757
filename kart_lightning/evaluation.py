"""Plays whole episodes with a policy on held-out envs and sums them up per track.

Used in three places: the `test` and `validate` subcommands (in the learner's process), the
evaluation and recording callbacks during fit (in their own process, see callbacks.py), and the
`record` subcommand. An episode result is a plain dict, so it goes into JSON as it is.
"""

import dataclasses
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from kart_lightning.envs import EnvConfig, find_family, make_env, retro_state_names


def held_out_envs(config: EnvConfig) -> list[tuple[str, EnvConfig]]:
    """One (name, config) per held-out track: each state of `config.retro_state`, or the env id
    itself when it names no states."""
    states = retro_state_names(config)
    if not states:
        return [(config.id, config)]
    return [(state, dataclasses.replace(config, retro_state=state)) for state in states]


class Recording:
    """What one episode looked like: full-resolution frames (up to `max_frames`) and the info of
    every step (for the env family's picture of the episode, if it draws one)."""

    def __init__(self, max_frames: int) -> None:
        self.max_frames = max_frames
        self.frames: list[np.ndarray] = []
        self.infos: list[dict[str, Any]] = []

    def add(self, env, info: dict[str, Any]) -> None:
        if len(self.frames) < self.max_frames:
            self.frames.append(np.asarray(env.render()).copy())
        self.infos.append(info)


@torch.no_grad()
def play_episode(
    policy: torch.jit.ScriptModule,
    env,
    seed: int,
    greedy: bool,
    recording: Recording | None = None,
) -> dict[str, Any]:
    """One whole episode from `env.reset(seed=seed)`: its return, length in agent steps and the
    episode extra stats the env reports on its last step (`info["episode_extra_stats"]`).

    Sampled actions come from torch's generator seeded with `seed` for this episode alone, so an
    episode is the same whichever tracks or episodes ran before it, and the caller's generator is
    left as it was."""
    device = next(policy.parameters()).device
    with torch.random.fork_rng(devices=range(torch.cuda.device_count()) if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return _play(policy, env, seed, greedy, recording, device)


def _play(policy, env, seed: int, greedy: bool, recording: Recording | None, device: torch.device) -> dict[str, Any]:
    obs, info = env.reset(seed=seed)
    if recording is not None:
        recording.add(env, info)
    core_state = policy.initial_state(1)
    action = torch.zeros(1, dtype=torch.int64, device=device)
    reward = torch.zeros(1, device=device)
    done = torch.ones(1, dtype=torch.bool, device=device)
    total_reward, steps = 0.0, 0
    while True:
        frame = torch.from_numpy(np.asarray(obs)).unsqueeze(0).to(device)
        action, _, _, core_state = policy.act(frame, action, reward, done, core_state, greedy)
        obs, step_reward, terminated, truncated, info = env.step(int(action))
        if recording is not None:
            recording.add(env, info)
        total_reward += float(step_reward)
        steps += 1
        reward.fill_(float(step_reward))
        done.fill_(False)
        if terminated or truncated:
            return {"return": total_reward, "length": steps, **info.get("episode_extra_stats", {})}


def play_tracks(
    policy: torch.jit.ScriptModule,
    config: EnvConfig,
    episodes: int,
    seed: int,
    greedy: bool,
) -> Iterator[dict[str, Any]]:
    """`episodes` episodes on each held-out track of `config`, seeds seed, seed + 1, ...; each
    result also names its track, env id and seed. One env at a time: stable-retro allows one per process."""
    for name, track_config in held_out_envs(config):
        env = make_env(track_config, seed=seed)
        try:
            for episode in range(episodes):
                result = play_episode(policy, env, seed + episode, greedy)
                yield {"track": name, "env_id": config.id, "seed": seed + episode, **result}
        finally:
            env.close()


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per track: episodes, mean/min/max return, mean length, and each episode extra stat of the
    env's family summed up as the family says (`KEY_mean`, `KEY_sum`, `KEY_min` or `KEY_max`) over
    the episodes that reported a value for it (None where none did)."""
    summary: dict[str, dict[str, Any]] = {}
    for track in dict.fromkeys(result["track"] for result in results):
        episodes = [result for result in results if result["track"] == track]
        returns = [result["return"] for result in episodes]
        row: dict[str, Any] = {
            "episodes": len(episodes),
            "return_mean": float(np.mean(returns)),
            "return_min": float(np.min(returns)),
            "return_max": float(np.max(returns)),
            "length_mean": float(np.mean([result["length"] for result in episodes])),
        }
        for key, how in find_family(episodes[0]["env_id"]).extra_stats.items():
            values = [float(result[key]) for result in episodes if result.get(key) is not None]
            row[f"{key}_{how}"] = float(_AGGREGATIONS[how](values)) if values else None
        summary[track] = row
    return summary


_AGGREGATIONS = {"mean": np.mean, "sum": np.sum, "min": np.min, "max": np.max}

_COLUMNS = (
    ("episodes", "episodes", "{:.0f}"),
    ("return_mean", "return mean", "{:.2f}"),
    ("return_min", "min", "{:.2f}"),
    ("return_max", "max", "{:.2f}"),
    ("length_mean", "steps", "{:.0f}"),
)


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """The summary as a fixed-width text table, one row per track, extra stats after the return
    and length (titled by their key: `race_time_s_mean` is "race time s")."""
    extra = [key for key in dict.fromkeys(key for row in summary.values() for key in row)
             if key not in {column[0] for column in _COLUMNS}]
    columns = [*_COLUMNS, *((key, key.rsplit("_", 1)[0].replace("_", " "), "{:.0f}" if key.endswith("_sum") else "{:.2f}")
                            for key in extra)]
    header = ["track", *(title for _, title, _ in columns)]
    rows = [
        [track, *(_cell(row.get(key), style) for key, _, style in columns)]
        for track, row in summary.items()
    ]
    widths = [max(len(line[i]) for line in [header, *rows]) for i in range(len(header))]
    lines = [header, ["-" * width for width in widths], *rows]
    return "\n".join(
        "  ".join(cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in enumerate(zip(line, widths, strict=True)))
        for line in lines
    )


def _cell(value: Any, style: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return style.format(value)


def scalar_metrics(prefix: str, summary: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Loggable numbers: `prefix/episode_KEY` over all tracks for the return, the length and each
    extra stat summed up as a mean (means of episodes), and `prefix/TRACK/key` per track."""
    metrics: dict[str, float] = {}
    total = sum(row["episodes"] for row in summary.values())
    means = [key for key in dict.fromkeys(key for row in summary.values() for key in row) if key.endswith("_mean")]
    for key in means:
        if all(row.get(key) is not None for row in summary.values()):
            name = f"{prefix}/episode_{key.removesuffix('_mean')}"
            metrics[name] = sum(row[key] * row["episodes"] for row in summary.values()) / total
    for track, row in summary.items():
        for key, value in row.items():
            if value is not None:
                metrics[f"{prefix}/{track}/{key}"] = float(value)
    return metrics


def metric_names(prefix: str, config: EnvConfig) -> list[str]:
    """Every name `scalar_metrics` can give for an evaluation on `config`'s held-out tracks: the
    overall means first, then each track's."""
    keys = [key for key, _, _ in _COLUMNS]
    keys += [f"{key}_{how}" for key, how in find_family(config.id).extra_stats.items()]
    overall = [f"{prefix}/episode_{key.removesuffix('_mean')}" for key in keys if key.endswith("_mean")]
    return overall + [f"{prefix}/{name}/{key}" for name, _ in held_out_envs(config) for key in keys]
