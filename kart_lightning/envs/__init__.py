"""Environments: one factory builds every game from an EnvConfig, plus its generic wrappers.

Import from here: `from kart_lightning.envs import EnvConfig, make_env`.
"""

from kart_lightning.envs.factory import (
    EnvConfig,
    EnvConfigError,
    EnvKind,
    UnknownEnvError,
    check_env_id,
    env_frames_per_step,
    make_env,
    retro_state_names,
)
from kart_lightning.envs.mario_kart.config import MarioKartConfig
from kart_lightning.envs.wrappers import ChannelsFirst, CropRows, EpisodicLife, NoopReset, ResizeFrame

__all__ = [
    "ChannelsFirst",
    "CropRows",
    "EnvConfig",
    "EnvConfigError",
    "EnvKind",
    "EpisodicLife",
    "MarioKartConfig",
    "NoopReset",
    "ResizeFrame",
    "UnknownEnvError",
    "check_env_id",
    "env_frames_per_step",
    "make_env",
    "retro_state_names",
]
