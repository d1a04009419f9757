"""gymnasium envs with vector observations and discrete actions (CartPole-v1, Acrobot-v1, ...)."""

import gymnasium
import numpy as np
from gymnasium.spaces import Box, Discrete
from gymnasium.wrappers import DtypeObservation, RecordEpisodeStatistics

from kart_lightning.envs.atari import is_atari_game
from kart_lightning.envs.factory import EnvConfig
from kart_lightning.envs.registry import EnvConfigError, EnvFamily, register_env_family


def is_vector_env(env_id: str) -> bool:
    return env_id in gymnasium.registry and not is_atari_game(env_id)


def make_vector(config: EnvConfig, env_index: int) -> gymnasium.Env:
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


register_env_family(EnvFamily(
    name="gymnasium",
    matches=is_vector_env,
    make=make_vector,
    frames_per_step=lambda config: 1,
    known_ids=lambda: [env_id for env_id in gymnasium.registry if not is_atari_game(env_id)],
))
