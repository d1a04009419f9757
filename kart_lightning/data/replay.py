"""Experience replay: recent unrolls kept in the learner's host memory and mixed into its batches.

Each learner batch of B unrolls holds B_fresh unrolls the actors just wrote and B - B_fresh
replayed ones, B_fresh = round(B / (1 + ratio)), so `ratio` is replayed unrolls per fresh one and
every emulated frame is learnt from about 1 + ratio times. V-trace corrects for the older
policies that acted; the module's trust region (`model.trust_region_kl`, LASER, Schmitt et al.
2019) leaves out unrolls whose acting policy has drifted too far. Replayed frames are not env
frames: the frame budget, the lr schedule and frames/s count fresh ones only.

With `sampling: advantage` the unrolls that went better than the value expected are replayed more
often, as self-imitation learning replays its good episodes (Oh et al. 2018, "Self-Imitation
Learning"): each unroll's priority is its mean positive V-trace advantage, max(v_s - V(x_s), 0)
over its steps, from the last batch that learnt from it (its fresh one first), and its chance is
(priority + the buffer's mean priority) ** priority_exponent, so one that went no better than
expected keeps a share. As in self-imitation, replayed unrolls are not weighted back to uniform.

`self_imitation: K` keeps the draw uniform and adds self-imitation learning as its own term: K of
each batch's replayed unrolls are drawn by advantage as above and the module learns from them by
the self-imitation loss alone (the actions whose return beat the value, ImpalaModule's
`self_imitation_value_cost`), so the V-trace loss still sees an unskewed sample.
"""

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from kart_lightning.errors import ConfigError

GIB = 2**30


@dataclass(frozen=True)
class ReplayConfig:
    """`data.replay`: experience replay in the learner (off when `ratio` is 0).

    Args:
        ratio: Replayed unrolls per fresh one in each learner batch (0: no replay). The batch
            keeps `data.batch_size` unrolls, round(batch_size / (1 + ratio)) of them fresh.
        capacity: Unrolls kept; the oldest is dropped for each new one once full.
        capacity_gib: The same limit in GiB of host memory; when set, it decides the capacity.
        sampling: uniform over the buffer; recent: an unroll's chance halves every `half_life`
            newer unrolls (prioritised by recency); advantage: unrolls that went better than the
            value expected more often (prioritised by advantage, see above).
        half_life: For recent sampling, in unrolls; default capacity / 4.
        priority_exponent: For advantage sampling: how strongly the priority skews the draw
            (0: uniform).
        self_imitation: Replayed unrolls per batch drawn by advantage (whatever `sampling` is)
            and learnt by the self-imitation loss alone (0: none); at most the replayed unrolls
            of a batch.
    """

    ratio: float = 0.0
    capacity: int = 1000
    capacity_gib: float | None = None
    sampling: Literal["uniform", "recent", "advantage"] = "uniform"
    half_life: int | None = None
    priority_exponent: float = 1.0
    self_imitation: int = 0


def split_batch(batch_size: int, ratio: float) -> tuple[int, int]:
    """(fresh, replayed) unrolls of a learner batch of `batch_size` at replay `ratio`."""
    if ratio < 0 or not math.isfinite(ratio):
        raise ConfigError(f"data.replay.ratio is {ratio}: set it to 0 (no replay) or more.")
    if ratio == 0:
        return batch_size, 0
    if batch_size < 2:
        raise ConfigError(
            f"data.replay.ratio {ratio} needs room for replayed unrolls beside fresh ones: raise data.batch_size to 2 "
            "or more."
        )
    fresh = max(1, round(batch_size / (1 + ratio)))
    if fresh == batch_size:
        raise ConfigError(
            f"data.replay.ratio {ratio} leaves no replayed unroll in a batch of {batch_size}: raise it to at "
            f"least {1 / (batch_size - 1):.3g}, or raise data.batch_size."
        )
    return fresh, batch_size - fresh


def slot_bytes(buffers: Mapping[str, torch.Tensor]) -> int:
    """Bytes of one unroll in the rollout buffers (one slot of each field)."""
    return sum(buffer[0].numel() * buffer.element_size() for buffer in buffers.values())


