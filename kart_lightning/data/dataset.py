"""Datasets the Trainer iterates: learner batches from the actor pool, and evaluation episodes
played in-process by the current policy."""

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import IterableDataset

from kart_lightning.data.pool import ActorPool
from kart_lightning.data.replay import ReplayBuffer
from kart_lightning.data.rollout import empty_batch
from kart_lightning.envs import EnvConfig
from kart_lightning.evaluation import held_out_envs, play_tracks


class TrajectoryDataset(IterableDataset):
    """Endless learner batches: dicts of time-major [T+1, B, ...] tensors (see `rollout_spec`),
    plus `replayed` [B] bool (which unrolls came from the replay buffer), `env_frames` (the
    fresh env frames in the batch) and `pool_stats`.

    It has no `__len__`: a run is bounded by frames, not epochs. Lightning takes each batch one
    step ahead of training it, so when a run stops, the batch it took last is dropped untrained;
    its frames were never counted (the module counts the frames it trains on), so budgets and
    frames/s stay exact. With `pin_memory` batches are written into a few rotating pinned buffers,
    so frames are copied once on the host and the copy to the GPU is asynchronous. Weights flow
    the other way, from the learner's step (see WeightPublisher).

    With `replay`, each batch is the pool's fresh unrolls followed by `replay_count` unrolls
    drawn from the buffer (once it holds a batch's worth), and the fresh ones then join it;
    `replay_id` [B] names each in the buffer (for `ReplayBuffer.update_priorities`); with
    `replay.self_imitation`, `self_imitation` [B] bool marks the unrolls drawn by advantage for the
    self-imitation loss (the last of the batch).
    """

    # The batch in training, the one Lightning prefetches, and the one being written.
    PINNED_BATCHES = 3

    def __init__(
        self,
        pool: ActorPool,
        env_frames_per_step: int,
        timeout_s: float,
        pin_memory: bool = False,
        replay: ReplayBuffer | None = None,
        replay_count: int = 0,
    ) -> None:
        self.pool = pool
        self.env_frames_per_batch = pool.unroll_length * pool.batch_size * env_frames_per_step
        self.timeout_s = timeout_s
        self.pin_memory = pin_memory
        self.replay = replay
        self.replay_count = replay_count if replay is not None else 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        total = self.pool.batch_size + self.replay_count
        all_fresh = torch.zeros(self.pool.batch_size, dtype=torch.bool)
        pinned = [
            empty_batch(self.pool.buffers, total, pin_memory=True)
            for _ in range(self.PINNED_BATCHES if self.pin_memory else 0)
        ]
        for step in itertools.count():
            out = pinned[step % len(pinned)] if pinned else None
            if self.replay_count:
                fresh = self.pool.take_batch(self.timeout_s)
                batch = self._mix(fresh, out)
            else:
                batch = self.pool.take_batch(self.timeout_s, out=out)
                batch["replayed"] = all_fresh
            batch["env_frames"] = self.env_frames_per_batch
            batch["pool_stats"] = self.pool.stats()
            yield batch

    def _mix(self, fresh: dict[str, torch.Tensor], out: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """The fresh unrolls, then replayed ones (none until the buffer holds a batch's worth:
        the first few batches hold the fresh ones alone); the fresh ones are stored after the
        draw, so none is replayed in its own batch."""
        count = self.replay_count if len(self.replay) >= self.pool.batch_size + self.replay_count else 0
        imitated = self.replay.self_imitation if count else 0
        batch, replayed_ids = fresh, [torch.zeros(0, dtype=torch.int64)]
        if count:
            draws = [self.replay.sample(count - imitated)]
            if imitated:
                draws.append(self.replay.sample(imitated, by_advantage=True))
            replayed_ids = [draw.pop("replay_id") for draw in draws]
            batch = {}
            for name, values in fresh.items():
                dim = 0 if values.dim() == 1 else 1
                parts = (values, *(draw[name] for draw in draws))
                batch[name] = torch.cat(parts, dim=dim, out=out[name]) if out else torch.cat(parts, dim=dim)
        batch["replay_id"] = torch.cat((self.replay.add(fresh), *replayed_ids))
        column = torch.arange(self.pool.batch_size + count)
        batch["replayed"] = column >= self.pool.batch_size
        if self.replay.self_imitation:
            batch["self_imitation"] = column >= self.pool.batch_size + count - imitated
        return batch


class EpisodeDataset(IterableDataset):
    """Plays `episodes` whole episodes on each held-out track of `env` with the policy, in this
    process, and yields one result dict per episode (see evaluation.play_episode): track, seed,
    return, length and the env family's episode extra stats."""

    def __init__(
        self, policy: torch.jit.ScriptModule, env: EnvConfig, episodes: int, seed: int, greedy: bool
    ) -> None:
        self.policy = policy
        self.env = env
        self.episodes = episodes
        self.seed = seed
        self.greedy = greedy

    def __len__(self) -> int:
        return self.episodes * len(held_out_envs(self.env))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return play_tracks(self.policy, self.env, self.episodes, self.seed, self.greedy)
