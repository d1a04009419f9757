"""Temporally-extended ε-greedy in the actors (εz-greedy, Dabney et al. 2021): now and then an env
holds one random action for a random number of steps, and the behaviour logits say so for V-trace.

A policy that has settled on the wrong action at one place (a jump it never gets over) seldom
tries the right one there for long enough; a random action held for n steps, n drawn from a
zeta distribution (P(n) ∝ n^-exponent, mostly short, sometimes long), does. The logits an actor
writes are those of the distribution it drew from (given its hold counter, which the policy does
not see), so V-trace weighs each action by the probability it was taken with:
outside a hold, log((1 - ε) π + ε / A) (a hold may start with any action); inside one, the held
action with probability 1.
"""

import math
from dataclasses import dataclass

import torch

from kart_lightning.errors import ConfigError

HELD_LOGIT_GAP = 30.0
"""Inside a hold the behaviour logits are 0 for the held action and -30 for the others: a
probability of 1 - 1e-12 for it, finite in every dtype the learner reads them in."""


@dataclass(frozen=True)
class ExplorationConfig:
    """`data.exploration`: εz-greedy in the actors (off when `epsilon` is 0).

    Args:
        epsilon: Each agent step outside a hold, the chance that a hold starts (with an action
            drawn uniformly, the policy's own among them).
        max_steps: The longest hold, in agent steps.
        exponent: Holds last n steps with probability ∝ n^-exponent (2: the paper's).
    """

    epsilon: float = 0.0
    max_steps: int = 100
    exponent: float = 2.0

    def check(self) -> None:
        if not 0.0 <= self.epsilon <= 1.0 or not math.isfinite(self.epsilon):
            raise ConfigError(f"data.exploration.epsilon is {self.epsilon}: set it from 0 (off) to 1.")
        if self.max_steps < 1:
            raise ConfigError(f"data.exploration.max_steps is {self.max_steps}: set it to 1 or more.")
        if not self.exponent > 0.0 or not math.isfinite(self.exponent):
            raise ConfigError(f"data.exploration.exponent is {self.exponent}: set it above 0 (2 is the paper's).")


NO_EXPLORATION = ExplorationConfig()


class HeldActions:
    """The holds of n envs stepped together: given the policy's actions and logits for a step,
    the actions taken and the logits of the distribution they were drawn from.

    Draws come from torch's default generator, which each actor seeds as its own.
    """

    def __init__(self, config: ExplorationConfig, num_envs: int) -> None:
        self.epsilon = config.epsilon
        steps = torch.arange(1, config.max_steps + 1, dtype=torch.float64)
        self.duration_probs = steps.pow(-config.exponent)
        self.remaining = torch.zeros(num_envs, dtype=torch.int64)
        """Steps each env's hold goes on for after the last one taken (0: not holding)."""
        self.held = torch.zeros(num_envs, dtype=torch.int64)

    def __call__(self, action: torch.Tensor, logits: torch.Tensor, done: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Actions [n] int64 and behaviour logits [n, A] float32 for a step whose policy output is
        `action` [n] and `logits` [n, A]; `done` [n] bool marks envs whose episode just began
        (a hold does not cross into the next episode)."""
        if self.epsilon == 0.0:
            return action, logits
        num_envs, num_actions = logits.shape
        self.remaining[done] = 0
        continuing = self.remaining > 0
        starts = ~continuing & (torch.rand(num_envs) < self.epsilon)
        if starts.any():
            count = int(starts.sum())
            self.held[starts] = torch.randint(num_actions, (count,))
            # Index k draws a hold of k + 1 steps: this one and k more.
            self.remaining[starts] = torch.multinomial(self.duration_probs, count, replacement=True)
        # A step outside a hold (one that starts a hold too) was drawn from the mixture.
        mixture = (1.0 - self.epsilon) * torch.softmax(logits.float(), dim=-1) + self.epsilon / num_actions
        held_logits = torch.full_like(mixture, -HELD_LOGIT_GAP).scatter_(1, self.held[:, None], 0.0)
        behaviour = torch.where(continuing[:, None], held_logits, mixture.log())
        taken = torch.where(continuing | starts, self.held, action)
        self.remaining[continuing] -= 1
        return taken, behaviour
