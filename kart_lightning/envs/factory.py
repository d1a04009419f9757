"""One env factory for every game kart_lightning trains on: an EnvConfig names the game, the
registry finds its family, and the family builds it.

Also the preprocessing that image families share: frame skip with max-pooling, time limit,
episode statistics, resizing and frame stacking.
"""

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any

import gymnasium
from gymnasium.wrappers import (
    FrameStackObservation,
    GrayscaleObservation,
    MaxAndSkipObservation,
    RecordEpisodeStatistics,
    ReshapeObservation,
    TimeLimit,
)

from kart_lightning.envs.registry import EnvConfigError, family_options, find_family
from kart_lightning.envs.wrappers import ChannelsFirst, ResizeFrame, RotateStates


@dataclass
class EnvConfig:
    """Which game to play and how its observations are preprocessed.

    Args:
        id: gymnasium id (CartPole-v1), ALE id (ALE/Pong-v5), stable-retro game
            (Airstriker-Genesis-v0) or the id of a registered game family.
        frame_skip: env frames per agent step for image envs (max over the last two); 1 for vectors.
        frame_stack: number of most recent frames stacked along the channel axis.
        screen_size: frames are resized to screen_size x screen_size pixels.
        grayscale: one channel per frame instead of three (RGB).
        noop_max: Atari: at reset, take a random 1..noop_max no-op actions (0 turns this off).
        episodic_life: Atari: a lost life terminates the episode; only game over resets the game.
        max_episode_steps: agent steps before an episode is truncated; None: the env's own limit.
        retro_state: stable-retro state name or .state file path; None is the game's default state.
            A list is played in turn: env number i starts from state i % len(list) and each of its
            episodes after that from the next state in the list (or see retro_state_balance), so
            all are played by any number of envs.
        retro_state_balance: what each env shares evenly among several states: 'episodes' (the
            next state each episode) or 'frames' (each episode from the state it has played the
            fewest env frames of, so states whose episodes run long do not take most of the frames).
        render_mode: None for training; 'rgb_array' lets a recorder call env.render().
        options: the game family's own settings (its options dataclass, given as a mapping);
            see the family's documentation.
    """

    id: str = "Airstriker-Genesis-v0"
    frame_skip: int = 4
    frame_stack: int = 4
    screen_size: int = 84
    grayscale: bool = True
    noop_max: int = 30
    episodic_life: bool = False
    max_episode_steps: int | None = None
    retro_state: str | list[str] | None = None
    retro_state_balance: str = "episodes"
    render_mode: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


def env_config_from_dict(value: "EnvConfig | Mapping[str, Any]") -> EnvConfig:
    """An EnvConfig from its dict form (as a checkpoint's datamodule hyperparameters hold it).

    Older checkpoints kept a game family's settings under a key of their own rather than
    `options` (every env had one): for a family that takes options, that nested mapping becomes
    `options`; for the others it is dropped."""
    if isinstance(value, EnvConfig):
        # One unpickled from an older checkpoint may hold other fields than this version's.
        value = vars(value)
    known = {option.name for option in fields(EnvConfig)}
    values = {key: item for key, item in dict(value).items() if key in known}
    if not values.get("options") and find_family(values["id"]).options is not None:
        for key, item in dict(value).items():
            if key not in known and (is_dataclass(item) or isinstance(item, Mapping)):
                values["options"] = asdict(item) if is_dataclass(item) else dict(item)
    return EnvConfig(**values)


def make_env(config: EnvConfig, seed: int = 0, env_index: int = 0) -> gymnasium.Env:
    """Build the env `config` names, with a Discrete action space.

    Observations are `[frame_stack * (1 or 3), screen_size, screen_size] uint8` for image envs and
    `[D] float32` for vector envs. The env has been reset once with `seed` and its action space
    seeded, so the plain `reset()` calls that follow are reproducible from `seed`. `env_index`, the
    env's number among all the run's envs, picks its first state when `config.retro_state` is a list.
    """
    family = find_family(config.id)
    family_options(family, config.options)  # refuses settings the family does not take
    if config.retro_state_balance not in RotateStates.BALANCES:
        raise EnvConfigError(
            f"Unknown retro_state_balance '{config.retro_state_balance}': use episodes (each state "
            "in turn) or frames (each episode on the state least played)."
        )
    env = family.make(config, env_index)
    env.action_space.seed(seed)
    env.reset(seed=seed)
    return env


def env_frames_per_step(config: EnvConfig) -> int:
    """Env frames per agent step: the frame skip for image envs, 1 for vector envs."""
    return find_family(config.id).frames_per_step(config)


def skip_frames_and_limit_steps(
    env: gymnasium.Env, config: EnvConfig, default_max_episode_steps: int | None = None
) -> gymnasium.Env:
    """Repeat each action `frame_skip` frames (max over the last two), limit agent steps (to the
    game's default when the config sets none), and record episode statistics."""
    # MaxAndSkipObservation refuses a skip of 1, which needs no wrapper anyway.
    if config.frame_skip > 1:
        env = MaxAndSkipObservation(env, skip=config.frame_skip)
    max_episode_steps = config.max_episode_steps
    if max_episode_steps is None:
        max_episode_steps = default_max_episode_steps
    if max_episode_steps is not None:
        env = TimeLimit(env, max_episode_steps=max_episode_steps)
    # Beneath episodic life, so info["episode"] reports whole games (return, agent steps).
    return RecordEpisodeStatistics(env)


def stack_frames(env: gymnasium.Env, config: EnvConfig) -> gymnasium.Env:
    """Frames `[H, W]` or `[H, W, 3]` to `[frame_stack * (1 or 3), screen_size, screen_size]`."""
    # Resizing first makes the RGB-to-gray conversion ~10x cheaper on 320x224 retro frames.
    env = ResizeFrame(env, config.screen_size)
    if config.grayscale and len(env.observation_space.shape) == 3:
        env = GrayscaleObservation(env)
    if len(env.observation_space.shape) == 2:
        return FrameStackObservation(env, config.frame_stack)
    env = FrameStackObservation(ChannelsFirst(env), config.frame_stack)
    stacked, channels, height, width = env.observation_space.shape
    return ReshapeObservation(env, (stacked * channels, height, width))
