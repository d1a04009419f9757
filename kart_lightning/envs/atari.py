"""Atari 2600 games through ALE (`ALE/Pong-v5`), with the DeepMind preprocessing."""

import ale_py
import gymnasium

from kart_lightning.envs.factory import EnvConfig, skip_frames_and_limit_steps, stack_frames
from kart_lightning.envs.registry import EnvFamily, register_env_family
from kart_lightning.envs.wrappers import EpisodicLife, NoopReset

gymnasium.register_envs(ale_py)
# ALE prints a banner to stderr for every game it loads, in every actor: errors only.
ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)

ALE_ENTRY_POINT = "ale_py.env:AtariEnv"


def is_atari_game(env_id: str) -> bool:
    return env_id in gymnasium.registry and gymnasium.registry[env_id].entry_point == ALE_ENTRY_POINT


def make_atari(config: EnvConfig, env_index: int) -> gymnasium.Env:
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
    env = skip_frames_and_limit_steps(env, config)
    if config.episodic_life:
        # Outside the time limit, so the limit counts a whole game rather than one life.
        env = EpisodicLife(env)
    return stack_frames(env, config)


def _action_names(config: EnvConfig) -> dict[str, int]:
    env = gymnasium.make(config.id)
    try:
        return {name: index for index, name in enumerate(env.unwrapped.get_action_meanings())}
    finally:
        env.close()


register_env_family(EnvFamily(
    name="atari",
    matches=is_atari_game,
    make=make_atari,
    action_names=_action_names,
    known_ids=lambda: [env_id for env_id in gymnasium.registry if is_atari_game(env_id)],
))
