"""Reward, episode end and race metrics of Super Mario Kart, computed from RAM frame by frame.

RaceReward is pure (RAM dicts in, numbers out) so tests can script races; RaceRewardWrapper applies it.
"""

from collections.abc import Mapping
from typing import Any

import gymnasium

from kart_lightning.envs.mario_kart.config import MarioKartConfig
from kart_lightning.envs.mario_kart.game import (
    FALLEN,
    FULL_SPEED,
    GROUND,
    LAKITU_RESCUE,
    LAKITU_WRONG_WAY,
    LAP_ON_GRID,
)
from kart_lightning.envs.mario_kart.tracks import TRACKS

_TRACK_NAMES = {track.course_id: track.name for track in TRACKS}


class RaceReward:
    """Turns successive RAM readings (data.json variables, one per emulator frame) into rewards.

    Progress is `lap * checkpoint_count + checkpoint`: the checkpoint wraps to 0 as the lap counter
    goes up at the line (and back as it goes down), so progress just counts checkpoints, forwards
    and backwards alike; its reward (`progress: net`) therefore sums to the net checkpoints gained,
    and driving back and forth over one earns nothing. With `progress: furthest` it pays only for
    progress beyond the race's best, which sums to the same once the race is past it. Per-step
    weights are spread over the `frames_per_step` frames of an agent step, and the stall limit is
    counted in frames.
    """

    def __init__(self, config: MarioKartConfig, frames_per_step: int = 1):
        self.config = config
        self._wrong_way_per_frame = config.wrong_way_penalty / frames_per_step
        self._offroad_per_frame = config.offroad_penalty / frames_per_step
        self._speed_per_frame = config.speed_reward / frames_per_step / FULL_SPEED
        self._stall_frames = None if config.stall_steps is None else config.stall_steps * frames_per_step

    def reset(self, ram: Mapping[str, int]) -> None:
        """Start a race from `ram`, the reading of its first frame."""
        self._count = ram["checkpoint_count"]
        self._start = self._raw_progress(ram)
        self._progress = 0
        self._best_progress = 0
        self._frames_since_best = 0
        self._best_lap = ram["lap"]
        self._road = ram["ground_type"]
        self._fallen = ram["ground_status"] in FALLEN
        self._rescued = ram["ground_status"] in LAKITU_RESCUE
        self._lap_times_s: list[float] = []
        self._split_s = _race_time_s(ram)
        self._ram = ram

    def step(self, ram: Mapping[str, int]) -> tuple[float, bool, bool]:
        """Reward for the frame that led to `ram`, whether the race is finished, whether it stalled."""
        config = self.config
        progress = self._raw_progress(ram) - self._start
        if config.progress == "furthest":
            reward = config.progress_reward * max(0, progress - self._best_progress)
        else:
            reward = config.progress_reward * (progress - self._progress)
        self._progress = progress

        lap = ram["lap"]
        if lap > self._best_lap:
            self._best_lap = lap
            if lap > LAP_ON_GRID + 1:  # 127 -> 128 is the start, not a lap
                reward += config.lap_reward
                now_s = _race_time_s(ram)
                self._lap_times_s.append(now_s - self._split_s)
                self._split_s = now_s

        status = ram["ground_status"]
        fallen, rescued = status in FALLEN, status in LAKITU_RESCUE
        if fallen and not self._fallen:
            reward -= config.fall_penalty
        if rescued and not self._rescued:
            reward -= config.lakitu_penalty
        self._fallen, self._rescued = fallen, rescued
        if ram["lakitu"] & LAKITU_WRONG_WAY:
            reward -= self._wrong_way_per_frame
        elif not (fallen or rescued):
            reward += self._speed_per_frame * ram["speed"]
        if status == GROUND and ram["ground_type"] != self._road:
            reward -= self._offroad_per_frame

        if progress > self._best_progress:
            self._best_progress = progress
            self._frames_since_best = 0
        else:
            self._frames_since_best += 1
        self._ram = ram
        stalled = self._stall_frames is not None and self._frames_since_best >= self._stall_frames
        return reward, self.finished, stalled

    @property
    def laps_completed(self) -> int:
        """Laps of the race completed: the lap counter reads 128 while lap 1 is driven."""
        return max(0, self._best_lap - LAP_ON_GRID - 1)

    @property
    def finished(self) -> bool:
        return self.laps_completed >= self.config.laps

    def info(self) -> dict[str, Any]:
        """The race so far, for metrics (`info["race"]` of every step): `progress` counts checkpoints
        from the episode's start, `lap_times_s` the laps completed in it, times by the game's clock."""
        ram = self._ram
        return {
            "track": _TRACK_NAMES.get(ram["track"], f"course {ram['track']}"),
            "laps_completed": self.laps_completed,
            "checkpoint": ram["checkpoint"],
            "progress": self._progress,
            "race_time_s": _race_time_s(ram),
            "lap_times_s": tuple(self._lap_times_s),
            "speed": ram["speed"],
            "x": ram["x"],
            "y": ram["y"],
            "wrong_way": bool(ram["lakitu"] & LAKITU_WRONG_WAY),
            "finished": self.finished,
        }

    def extra_stats(self) -> dict[str, Any]:
        """The race as an episode's extra stats (family.RACE_STATS): read on its last step."""
        lap_times = self._lap_times_s
        return {
            "checkpoints": self._progress,
            "laps": self.laps_completed,
            "finished": self.finished,
            "race_time_s": _race_time_s(self._ram) if self.finished else None,
            "best_lap_s": min(lap_times) if lap_times else None,
        }

    def _raw_progress(self, ram: Mapping[str, int]) -> int:
        return ram["lap"] * self._count + ram["checkpoint"]


def _race_time_s(ram: Mapping[str, int]) -> float:
    """The race clock as the game shows it (it gains a second every ~50 frames, not 60)."""
    return 60 * ram["clock_minutes"] + ram["clock_seconds"] + ram["clock_centiseconds"] / 100


class RaceRewardWrapper(gymnasium.Wrapper):
    """Replaces a Super Mario Kart env's reward and episode end with RaceReward's, per frame.

    It sits beneath the frame skip so that it sees every frame's RAM: a fall, the lap counter's
    step or the finish can last a single frame, the skip sums the rewards, and a finish ends the
    skip at once. Stalling truncates rather than terminates: the cut is ours, not the game's, and
    the policy cannot see how long it has stalled, so its value must be bootstrapped as at a time
    limit. Adds `info["race"]` (see RaceReward.info) and `info["episode_extra_stats"]` (the race
    so far, as the registry's episode extra stats; what the last step holds is the episode's).
    """

    def __init__(self, env: gymnasium.Env, config: MarioKartConfig, frames_per_step: int = 1):
        super().__init__(env)
        self.race = RaceReward(config, frames_per_step)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        # stable-retro's reset returns no info; its RAM reading is up to date all the same.
        self.race.reset(self.env.unwrapped.data.lookup_all())
        info["race"] = self.race.info()
        return obs, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, _, terminated, truncated, info = self.env.step(action)
        reward, finished, stalled = self.race.step(info)
        info["race"] = self.race.info()
        info["episode_extra_stats"] = self.race.extra_stats()
        return obs, reward, terminated or finished, truncated or stalled, info
