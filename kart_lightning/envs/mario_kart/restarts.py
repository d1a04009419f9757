"""Restarts along the course: a share of training races start where an earlier race of the same
env first passed a checkpoint, so the far end of a course is practised as often as its start, or
just before the places where its races end, so those are practised most."""

from collections import deque
from collections.abc import Sequence
from typing import Any, Literal

import gymnasium
import numpy as np

from kart_lightning.envs.mario_kart.game import LAP_ON_GRID

FIRST_LAP = LAP_ON_GRID + 1
"""RAM `lap` while the first lap is driven."""

RestartFrom = Literal["anywhere", "race_ends"]

ENDS_KEPT = 100
"""How many of a track's last races `race_ends` draws from."""

ENDS_BACK = 3
"""`race_ends` restarts up to this many checkpoints before the furthest one a race reached."""


def restart_checkpoint(
    kept: Sequence[int], ends: Sequence[int | None], where: RestartFrom, rng: np.random.Generator
) -> int | None:
    """The kept checkpoint a restart starts from, or None for the grid.

    `kept`: the checkpoints with a kept state, ascending. `ends`: for each of the track's last
    races, the furthest checkpoint it reached if it ended on its first lap, None if it got past
    the first lap or never started it. 'anywhere' draws one of `kept` uniformly; 'race_ends' draws
    one of `ends`, then one of the kept checkpoints up to ENDS_BACK before it: the grid for a race
    that ended past its first lap, so a track whose races get round it is driven from the grid.
    """
    if not kept:
        return None
    if where == "anywhere":
        return kept[rng.integers(len(kept))]
    if not ends:
        return None
    end = ends[rng.integers(len(ends))]
    if end is None:
        return None
    near = [checkpoint for checkpoint in kept if end - ENDS_BACK <= checkpoint <= end]
    return near[rng.integers(len(near))] if near else None


class CheckpointRestarts(gymnasium.Wrapper):
    """A bare Super Mario Kart env (or RotateStates over one) whose episodes start, each with
    probability `share`, from the emulator state of a checkpoint instead of the grid.

    On every frame of the first lap that reaches a checkpoint further than any before it in the
    episode, the emulator state is kept for (track, checkpoint), replacing the one kept before: one
    state per checkpoint of each track this env drives (~0.43 MB each, so at most ~18 MB for a
    41-checkpoint course). `where` picks the state (`restart_checkpoint`): 'anywhere' draws one of
    the episode's track uniformly, so every part of the course the policy has reached is started
    from equally often; 'race_ends' draws one just before where one of the track's last
    ENDS_KEPT races ended, if it ended on its first lap. With none to draw, the episode starts on
    the grid. Every step of a restarted episode carries `info["restart"] = True`: it began
    mid-race, so its return and race results are not a race's.
    """

    def __init__(self, env: gymnasium.Env, share: float, where: RestartFrom = "anywhere"):
        super().__init__(env)
        if not 0.0 <= share < 1.0:
            raise ValueError(f"share must be in [0, 1), not {share}")
        if where not in ("anywhere", "race_ends"):
            raise ValueError(f"where must be 'anywhere' or 'race_ends', not {where!r}")
        self.share, self.where = share, where
        self.kept: dict[int, dict[int, bytes]] = {}
        """Track (RotateStates' state index, 0 without it) -> checkpoint -> emulator state."""
        self.ends: dict[int, deque[int | None]] = {}
        """Track -> its last races' first-lap ends (`restart_checkpoint`), the latest last."""
        self.restarted = False
        self._rng = np.random.default_rng()
        self._furthest = -1
        self._episode_track: int | None = None
        """The track of the episode under way; None before the first."""
        self._on_first_lap = False
        """Whether the episode's latest step was on its first lap."""

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        if self._episode_track is not None:
            end = self._furthest if self._on_first_lap and self._furthest >= 0 else None
            self.ends.setdefault(self._episode_track, deque(maxlen=ENDS_KEPT)).append(end)
        obs, info = self.env.reset(seed=seed, options=options)
        track = self._track()
        kept = self.kept.get(track, {})
        start = None
        if kept and self._rng.random() < self.share:
            start = restart_checkpoint(sorted(kept), self.ends.get(track, ()), self.where, self._rng)
        self.restarted = start is not None
        if self.restarted:
            obs, info = self._load(kept[start])
            info["restart"] = True
        ram = self.env.unwrapped.data.lookup_all()
        self._on_first_lap = ram["lap"] == FIRST_LAP
        self._furthest = ram["checkpoint"] if self._on_first_lap else -1
        self._episode_track = track
        return obs, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._on_first_lap = info["lap"] == FIRST_LAP
        if self._on_first_lap and info["checkpoint"] > self._furthest:
            self._furthest = info["checkpoint"]
            self.kept.setdefault(self._episode_track, {})[self._furthest] = self.env.unwrapped.em.get_state()
        if self.restarted:
            info["restart"] = True
        return obs, reward, terminated, truncated, info

    def _track(self) -> int:
        return self.env.get_wrapper_attr("state_index") if self.env is not self.env.unwrapped else 0

    def _load(self, state: bytes) -> tuple[Any, dict[str, Any]]:
        """Reset the emulator to `state` (stable-retro's reset restores `initial_state`), then put
        back the track's own start for the next grid start."""
        emulator = self.env.unwrapped
        start, emulator.initial_state = emulator.initial_state, state
        try:
            return emulator.reset()
        finally:
            emulator.initial_state = start
