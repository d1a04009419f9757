"""Restarts along the course: a share of training races start where an earlier race of the same
env first passed a checkpoint, so the far end of a course is practised as often as its start."""

from typing import Any

import gymnasium
import numpy as np

from kart_lightning.envs.mario_kart.game import LAP_ON_GRID

FIRST_LAP = LAP_ON_GRID + 1
"""RAM `lap` while the first lap is driven."""


class CheckpointRestarts(gymnasium.Wrapper):
    """A bare Super Mario Kart env (or RotateStates over one) whose episodes start, each with
    probability `share`, from the emulator state of a checkpoint instead of the grid.

    On every frame of the first lap that reaches a checkpoint further than any before it in the
    episode, the emulator state is kept for (track, checkpoint), replacing the one kept before: one
    state per checkpoint of each track this env drives (~0.43 MB each, so at most ~18 MB for a
    41-checkpoint course). A restart draws one of the episode's track uniformly, so every part of
    the course the policy has reached is started from equally often. With none kept for the track
    yet, the episode starts on the grid. Every step of a restarted episode carries
    `info["restart"] = True`: it began mid-race, so its return and race results are not a race's.
    """

    def __init__(self, env: gymnasium.Env, share: float):
        super().__init__(env)
        if not 0.0 <= share < 1.0:
            raise ValueError(f"share must be in [0, 1), not {share}")
        self.share = share
        self.kept: dict[int, dict[int, bytes]] = {}
        """Track (RotateStates' state index, 0 without it) -> checkpoint -> emulator state."""
        self.restarted = False
        self._rng = np.random.default_rng()
        self._furthest = -1

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        if seed is not None:
            self._rng = np.random.default_rng(seed)
        obs, info = self.env.reset(seed=seed, options=options)
        kept = self.kept.get(self._track(), {})
        self.restarted = bool(kept) and self._rng.random() < self.share
        if self.restarted:
            checkpoints = sorted(kept)
            obs, info = self._load(kept[checkpoints[self._rng.integers(len(checkpoints))]])
            info["restart"] = True
        ram = self.env.unwrapped.data.lookup_all()
        self._furthest = ram["checkpoint"] if ram["lap"] == FIRST_LAP else -1
        return obs, info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        if info["lap"] == FIRST_LAP and info["checkpoint"] > self._furthest:
            self._furthest = info["checkpoint"]
            self.kept.setdefault(info.get("state_index", 0), {})[self._furthest] = self.env.unwrapped.em.get_state()
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
