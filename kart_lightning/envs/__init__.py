"""Environments: one factory builds every game from an EnvConfig through the family registry.

Import from here: `from kart_lightning.envs import EnvConfig, make_env`. Each sub-package is a
game family's folder and registers itself (see registry.py).
"""

# The built-in families register themselves on import.
from kart_lightning.envs import atari, retro, vector  # noqa: F401
from kart_lightning.envs.factory import EnvConfig, env_config_from_dict, env_frames_per_step, make_env
from kart_lightning.envs.registry import (
    EnvConfigError,
    EnvFamily,
    UnknownEnvError,
    family_options,
    find_family,
    register_env_family,
    registered_families,
)
from kart_lightning.envs.retro import retro_state_names

__all__ = [
    "EnvConfig",
    "EnvConfigError",
    "EnvFamily",
    "UnknownEnvError",
    "env_config_from_dict",
    "env_frames_per_step",
    "family_options",
    "find_family",
    "make_env",
    "register_env_family",
    "registered_families",
    "retro_state_names",
]
