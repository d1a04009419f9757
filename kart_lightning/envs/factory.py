"""One env factory for every game kart_lightning trains on, selected by the config's id.

ALE and stable-retro games give stacked uint8 frames; other gymnasium envs float32 vectors.
"""

import difflib
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import ale_py
import gymnasium
import numpy as np
import stable_retro
from gymnasium.spaces import Box, Discrete
from gymnasium.wrappers import (
    DtypeObservation,
    FrameStackObservation,
    GrayscaleObservation,
    MaxAndSkipObservation,
    RecordEpisodeStatistics,
    ReshapeObservation,
    TimeLimit,
)

# Importing the package registers the Super Mario Kart integration, so its id is known here.
from kart_lightning.envs import mario_kart
from kart_lightning.envs.mario_kart.actions import ACTION_SETS, discrete_actions
from kart_lightning.envs.mario_kart.config import MarioKartConfig
from kart_lightning.envs.mario_kart.game import DRIVER_VIEW_ROWS, RACE_FRAME_LIMIT, RACE_LAPS
from kart_lightning.envs.mario_kart.reward import RaceRewardWrapper
from kart_lightning.envs.wrappers import (
    ChannelsFirst,
    CropRows,
    EpisodicLife,
    NoopReset,
    ResizeFrame,
    RotateStates,
)
from kart_lightning.errors import ConfigError

gymnasium.register_envs(ale_py)

EnvKind = Literal["atari", "retro", "gymnasium"]

# ALL also covers contrib, experimental and custom integrations (such as our Mario Kart folder).
_RETRO_INTEGRATIONS = stable_retro.data.Integrations.ALL
_ATARI_ENTRY_POINT = "ale_py.env:AtariEnv"


class EnvConfigError(ConfigError):
    """A user's env config names something that cannot be built; the message names the fix."""


class UnknownEnvError(EnvConfigError):
    """The env id is neither a gymnasium id, an ALE id nor a stable-retro game."""


