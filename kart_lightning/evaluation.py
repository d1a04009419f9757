"""Plays whole episodes with a policy on held-out envs and sums them up per track.

Used in three places: the `test` and `validate` subcommands (in the learner's process), the
evaluation and recording callbacks during fit (in their own process, see callbacks.py), and the
`record` subcommand. An episode result is a plain dict, so it goes into JSON as it is.
"""

import dataclasses
import io
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from kart_lightning.envs.factory import EnvConfig, make_env, retro_state_names

RACE_KEYS = ("checkpoints", "laps", "finished", "race_time_s", "best_lap_s")
"""Episode keys that only races (Super Mario Kart) have."""


def held_out_envs(config: EnvConfig) -> list[tuple[str, EnvConfig]]:
    """One (name, config) per held-out track: each state of `config.retro_state`, or the env id
    itself when it names no states."""
    states = retro_state_names(config)
    if not states:
        return [(config.id, config)]
    return [(state, dataclasses.replace(config, retro_state=state)) for state in states]


def script_bytes(policy: torch.jit.ScriptModule) -> bytes:
    """The scripted policy as a CPU TorchScript file's bytes: loadable by torch.jit.load anywhere."""
    buffer = io.BytesIO()
    torch.jit.save(policy, buffer)
    buffer.seek(0)
    cpu_policy = torch.jit.load(buffer, map_location="cpu")
    cpu_policy.eval()
    buffer = io.BytesIO()
    torch.jit.save(cpu_policy, buffer)
    return buffer.getvalue()


class Recording:
    """What one episode looked like: full-resolution frames (up to `max_frames`) and, for races,
    the kart's path (x, y, speed per agent step)."""

    def __init__(self, max_frames: int) -> None:
        self.max_frames = max_frames
        self.frames: list[np.ndarray] = []
        self.path: list[tuple[int, int, int]] = []

    def add(self, env, info: dict[str, Any]) -> None:
        if len(self.frames) < self.max_frames:
            self.frames.append(np.asarray(env.render()).copy())
        if "race" in info:
            race = info["race"]
            self.path.append((race["x"], race["y"], race["speed"]))


@torch.no_grad()
def play_episode(
    policy: torch.jit.ScriptModule,
    env,
    seed: int,
    greedy: bool,
    recording: Recording | None = None,
) -> dict[str, Any]:
    """One whole episode from `env.reset(seed=seed)`: its return, length in agent steps, and for a
    race the checkpoints passed, laps, whether it finished, its race time and best lap.

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
            return _episode_result(total_reward, steps, info)


def _episode_result(total_reward: float, steps: int, info: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = {"return": total_reward, "length": steps}
    if "race" in info:
        race = info["race"]
        result.update(
            checkpoints=race["progress"],
            laps=race["laps_completed"],
            finished=bool(race["finished"]),
            race_time_s=race["race_time_s"],
            best_lap_s=min(race["lap_times_s"]) if race["lap_times_s"] else None,
        )
    return result


def play_tracks(
    policy: torch.jit.ScriptModule,
    config: EnvConfig,
    episodes: int,
    seed: int,
    greedy: bool,
) -> Iterator[dict[str, Any]]:
    """`episodes` episodes on each held-out track of `config`, seeds seed, seed + 1, ...; each
    result also names its track and seed. One env at a time: stable-retro allows one per process."""
    for name, track_config in held_out_envs(config):
        env = make_env(track_config, seed=seed)
        try:
            for episode in range(episodes):
                result = play_episode(policy, env, seed + episode, greedy)
                yield {"track": name, "seed": seed + episode, **result}
        finally:
            env.close()


def summarize(results: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per track: episodes, mean/min/max return, mean length; for races also mean checkpoints and
    laps, episodes finished, mean race time of the finished ones and the best lap of all."""
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
        if all("checkpoints" in result for result in episodes):
            finished = [result for result in episodes if result["finished"]]
            laps = [result["best_lap_s"] for result in episodes if result["best_lap_s"] is not None]
            row.update(
                checkpoints_mean=float(np.mean([result["checkpoints"] for result in episodes])),
                laps_mean=float(np.mean([result["laps"] for result in episodes])),
                finished=len(finished),
                race_time_s_mean=float(np.mean([r["race_time_s"] for r in finished])) if finished else None,
                best_lap_s=float(min(laps)) if laps else None,
            )
        summary[track] = row
    return summary


_COLUMNS = (
    ("episodes", "episodes", "{:d}"),
    ("return_mean", "return mean", "{:.2f}"),
    ("return_min", "min", "{:.2f}"),
    ("return_max", "max", "{:.2f}"),
    ("length_mean", "steps", "{:.0f}"),
    ("checkpoints_mean", "checkpoints", "{:.1f}"),
    ("laps_mean", "laps", "{:.2f}"),
    ("finished", "finished", "{:d}"),
    ("race_time_s_mean", "race time s", "{:.2f}"),
    ("best_lap_s", "best lap s", "{:.2f}"),
)


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """The summary as a fixed-width text table, one row per track; race columns only for races."""
    columns = [column for column in _COLUMNS if any(column[0] in row for row in summary.values())]
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
    """Loggable numbers: `prefix/episode_return` etc. over all tracks (means of episodes), and
    `prefix/TRACK/key` per track."""
    metrics: dict[str, float] = {}
    total = sum(row["episodes"] for row in summary.values())
    for key, name in (("return_mean", "episode_return"), ("length_mean", "episode_length"),
                      ("checkpoints_mean", "episode_checkpoints"), ("laps_mean", "episode_laps")):
        if all(key in row for row in summary.values()):
            metrics[f"{prefix}/{name}"] = sum(row[key] * row["episodes"] for row in summary.values()) / total
    for track, row in summary.items():
        for key, value in row.items():
            if value is not None:
                metrics[f"{prefix}/{track}/{key}"] = float(value)
    return metrics
