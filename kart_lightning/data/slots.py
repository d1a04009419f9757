"""Who holds each rollout slot, as a state per slot in shared memory.

No locks and no queues: a killed actor cannot wedge the learner or the other actors.
"""

import os
import time

import torch

FREE, FILLING, FULL, LEARNING = 0, 1, 2, 3
ACTOR_POLL_S = 0.001
PARENT_CHECK_S = 1.0


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
                if os.getppid() != parent_pid:
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
