"""Super Mario Kart (SNES): our stable-retro integration, ROM import, track states and reward.

Importing this package registers the integration with stable-retro (see NOTES.md for the RAM map).
"""

from kart_lightning.envs.mario_kart.paths import GAME, register_integration

# The state stable-retro loads when none is named (metadata.json's default_state).
DEFAULT_STATE = "MarioCircuit.Act1"

register_integration()

__all__ = ["DEFAULT_STATE", "GAME", "register_integration"]
