"""Super Mario Kart (SNES): our stable-retro integration, ROM import, track states and reward.

Importing this package registers the integration with stable-retro (see NOTES.md for the RAM map)
and the game family with kart_lightning's env registry (family.py).
"""

from kart_lightning.envs.mario_kart.paths import GAME, register_integration

register_integration()

from kart_lightning.envs.mario_kart.family import DEFAULT_STATE, FAMILY

__all__ = ["DEFAULT_STATE", "FAMILY", "GAME", "register_integration"]
