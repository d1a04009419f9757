"""Generic gymnasium wrappers that gymnasium itself lacks or only offers behind OpenCV.

Atari no-op reset and episodic life, a stable-retro state per episode (in turn or by frames), row cropping,
Pillow resizing, and channels-first frames.
"""

from typing import Any

import gymnasium
import numpy as np
from gymnasium.spaces import Box
from PIL import Image


class NoopReset(gymnasium.Wrapper):
    """On reset, take 1 to `noop_max` no-op actions so that episodes start in varied states.

    gymnasium has this only inside `AtariPreprocessing`, which needs OpenCV; action 0 must be
    NOOP, as it is in every ALE game's minimal action set.
    """

    def __init__(self, env: gymnasium.Env, noop_max: int):
        super().__init__(env)
        if noop_max < 1:
            raise ValueError(f"noop_max must be at least 1, got {noop_max}")
        self.noop_max = noop_max

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        # The env's own seeded generator keeps the no-op count reproducible from the seed.
        noops = int(self.env.unwrapped.np_random.integers(1, self.noop_max + 1))
        for _ in range(noops):
            obs, _, terminated, truncated, info = self.env.step(0)
            if terminated or truncated:
                obs, info = self.env.reset(options=options)
        return obs, info


class EpisodicLife(gymnasium.Wrapper):
    """Atari: a lost life terminates the episode for learning; only game over resets the game.

    After a life-loss termination, `reset()` steps on from where play stopped (one no-op), so
    the learner sees every life as an episode while the game itself runs to its real end.
    """

    def __init__(self, env: gymnasium.Env):
        super().__init__(env)
        self._lives = 0
        self._game_over = True

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        obs, reward, terminated, truncated, info = self.env.step(action)
        self._game_over = terminated or truncated
        lives = self.env.unwrapped.ale.lives()
        # Some games report 0 lives for a few frames at the start: only a drop to >0 counts.
        if 0 < lives < self._lives:
            terminated = True
        self._lives = lives
        return obs, reward, terminated, truncated, info

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        if self._game_over or seed is not None:
            obs, info = self.env.reset(seed=seed, options=options)
        else:
            obs, _, terminated, truncated, info = self.env.step(0)
            if terminated or truncated:
                obs, info = self.env.reset(options=options)
        self._game_over = False
        self._lives = self.env.unwrapped.ale.lives()
        return obs, info


class RotateStates(gymnasium.Wrapper):
    """A bare stable-retro env that starts each episode from one of several savestates, in turn or by frames.

    `states` are the decompressed savestates in order; the first episode starts from
    `states[first]`. With `balance='episodes'` each one after it starts from the next state,
    wrapping around: every state is played as often as the others, however few envs a run has.
    With `balance='frames'` each starts from the state this env has played the fewest frames of
    (the next in order among equals), so a state whose episodes run long gets no more frames than
    one whose episodes end early. A reset that follows no step (as make_env's seeding reset is
    followed by the first real one) starts the same state again. Every step's info carries
    `state_index`, the episode's state, for statistics per state. The frame counts live as long as
    the env: a restarted actor's env starts counting again.
    """

    BALANCES = ("episodes", "frames")

    def __init__(self, env: gymnasium.Env, states: list[bytes], first: int, balance: str = "episodes"):
        super().__init__(env)
        if not states:
            raise ValueError("RotateStates needs at least one state")
        if balance not in self.BALANCES:
            raise ValueError(f"balance must be one of {self.BALANCES}, not {balance!r}")
        self.states = states
        self.balance = balance
        self.state_index = first % len(states)
        self.frames_played = [0] * len(states)
        """Emulator frames (bare env steps) played from each state so far."""
        self.stepped = False

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[Any, dict[str, Any]]:
        if self.stepped:
            self.state_index = self._next_state()
            self.stepped = False
        # stable-retro's reset restores `initial_state`, the state it loaded at construction.
        self.env.unwrapped.initial_state = self.states[self.state_index]
        return self.env.reset(seed=seed, options=options)

    def _next_state(self) -> int:
        count = len(self.states)
        in_order = [(self.state_index + offset) % count for offset in range(1, count + 1)]
        if self.balance == "episodes":
            return in_order[0]
        return min(in_order, key=lambda index: self.frames_played[index])

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        self.stepped = True
        self.frames_played[self.state_index] += 1
        obs, reward, terminated, truncated, info = self.env.step(action)
        info["state_index"] = self.state_index
        return obs, reward, terminated, truncated, info


class CropRows(gymnasium.ObservationWrapper):
    """Keep rows `start:stop` of frames `[H, W]` or `[H, W, C]`, such as one half of a split screen.

    The rows stay a view of the frame (C-contiguous), so Pillow and numpy read them without a copy.
    """

    def __init__(self, env: gymnasium.Env, start: int, stop: int):
        super().__init__(env)
        height, *rest = env.observation_space.shape
        if not 0 <= start < stop <= height:
            raise ValueError(f"rows {start}:{stop} are not inside a frame {height} rows high")
        self.observation_space = Box(0, 255, (stop - start, *rest), np.uint8)
        self._rows = slice(start, stop)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return observation[self._rows]


class ResizeFrame(gymnasium.ObservationWrapper):
    """Resize uint8 frames `[H, W]` or `[H, W, C]` to `[size, size]` or `[size, size, C]`.

    Area averaging as `cv2.INTER_AREA` in the DQN preprocessing, done by Pillow because
    gymnasium's `ResizeObservation` needs OpenCV.
    """

    def __init__(self, env: gymnasium.Env, size: int):
        super().__init__(env)
        shape = (size, size, *env.observation_space.shape[2:])
        self.observation_space = Box(0, 255, shape, np.uint8)
        self._size = (size, size)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return np.asarray(Image.fromarray(observation).resize(self._size, Image.Resampling.BOX))


class ChannelsFirst(gymnasium.ObservationWrapper):
    """Frames `[H, W, C]` to `[C, H, W]`, the layout torch convolutions take."""

    def __init__(self, env: gymnasium.Env):
        super().__init__(env)
        height, width, channels = env.observation_space.shape
        self.observation_space = Box(0, 255, (channels, height, width), np.uint8)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return np.transpose(observation, (2, 0, 1))
