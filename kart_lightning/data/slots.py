"""Who holds each rollout slot, as a state per slot in shared memory.

No locks and no queues: a killed actor cannot wedge the learner or the other actors.
"""

import math
import time

import torch

from kart_lightning.processes import parent_alive

FREE, FILLING, FULL, LEARNING = 0, 1, 2, 3
ACTOR_POLL_S = 0.001
PARENT_CHECK_S = 1.0


def least_slots_per_env(num_envs: int, batch_size: int) -> int:
    """The fewest slots per env with which `num_envs` envs can always complete a batch of
    `batch_size`: while the learner waits, the FULL slots of every env that waits for a free one
    already make a batch (each env fills one slot at a time, and holds the rest FULL)."""
    return 1 + math.ceil((batch_size - 1) / num_envs)


def default_slots_per_env(num_envs: int, batch_size: int) -> int:
    """One more than the least, so actors keep acting while the learner copies a batch out."""
    return least_slots_per_env(num_envs, batch_size) + 1


class ParentGone(Exception):
    """The learner process died; the actor has nobody to work for."""


class SlotBoard:
    """Slot states for N actors owning `slots_per_actor` slots each (actor i owns a fixed range).

    Each transition has one writer: the owning actor moves FREE -> FILLING -> FULL, the learner
    FULL -> LEARNING -> FREE, and the pool moves a dead actor's FILLING slots back to FREE.
    """

    def __init__(self, num_actors: int, slots_per_actor: int) -> None:
        self.slots_per_actor = slots_per_actor
        num_slots = num_actors * slots_per_actor
        self.state = torch.zeros(num_slots, dtype=torch.int8).share_memory_()
        # When each slot became FULL: the learner takes the oldest first, so no actor starves.
        self.filled_ns = torch.zeros(num_slots, dtype=torch.int64).share_memory_()

    @property
    def num_slots(self) -> int:
        return self.state.numel()

    def owned(self, actor: int) -> slice:
        return slice(actor * self.slots_per_actor, (actor + 1) * self.slots_per_actor)

    def acquire(self, actor: int, count: int, parent_pid: int) -> torch.Tensor:
        """Actor side: wait for `count` FREE slots of this actor and mark them FILLING."""
        owned = self.owned(actor)
        next_parent_check = time.monotonic() + PARENT_CHECK_S
        while True:
            free = (self.state[owned] == FREE).nonzero().flatten()
            if free.numel() >= count:
                slots = free[:count] + owned.start
                self.state[slots] = FILLING
                return slots
            time.sleep(ACTOR_POLL_S)
            if time.monotonic() > next_parent_check:
                if not parent_alive(parent_pid):
                    raise ParentGone
                next_parent_check = time.monotonic() + PARENT_CHECK_S

    def mark_full(self, slots: torch.Tensor) -> None:
        """Actor side: the slots' data is written; stamp, then publish."""
        self.filled_ns[slots] = time.monotonic_ns()
        self.state[slots] = FULL

    def take_oldest_full(self, count: int) -> list[int] | None:
        """Learner side: the `count` oldest FULL slots, now LEARNING; None if fewer are ready."""
        full = (self.state == FULL).nonzero().flatten()
        if full.numel() < count:
            return None
        oldest = full[self.filled_ns[full].argsort()[:count]]
        self.state[oldest] = LEARNING
        return oldest.tolist()

    def release(self, slots: list[int]) -> None:
        """Learner side: the batch is copied out; actors may refill these slots."""
        self.state[slots] = FREE

    def recycle(self, actor: int) -> int:
        """Pool side, after `actor` died: its half-written slots become FREE. Returns how many."""
        owned = self.state[self.owned(actor)]
        filling = owned == FILLING
        owned[filling] = FREE
        return int(filling.sum())

    def count(self, state: int) -> int:
        return int((self.state == state).sum())
