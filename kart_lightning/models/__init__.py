"""Networks for the IMPALA learner and actors, and the scripted policy as bytes."""

from kart_lightning.models.actor_critic import ActorCritic
from kart_lightning.models.scripting import load_script, script_bytes

__all__ = ["ActorCritic", "load_script", "script_bytes"]