@dataclass
class EnvConfig:
    """Which game to play and how its observations are preprocessed.

    Args:
        id: gymnasium id (CartPole-v1), ALE id (ALE/Pong-v5) or retro game (Airstriker-Genesis-v0).
        frame_skip: env frames per agent step for image envs (max over the last two); 1 for vectors.
        frame_stack: number of most recent frames stacked along the channel axis.
        screen_size: frames are resized to screen_size x screen_size pixels.
        grayscale: one channel per frame instead of three (RGB).
        noop_max: Atari: at reset, take a random 1..noop_max no-op actions (0 turns this off).
        episodic_life: Atari: a lost life terminates the episode; only game over resets the game.
        max_episode_steps: agent steps before an episode is truncated; None: the env's own limit
            (Super Mario Kart: 18,000 frames, 4,500 steps at frame_skip 4).
        retro_state: stable-retro state name or .state file path; None is the game's default state.
            A list is played in turn: env number i starts from state i % len(list) and each of its
            episodes after that from the next state in the list, so all are played by any number of envs.
        render_mode: None for training; 'rgb_array' lets a recorder call env.render().
        mario_kart: Super Mario Kart's actions, view, reward and episode ends; other games ignore it.
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
    render_mode: str | None = None
    mario_kart: MarioKartConfig = field(default_factory=MarioKartConfig)


def env_config_from_dict(value: "EnvConfig | dict[str, Any]") -> EnvConfig:
    """An EnvConfig from its dict form (as a checkpoint's datamodule hyperparameters hold it)."""
    if isinstance(value, EnvConfig):
        return value
    fields = dict(value)
    kart = fields.pop("mario_kart", None)
    if kart is not None and not isinstance(kart, MarioKartConfig):
        kart = MarioKartConfig(**dict(kart))
    return EnvConfig(**fields, **({"mario_kart": kart} if kart is not None else {}))


def check_env_id(env_id: str) -> EnvKind:
    """Which kind of env `env_id` names, found without building it; UnknownEnvError if none."""
    if env_id in gymnasium.registry:
        if gymnasium.registry[env_id].entry_point == _ATARI_ENTRY_POINT:
            return "atari"
        return "gymnasium"
    if stable_retro.data.get_file_path(env_id, "rom.sha", _RETRO_INTEGRATIONS):
        return "retro"
    known = [*gymnasium.registry, *stable_retro.data.list_games(_RETRO_INTEGRATIONS)]
    close = difflib.get_close_matches(env_id, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise UnknownEnvError(
        f"Unknown env id '{env_id}'{hint}: use a gymnasium id such as CartPole-v1, an ALE id "
        "such as ALE/Pong-v5, or a stable-retro game such as Airstriker-Genesis-v0 (see "
        '`python -c "import stable_retro; print(stable_retro.data.list_games())"`).'
    )


def env_frames_per_step(config: EnvConfig) -> int:
    """Env frames per agent step: the frame skip for image envs, 1 for vector envs."""
    return 1 if check_env_id(config.id) == "gymnasium" else config.frame_skip


def make_env(config: EnvConfig, seed: int = 0, env_index: int = 0) -> gymnasium.Env:
    """Build the env `config` names, with a Discrete action space.

    Observations are `[frame_stack * (1 or 3), screen_size, screen_size] uint8` for image envs and
    `[D] float32` for vector envs. The env has been reset once with `seed` and its action space
    seeded, so the plain `reset()` calls that follow are reproducible from `seed`. `env_index`, the
    env's number among all the run's envs, picks its first state when `config.retro_state` is a list.
    """
    kind = check_env_id(config.id)
    if kind == "atari":
        env = _make_atari(config)
    elif kind == "retro":
        env = _make_retro(config, env_index)
    else:
        env = _make_vector(config)
    env.action_space.seed(seed)
    env.reset(seed=seed)
    return env


def _make_atari(config: EnvConfig) -> gymnasium.Env:
    # DeepMind preprocessing: we skip frames ourselves (max-pooled), no sticky actions, and the
    # emulator's own grayscale is much cheaper than converting RGB.
    env = gymnasium.make(
        config.id,
        frameskip=1,
        repeat_action_probability=0.0,
        full_action_space=False,
        obs_type="grayscale" if config.grayscale else "rgb",
        render_mode=config.render_mode,
    )
    if config.noop_max > 0:
        env = NoopReset(env, config.noop_max)
    env = _skip_frames_and_limit_steps(env, config)
    if config.episodic_life:
        # Outside the time limit, so the limit counts a whole game rather than one life.
        env = EpisodicLife(env)
    return _stack_frames(env, config)


def _make_retro(config: EnvConfig, env_index: int) -> gymnasium.Env:
    if config.id == mario_kart.GAME:
        _check_mario_kart_config(config.mario_kart)
        _prepare_mario_kart(config)
    try:
        stable_retro.data.get_romfile_path(config.id, _RETRO_INTEGRATIONS)
    except FileNotFoundError:
        raise EnvConfigError(
            f"The ROM for '{config.id}' is not imported: run `python -m stable_retro.import DIR` "
            "on the folder that holds it."
        ) from None
    if config.id == mario_kart.GAME:
        return _make_mario_kart(config, env_index)
    env = _open_emulator(config, env_index, stable_retro.Actions.DISCRETE)
    env = _skip_frames_and_limit_steps(env, config)
    return _stack_frames(env, config)


def _open_emulator(config: EnvConfig, env_index: int, actions: stable_retro.Actions) -> gymnasium.Env:
    """The bare stable-retro env of `config`, at its state for env `env_index`; with several
    states, each episode starts from the next (RotateStates)."""
    env = stable_retro.make(
        config.id,
        state=_retro_state(config, env_index),
        inttype=_RETRO_INTEGRATIONS,
        render_mode=config.render_mode,
        use_restricted_actions=actions,
    )
    count = len(retro_state_names(config))
    if count < 2:
        return env
    states = []
    for index in range(count):
        # load_state reads and decompresses a state file into initial_state, as make did.
        env.unwrapped.load_state(_retro_state(config, index), _RETRO_INTEGRATIONS)
        states.append(env.unwrapped.initial_state)
    return RotateStates(env, states, first=env_index)


def _check_mario_kart_config(kart: MarioKartConfig) -> None:
    """One sentence naming the fix for a MarioKartConfig value that cannot be built, before any emulation."""
    if kart.actions not in ACTION_SETS:
        raise EnvConfigError(
            f"Unknown Super Mario Kart action set '{kart.actions}': use one of {', '.join(ACTION_SETS)}."
        )
    if kart.view not in ("driver", "full"):
        raise EnvConfigError(f"Unknown Super Mario Kart view '{kart.view}': use 'driver' or 'full'.")
    if not 1 <= kart.laps <= RACE_LAPS:
        raise EnvConfigError(f"mario_kart.laps is {kart.laps}: set it to 1 to {RACE_LAPS}, the race's laps.")
    if kart.stall_steps is not None and kart.stall_steps < 1:
        raise EnvConfigError(
            f"mario_kart.stall_steps is {kart.stall_steps}: set it to 1 or more, or null to never cut a race."
        )


def _prepare_mario_kart(config: EnvConfig) -> None:
    """The user's ROM must be imported (one sentence naming the command if not), and the track
    states are made from it on first use."""
    # Imported here: the state maker pulls in Pillow and the menu tables, which other games never need.
    from kart_lightning.envs.mario_kart.import_rom import require_rom
    from kart_lightning.envs.mario_kart.states import make_states

    require_rom()
    names = retro_state_names(config) or [mario_kart.DEFAULT_STATE]
    # All at once: the maker boots an emulator, which is only possible before this process's first env.
    make_states([name.removesuffix(".state") for name in names if not os.path.isfile(name)])


def _make_mario_kart(config: EnvConfig, env_index: int) -> gymnasium.Env:
    """Super Mario Kart with MarioKartConfig's actions, RAM reward, episode ends and view."""
    kart = config.mario_kart
    env = _open_emulator(config, env_index, stable_retro.Actions.ALL)
    env = discrete_actions(env, kart.actions)
    # Beneath the frame skip, so that the reward sees every frame's RAM (see RaceRewardWrapper).
    env = RaceRewardWrapper(env, kart, frames_per_step=config.frame_skip)
    env = _skip_frames_and_limit_steps(env, config, math.ceil(RACE_FRAME_LIMIT / config.frame_skip))
    if kart.view == "driver":
        # After the max-pool: one crop per agent step rather than one per frame.
        env = CropRows(env, *DRIVER_VIEW_ROWS)
    return _stack_frames(env, config)


def retro_state_names(config: EnvConfig) -> list[str]:
    """The states `config.retro_state` names, as a list (empty for the game's default state)."""
    if config.retro_state is None:
        return []
    names = [config.retro_state] if isinstance(config.retro_state, str) else list(config.retro_state)
    if not names:
        raise EnvConfigError("retro_state is an empty list: name at least one state, or leave it unset.")
    return names


def _retro_state(config: EnvConfig, env_index: int) -> object:
    """The `state` argument for stable_retro.make: a state name, an absolute path, or DEFAULT."""
    names = retro_state_names(config)
    if not names:
        return stable_retro.State.DEFAULT
    # Env i starts from state i; RotateStates moves it on to the next state each episode.
    state = names[env_index % len(names)]
    if os.path.isfile(state):
        # stable-retro looks names up inside the integration folder; an absolute path escapes it.
        return os.path.abspath(state)
    file_name = state.removesuffix(".state") + ".state"
    if stable_retro.data.get_file_path(config.id, file_name, _RETRO_INTEGRATIONS) is None:
        states = stable_retro.data.list_states(config.id, _RETRO_INTEGRATIONS)
        raise EnvConfigError(
            f"Unknown state '{state}' for '{config.id}': use one of {states}, a path "
            "to a .state file, or leave retro_state unset for the game's default."
        )
    return state


def _make_vector(config: EnvConfig) -> gymnasium.Env:
    # gymnasium.make keeps the registered time limit when max_episode_steps is None.
    env = gymnasium.make(
        config.id, max_episode_steps=config.max_episode_steps, render_mode=config.render_mode
    )
    if not isinstance(env.action_space, Discrete):
        env.close()
        raise EnvConfigError(
            f"'{config.id}' has a {env.action_space} action space: choose an env with Discrete "
            "actions, such as CartPole-v1."
        )
    if not (isinstance(env.observation_space, Box) and len(env.observation_space.shape) == 1):
        env.close()
        raise EnvConfigError(
            f"'{config.id}' has a {env.observation_space} observation space: choose an env with "
            "vector observations, such as CartPole-v1, or an ALE or stable-retro game for images."
        )
    if env.observation_space.dtype != np.float32:
        env = DtypeObservation(env, np.float32)
    return RecordEpisodeStatistics(env)


def _skip_frames_and_limit_steps(
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


def _stack_frames(env: gymnasium.Env, config: EnvConfig) -> gymnasium.Env:
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
