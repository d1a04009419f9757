"""The DataModule: owns the actor pool (started in setup, stopped in teardown or on an exception)
and the evaluation episodes, and tells the model what the environment looks like."""

import dataclasses
import os
from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from kart_lightning.data.dataset import EpisodeDataset, TrajectoryDataset
from kart_lightning.data.exploration import NO_EXPLORATION, ExplorationConfig
from kart_lightning.data.pool import ActorPool
from kart_lightning.data.replay import GIB, ReplayBuffer, ReplayConfig, split_batch
from kart_lightning.data.slots import least_slots_per_env
from kart_lightning.envs import EnvConfig, env_frames_per_step, find_family, make_env, retro_state_names
from kart_lightning.errors import ConfigError

# The quickstart game: ships with stable-retro, so `fit` runs on a fresh machine with no ROM.
QUICKSTART_ENV = EnvConfig()
NO_REPLAY = ReplayConfig()


class ImpalaDataModule(LightningDataModule):
    """Trajectories from a pool of actor processes for `fit`; in-process episodes for `validate`/`test`.

    It plays the policy it is given (`connect_policy`, which the WeightPublisher callback calls
    in setup) and takes new weights through `publish_weights`.
    """

    def __init__(
        self,
        env: EnvConfig = QUICKSTART_ENV,
        num_actors: int = 2,
        envs_per_actor: int = 1,
        unroll_length: int = 80,
        batch_size: int = 8,
        replay: ReplayConfig = NO_REPLAY,
        exploration: ExplorationConfig = NO_EXPLORATION,
        slots_per_env: int | None = None,
        seed: int = 0,
        start_method: Literal["spawn", "forkserver", "fork"] = "spawn",
        inference: Literal["auto", "actor", "learner"] = "auto",
        inference_batch_envs: int | None = None,
        inference_timeout_s: float = 0.001,
        actor_threads: int = 1,
        learner_threads: int | None = None,
        max_actor_failures: int = 3,
        rollout_timeout_s: float = 600.0,
        eval_env: EnvConfig | None = None,
        eval_episodes: int = 5,
        eval_seed: int = 1_000_000,
        eval_greedy: bool = False,
    ) -> None:
        """
        Args:
            env: The environment every actor runs (see EnvConfig).
            num_actors: Actor processes.
            envs_per_actor: Environments stepped by each actor process (one batched policy call per step).
            unroll_length: T, agent steps per trajectory; a slot holds T+1 (the last step is repeated
                as the first of the next unroll).
            batch_size: B, trajectories per learner batch (fresh and, with replay, replayed ones).
            replay: Experience replay in the learner (see ReplayConfig); off by default.
            exploration: εz-greedy in the actors: random actions held for random spans, on top
                of the policy's (see ExplorationConfig); off by default.
            slots_per_env: Shared-memory rollout slots per env; default 2 + ceil((fresh - 1) / envs),
                one more than the fewest that can never deadlock, so actors keep acting.
            seed: Base seed; env k of actor i is seeded seed + 10000 * i + k, where i counts the
                actors of all ranks (rank r's first actor is r * num_actors).
            start_method: How actor processes start; spawn is safe with threads and CUDA.
            inference: Where actions are computed. actor: each actor runs a CPU copy of the policy,
                refreshed after learner updates; learner: a thread in the learner batches the
                requests of all actors on the learner's device (GA3C). auto: learner when the
                learner has a GPU, else actor (on a CPU-only machine batching across processes
                only adds round trips to work that costs the same on every core).
            inference_batch_envs: Learner inference: most env rows in one batch; default all envs.
            inference_timeout_s: Learner inference: how long a batch waits for more requests.
            actor_threads: Torch threads per actor process (1: actors are many, their batches small).
            learner_threads: Torch threads of the learner; default the cores the actors leave
                (at least 1), with the host's cores shared evenly among the ranks on it.
            max_actor_failures: An actor that dies this many times in a row before finishing an
                unroll stops the run; dead actors are otherwise restarted.
            rollout_timeout_s: Give up (with an error) when no trajectory arrives for this long.
            eval_env: The held-out environment that `validate`, `test` and the evaluation and
                recording callbacks play; each state of a `retro_state` list is one held-out
                track (tracks or levels never trained on). Default: the training env.
            eval_episodes: Episodes per held-out track.
            eval_seed: First seed of the evaluation episodes (held out from training seeds).
            eval_greedy: Act greedily (argmax) in evaluation instead of sampling.
        """
        super().__init__()
        self.save_hyperparameters()
        # Plain types in checkpoints, so they load with torch.load(weights_only=True).
        self.hparams.env = dataclasses.asdict(env) if dataclasses.is_dataclass(env) else env
        if dataclasses.is_dataclass(eval_env):
            self.hparams.eval_env = dataclasses.asdict(eval_env)
        if dataclasses.is_dataclass(replay):
            self.hparams.replay = dataclasses.asdict(replay)
        if dataclasses.is_dataclass(exploration):
            self.hparams.exploration = dataclasses.asdict(exploration)
        for name in ("num_actors", "envs_per_actor", "unroll_length", "batch_size", "eval_episodes"):
            if getattr(self.hparams, name) < 1:
                raise ConfigError(f"data.{name} is {getattr(self.hparams, name)}: set it to 1 or more.")
        if isinstance(replay, Mapping):  # as checkpoints keep it
            replay = ReplayConfig(**replay)
        self.replay = replay
        self.replay_buffer: ReplayBuffer | None = None
        if isinstance(exploration, Mapping):
            exploration = ExplorationConfig(**exploration)
        exploration.check()
        self.exploration = exploration
        # The actors fill the fresh part of each batch; the replay buffer the rest.
        self.fresh_per_batch, self.replayed_per_batch = split_batch(batch_size, replay.ratio)
        if self.replayed_per_batch and replay.capacity_gib is None and replay.capacity < batch_size:
            raise ConfigError(
                f"data.replay.capacity keeps {replay.capacity} unrolls, fewer than a batch of {batch_size}: raise "
                "data.replay.capacity."
            )
        if replay.self_imitation and not self.replayed_per_batch:
            raise ConfigError(
                f"data.replay.self_imitation is {replay.self_imitation}, and with replay off nothing is replayed for it: "
                "add --data.replay.self_imitation 0, or set data.replay.ratio above 0."
            )
        if not 0 <= replay.self_imitation <= self.replayed_per_batch:
            raise ConfigError(
                f"data.replay.self_imitation is {replay.self_imitation}, and a batch holds {self.replayed_per_batch} "
                f"replayed unrolls: set it from 0 to {self.replayed_per_batch}, or raise data.replay.ratio."
            )
        least = least_slots_per_env(num_actors * envs_per_actor, self.fresh_per_batch)
        if slots_per_env is not None and slots_per_env < least:
            raise ConfigError(
                f"data.slots_per_env={slots_per_env} is too few for {num_actors * envs_per_actor} envs to "
                f"fill a batch of {self.fresh_per_batch}: set it to at least {least}, or leave it unset."
            )
        family = find_family(env.id)
        if family.envs_per_process is not None and envs_per_actor > family.envs_per_process:
            raise ConfigError(
                f"{family.name} runs at most {family.envs_per_process} env(s) per process: set "
                f"data.envs_per_actor to {family.envs_per_process} and raise data.num_actors instead."
            )
        if eval_env is not None:
            find_family(eval_env.id)
        self.extra_stats: Mapping[str, str] = family.extra_stats
        """The env family's episode extra stats and how each sums up (see envs.registry)."""
        self.mirrored_actions: list[int] | None = (
            family.mirrored_actions(env) if family.mirrored_actions is not None else None
        )
        """Each action's mirror image left to right, for model.augmentation mirror; None when the
        game has no such symmetry."""
        names = [os.path.basename(name).removesuffix(".state") for name in retro_state_names(env)]
        if len(set(names)) < len(names):  # a state named twice: each its own line all the same
            names = [f"{name}#{index}" for index, name in enumerate(names)]
        self.rotated_states: list[str] = names if len(names) > 1 else []
        """The states the training envs rotate among (stable-retro), named for the per-state episode
        statistics (`train/STATE/episode_KEY`); empty with one state or none."""
        self.env = env
        # Evaluation plays whole games: a lost life does not end its episodes.
        self.eval_env = dataclasses.replace(eval_env or env, episodic_life=False)
        probe = make_env(env, seed=seed)
        try:
            observation_space = probe.observation_space
            self.obs_shape: list[int] = list(observation_space.shape)
            self.obs_dtype = torch.from_numpy(np.zeros(0, dtype=observation_space.dtype)).dtype
            self.num_actions = int(probe.action_space.n)
        finally:
            probe.close()
        self.env_frames_per_step = env_frames_per_step(env)
        self.pool: ActorPool | None = None
        self.policy: torch.jit.ScriptModule | None = None
        self.device = torch.device("cpu")
        self.rank = 0

    def connect_policy(
        self, policy: torch.jit.ScriptModule, device: torch.device, stage: str,
        rank: int = 0, ranks: int = 1, local_ranks: int = 1,
    ) -> None:
        """The policy to play: `fit` starts the actor pool with it (learner inference on `device`);
        `validate` and `test` play their episodes with it. With several ranks, each starts its own
        pool: `rank` numbers its actors after those of the ranks before it, so no two actors of the
        job share seeds, and the `local_ranks` on this host share its cores."""
        self.policy, self.device, self.rank = policy, device, rank
        if stage == "fit" and self.pool is None:
            hp = self.hparams
            self.pool = ActorPool(
                policy=policy,
                env=self.env,
                obs_shape=self.obs_shape,
                obs_dtype=self.obs_dtype,
                num_actions=self.num_actions,
                num_actors=hp.num_actors,
                envs_per_actor=hp.envs_per_actor,
                unroll_length=hp.unroll_length,
                batch_size=self.fresh_per_batch,
                seed=hp.seed,
                first_actor=rank * hp.num_actors,
                start_method=hp.start_method,
                slots_per_env=hp.slots_per_env,
                actor_threads=hp.actor_threads,
                max_actor_failures=hp.max_actor_failures,
                inference=self.inference_mode(device),
                device=device,
                inference_batch_envs=hp.inference_batch_envs,
                inference_timeout_s=hp.inference_timeout_s,
                extra_stats=(*self.extra_stats, *(["state"] if self.rotated_states else [])),
                exploration=self.exploration,
            )
            if ranks > 1:
                rank_zero_info(
                    f"{ranks} ranks, each with its own actor pool: {ranks} x {hp.num_actors} actors seeded apart, "
                    f"{ranks * hp.num_actors * hp.envs_per_actor} envs in all, {ranks} x {hp.batch_size} unrolls per "
                    "learner step."
                )
            # The learner gets the cores the actors leave.
            cores = max(1, (os.cpu_count() or 1) // max(1, local_ranks))
            torch.set_num_threads(
                hp.learner_threads or max(1, cores - hp.num_actors * hp.actor_threads)
            )

    def inference_mode(self, device: torch.device) -> str:
        """`actor` or `learner`, resolving `auto` by the learner's device."""
        if self.hparams.inference != "auto":
            return self.hparams.inference
        return "learner" if device.type == "cuda" else "actor"

    def publish_weights(self, state: Mapping[str, torch.Tensor], version: int) -> None:
        """Hand the actors (or the inference server) the learner's weights of step `version`."""
        if self.pool is not None and self.pool.version != version:
            self.pool.publish(state, version)

    def train_dataloader(self) -> DataLoader:
        if self.pool is None:
            raise RuntimeError(
                "ImpalaDataModule has no actors: add kart_lightning.data.WeightPublisher to the Trainer's callbacks."
            )
        replay = None
        if self.replayed_per_batch:
            seed = self.hparams.seed + 1_000_003 * self.rank  # each rank draws its own replays
            replay = ReplayBuffer(self.pool.buffers, self.replay, seed=seed, least=self.hparams.batch_size)
            imitated = self.replay.self_imitation
            rank_zero_info(
                f"Replay: {self.replayed_per_batch} replayed"
                f"{f' ({imitated} for self-imitation)' if imitated else ''} and {self.fresh_per_batch} fresh unrolls "
                f"per batch, from the last {replay.capacity} unrolls ({replay.nbytes / GIB:.2f} GiB of host memory at most)."
            )
        # The module sets its priorities (sampling: advantage, self_imitation).
        self.replay_buffer = replay
        # The actor pool is the workers and the dataset yields whole batches.
        dataset = TrajectoryDataset(
            self.pool, self.env_frames_per_step, self.hparams.rollout_timeout_s,
            pin_memory=self.device.type == "cuda", replay=replay, replay_count=self.replayed_per_batch,
        )
        return DataLoader(dataset, batch_size=None, num_workers=0)

    def _episodes(self) -> DataLoader:
        if self.policy is None:
            raise RuntimeError(
                "ImpalaDataModule has no policy: add kart_lightning.data.WeightPublisher to the Trainer's callbacks."
            )
        dataset = EpisodeDataset(
            self.policy,
            self.eval_env,
            episodes=self.hparams.eval_episodes,
            seed=self.hparams.eval_seed,
            greedy=self.hparams.eval_greedy,
        )
        return DataLoader(dataset, batch_size=None, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        return self._episodes()

    def test_dataloader(self) -> DataLoader:
        return self._episodes()

    def teardown(self, stage: str) -> None:
        self._close_pool()

    def on_exception(self, exception: BaseException) -> None:
        self._close_pool()

    def _close_pool(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
        self.replay_buffer = None
