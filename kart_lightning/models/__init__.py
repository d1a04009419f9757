"""Networks for the IMPALA learner and actors."""

from kart_lightning.models.actor_critic import ActorCritic

__all__ = ["ActorCritic"]