class ReplayBuffer:
    """A ring of the last `capacity` unrolls, laid out like the actors' rollout slots
    ([capacity, *slot shape] per field) in this process's memory.

    `add` copies the columns of a learner batch in, so what it holds is the learner's own copy
    and no actor ever writes it; `sample` copies unrolls out as a time-major batch. Each unroll
    is known by its id, the count of unrolls added before it, which `update_priorities` takes.
    """

    def __init__(
        self,
        template: Mapping[str, torch.Tensor],
        config: ReplayConfig,
        seed: int = 0,
        least: int = 1,
    ) -> None:
        """`template`: the actors' rollout buffers, [slots, *slot shape] per field; `least`: the
        fewest unrolls it may hold (a learner batch: replay starts once it holds one)."""
        per_unroll = slot_bytes(template)
        capacity = config.capacity
        if config.capacity_gib is not None:
            capacity = int(config.capacity_gib * GIB // per_unroll)
        if capacity < least:
            setting = "capacity_gib" if config.capacity_gib is not None else "capacity"
            raise ConfigError(
                f"data.replay.{setting} keeps {capacity} unrolls ({per_unroll / 2**20:.2f} MiB each), fewer than a "
                f"batch of {least}: raise data.replay.{setting}."
            )
        if config.half_life is not None and config.half_life < 1:
            raise ConfigError(f"data.replay.half_life is {config.half_life}: set it to 1 or more (unrolls).")
        if not config.priority_exponent >= 0:
            raise ConfigError(
                f"data.replay.priority_exponent is {config.priority_exponent}: set it to 0 (uniform) or more."
            )
        self.capacity = capacity
        self.sampling = config.sampling
        self.half_life = config.half_life or max(1, capacity // 4)
        self.priority_exponent = config.priority_exponent
        self.self_imitation = config.self_imitation
        self.priority = torch.zeros(capacity, dtype=torch.float64)
        # torch.empty: memory is taken as unrolls arrive, never more than `capacity` of them.
        self.storage = {name: torch.empty((capacity, *buffer.shape[1:]), dtype=buffer.dtype)
                        for name, buffer in template.items()}
        self.nbytes = capacity * per_unroll
        self.added = 0
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return min(self.added, self.capacity)

    def add(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Copy every unroll of a time-major batch ([T+1, B, ...] per field, [B, ...] per slot
        field) in, replacing the oldest once full; returns their ids, [B] int64. They start with
        the buffer's mean priority until a batch has learnt from them."""
        count = batch["reward"].shape[1]
        ids = torch.arange(self.added, self.added + count)
        rows = ids % self.capacity
        for name, stored in self.storage.items():
            values = batch[name]
            stored[rows] = values if stored.dim() == 1 else values.movedim(1, 0)
        self.priority[rows] = self.priority[:len(self)].mean() if len(self) else 0.0
        self.added += count
        return ids

    @property
    def keeps_priorities(self) -> bool:
        """Whether draws by advantage need the learner's priorities."""
        return self.sampling == "advantage" or self.self_imitation > 0

    def update_priorities(self, ids: torch.Tensor, priorities: torch.Tensor) -> None:
        """Set the priority of the unrolls `ids` [N] still held to `priorities` [N] (see
        `sampling: advantage` and `self_imitation`); ids whose rows newer unrolls have taken are passed over."""
        held = ids >= self.added - self.capacity
        self.priority[ids[held] % self.capacity] = priorities[held].to(self.priority.dtype)

    def sample(self, count: int, by_advantage: bool = False) -> dict[str, torch.Tensor]:
        """`count` stored unrolls (with replacement), as a time-major batch like `stack_slots`',
        with their ids as `replay_id` [count]; drawn as `sampling` says, or by advantage."""
        size = len(self)
        if size == 0:
            raise RuntimeError("the replay buffer is empty")
        if self.sampling == "recent" and not by_advantage:
            ages = torch.arange(size, dtype=torch.float64)
            ages_to_rows = (self.added - 1 - torch.arange(size)) % self.capacity
            weights = torch.pow(0.5, ages / self.half_life)
            rows = ages_to_rows[torch.multinomial(weights, count, replacement=True, generator=self.generator)]
        elif (by_advantage or self.sampling == "advantage") and self.priority[:size].sum() > 0:
            priority = self.priority[:size]
            weights = (priority + priority.mean()).pow(self.priority_exponent)
            rows = torch.multinomial(weights, count, replacement=True, generator=self.generator)
        else:
            rows = torch.randint(size, (count,), generator=self.generator)
        # A row holds the unroll added last of those that map to it.
        newest_row = (self.added - 1) % self.capacity
        ids = self.added - 1 - (newest_row - rows) % self.capacity
        return {
            **{name: stored[rows] if stored.dim() == 1 else stored[rows].movedim(0, 1)
               for name, stored in self.storage.items()},
            "replay_id": ids,
        }
