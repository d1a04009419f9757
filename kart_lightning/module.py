"""ImpalaModule: the V-trace actor-critic loss, optimizer and learning-rate schedule around a
TorchScript policy, with the env-frame counter that bounds a run across resumes."""

import json
import math
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.callbacks import Timer
from lightning.pytorch.utilities import rank_zero_info
from torchmetrics.aggregation import RunningMean

from kart_lightning.distributed import stop_requested
from kart_lightning.errors import ConfigError
from kart_lightning.evaluation import format_table, scalar_metrics, summarize
from kart_lightning.losses import vtrace
from kart_lightning.models import ActorCritic
from kart_lightning.models.augmentation import mirror, random_shift


def clip_rewards(rewards: torch.Tensor, mode: str) -> torch.Tensor:
    """Reward clipping of the learner's loss: `abs_one` clamps to [-1, 1]; `soft_asymmetric` is the
    paper's 5·tanh(r/5) with negative rewards scaled by 0.3; `none` leaves them."""
    if mode == "abs_one":
        return rewards.clamp(-1.0, 1.0)
    if mode == "soft_asymmetric":
        squeezed = torch.tanh(rewards / 5.0)
        return torch.where(rewards < 0, 0.3 * squeezed, squeezed) * 5.0
    return rewards


def gradient_norm(module: torch.nn.Module) -> torch.Tensor:
    """The global 2-norm of the module's gradients, as gradient clipping measures it, without a
    device sync (torch.nn.utils.get_total_norm does this from torch 2.6; the floor here is 2.2)."""
    grads = [p.grad.detach() for p in module.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))


def time_share(timer: Timer | None) -> float:
    """The share of its max_time that a Lightning Timer has counted, at most 1 (0 without a
    Timer or a max_time); a resumed fit's Timer counts the time of the fits before it."""
    remaining = timer.time_remaining() if timer is not None else None
    if remaining is None:
        return 0.0
    elapsed = timer.time_elapsed()
    return min(1.0, elapsed / max(elapsed + remaining, 1e-9))


def no_other_ranks() -> bool:
    return False


def running_mean(window: int) -> RunningMean:
    """The mean of the last `window` values, of this process alone: with several ranks the values
    are already the job's (gathered in ImpalaModule._job_step), so the metric must not gather
    them again (it would, at every compute, and on NCCL fail on its CPU states)."""
    mean = RunningMean(window=window, nan_strategy="ignore", distributed_available_fn=no_other_ranks)
    mean.distributed_available_fn = no_other_ranks  # the window wrapper's own states
    return mean


@dataclass
class JobStep:
    """What one learner step adds up to across all ranks (with one rank, this rank's own)."""

    env_frames: int
    """Fresh env frames trained on by every rank together."""
    episodes: dict[str, torch.Tensor]
    """Each `episode_KEY` field's values for the episodes that ended in the fresh unrolls."""
    ranks: list[tuple[float, float]]
    """Per rank: its own env frames/s and policy lag (empty with one rank)."""
    stop: bool = False
    """Ctrl-C reached some rank: every rank stops after this step (several ranks only)."""
    time_share: float = 0.0
    """The share of trainer.max_time spent, by rank 0's clock (model.lr_decay_time; else 0)."""


class ImpalaModule(LightningModule):
    """Learns from [T+1, B] trajectories with V-trace (arXiv:1802.01561).

    The policy is scripted at construction; the same scripted module runs in the actors.
    """

    def __init__(
        self,
        obs_shape: list[int] | None = None,
        num_actions: int = 2,
        torso: Literal["shallow", "deep", "mlp"] = "shallow",
        hidden_size: int = 256,
        use_lstm: bool = False,
        lstm_size: int = 256,
        discount: float = 0.99,
        baseline_cost: float = 0.5,
        entropy_cost: float = 0.01,
        reward_clipping: Literal["abs_one", "soft_asymmetric", "none"] = "abs_one",
        clip_rho_threshold: float | None = 1.0,
        clip_pg_rho_threshold: float | None = 1.0,
        optimizer: Literal["rmsprop", "adam"] = "rmsprop",
        learning_rate: float = 0.0006,
        rmsprop_alpha: float = 0.99,
        rmsprop_eps: float = 0.01,
        rmsprop_momentum: float = 0.0,
        adam_eps: float = 1e-8,
        lr_decay: bool = True,
        lr_decay_time: bool = False,
        max_frames: int = 10_000_000,
        return_window: int = 100,
        augmentation: Literal["none", "random_shift", "mirror"] = "none",
        shift_pad: int = 4,
        mirrored_actions: list[int] | None = None,
        trust_region_kl: float | None = None,
        self_imitation_value_cost: float = 0.01,
        lr_scaling: Literal["none", "sqrt", "linear"] = "sqrt",
    ) -> None:
        """
        Args:
            obs_shape: Observation shape, [C, H, W] uint8 frames or [D] vectors (filled in from the env).
            num_actions: Size of the discrete action set (filled in from the env).
            torso: shallow (the paper's Atari CNN), deep (the paper's residual network) or mlp (vectors).
            hidden_size: Width of the torso's output layer.
            use_lstm: Add an LSTM core; its state is zeroed where an episode ended.
            lstm_size: LSTM hidden units.
            discount: Discount γ per agent step.
            baseline_cost: Weight of the baseline loss baseline_cost · ½ Σ (vs − V)².
            entropy_cost: Weight of the entropy bonus.
            reward_clipping: abs_one (clamp to [-1, 1]), soft_asymmetric (the paper's tanh form) or none.
            clip_rho_threshold: ρ̄ of V-trace targets; null for no clipping.
            clip_pg_rho_threshold: ρ̄ of the policy-gradient advantages; null for no clipping.
            optimizer: rmsprop (the paper's) or adam.
            learning_rate: Initial learning rate.
            rmsprop_alpha: RMSProp decay.
            rmsprop_eps: RMSProp epsilon.
            rmsprop_momentum: RMSProp momentum.
            adam_eps: Adam epsilon.
            lr_decay: Decay the learning rate linearly to zero over max_frames.
            lr_decay_time: Decay it over trainer.max_time too: the lr falls with whichever budget,
                frames or time, is further spent, so a run that max_time stops ends with the lr at
                zero however fast the machine is. The schedule then depends on the machine's speed.
            max_frames: Env frames (agent steps × frame skip) after which fit stops, across resumes.
            return_window: Episodes averaged in the logged means of the return, the length and the
                env's episode extra stats.
            augmentation: random_shift: the learner trains on frames shifted by up to `shift_pad`
                pixels each way, a random shift per observation (RAD/DrAC); mirror: each unroll of
                a batch, with probability ½, mirrored left to right with its actions
                (games whose env family names `mirrored_actions`, such as a racing game), so
                each course is also learnt as its mirror image; none: as they are. Actors and
                evaluation always see the frames as they are.
            shift_pad: The largest shift of random_shift, in pixels.
            mirrored_actions: Each action's mirror image left to right (filled in from the env;
                None when the game has no such symmetry).
            trust_region_kl: LASER's trust region (Schmitt et al. 2019): an unroll whose target
                policy is further than this from the policy that acted (mean KL(π‖μ) per step) is
                left out of the policy gradient. It applies to every unroll, as in LASER; fresh
                ones are rarely that far, replayed ones often (with random_shift or mirror, π sees
                the augmented frames and μ saw them as they were). null: none left out.
            self_imitation_value_cost: β of the self-imitation loss (Oh et al. 2018) on the unrolls
                a batch replays for it (`data.replay.self_imitation`): Σ −log π(a|x) (R − V)₊ +
                β · ½ Σ (R − V)₊², R the unroll's discounted return bootstrapped from V(x_T); those
                unrolls are left out of the V-trace loss.
            lr_scaling: With N ranks (DDP) a step trains on N batches and DDP averages their
                gradients, so a step is a less noisy one of N times the frames, and there are N times
                fewer steps per frame. sqrt multiplies learning_rate by √N, the square-root rule
                for adaptive optimizers such as RMSProp and Adam (Malladi et al. 2022); linear by N
                (Goyal et al. 2017, for SGD); none leaves it. Nothing changes with one rank.
        """
        if obs_shape is None:
            obs_shape = [4, 84, 84]
        super().__init__()
        self.save_hyperparameters()
        if augmentation != "none" and len(obs_shape) != 3:
            raise ConfigError(
                f"model.augmentation {augmentation} augments image observations, and the env gives {list(obs_shape)}: "
                "set model.augmentation none."
            )
        if augmentation == "mirror" and mirrored_actions is None:
            raise ConfigError(
                "model.augmentation mirror needs a game that plays the same mirrored left to right, and "
                "this game's env family names no mirrored actions: set model.augmentation none or random_shift."
            )
        if augmentation == "mirror" and use_lstm:
            raise ConfigError(
                "model.augmentation mirror flips whole unrolls, whose LSTM state was computed on the "
                "unflipped past: set model.use_lstm false, or model.augmentation none or random_shift."
            )
        if lr_decay_time and not lr_decay:
            raise ConfigError(
                "model.lr_decay_time decays the lr over trainer.max_time, and model.lr_decay is false: "
                "set model.lr_decay true, or model.lr_decay_time false."
            )
        if not self_imitation_value_cost >= 0:
            raise ConfigError(
                f"model.self_imitation_value_cost is {self_imitation_value_cost}: set it to 0 or more."
            )
        if mirrored_actions is not None and sorted(mirrored_actions) != list(range(num_actions)):
            raise ValueError(f"mirrored_actions {mirrored_actions} is not a permutation of {num_actions} actions")
        self.policy = torch.jit.script(
            ActorCritic(obs_shape, num_actions, torso, hidden_size, use_lstm, lstm_size)
        )
        # A buffer to move with the module, not saved (the hyperparameters carry the list); None: no buffer.
        index = None if mirrored_actions is None else torch.tensor(mirrored_actions, dtype=torch.int64)
        self.register_buffer("mirror_index", index, persistent=False)
        # A buffer, so checkpoints carry it and resume continues the count and the lr schedule.
        self.register_buffer("env_frames", torch.zeros((), dtype=torch.int64))
        # The share of trainer.max_time spent (rank 0's clock), for lr_decay_time; 0 without it.
        self._time_share = 0.0
        self._timer: Timer | None = None
        # Running means of the last `return_window` episodes' return, length and the env's extra
        # stats, one per `episode_KEY` field of the batches, made as the keys first arrive. A plain
        # dict: they are logging state, not parts of the model (nor of its summary).
        self.episode_means: dict[str, RunningMean] = {}
        self.episode_mean_values: dict[str, float] = {}
        self.episodes = 0
        # Agent steps of the episodes finished on each rotated state since this fit started.
        self.state_steps: dict[str, float] = {}
        self._checkpoint_step = 0
        self._throughput = deque(maxlen=50)
        self._rank_frames = 0
        self._rank_throughput = deque(maxlen=50)
        self._batch_size = 1  # unrolls in the last training batch, for logging

    def forward(self, batch: dict[str, torch.Tensor]):
        obs = batch["obs"]
        device = obs.device.type
        if obs.dtype == torch.uint8 and torch.is_autocast_enabled(device):
            # Pixels 0-255 are exact in bfloat16 and float16: one cast of the largest tensor of the
            # step, where float32 first would take two (a scripted policy cannot read autocast).
            obs = obs.to(torch.get_autocast_dtype(device))
        return self.policy(
            obs, batch["prev_action"], batch["reward"], batch["done"], (batch["core_h"], batch["core_c"])
        )

    def compute_loss(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Losses on a batch of [T+1, B] trajectories: step t's departure (action, logits) pairs
        with step t+1's arrival (reward, done), and V(obs[T]) bootstraps."""
        hp = self.hparams
        logits, values, _ = self(batch)
        rewards = clip_rewards(batch["reward"][1:], hp.reward_clipping)
        rewards = rewards + hp.discount * batch["truncation_value"][1:]
        discounts = (~batch["done"][1:]).float() * hp.discount
        returns = vtrace.from_logits(
            behaviour_policy_logits=batch["behaviour_logits"][:-1],
            target_policy_logits=logits[:-1],
            actions=batch["action"][:-1],
            discounts=discounts,
            rewards=rewards,
            values=values[:-1],
            bootstrap_value=values[-1],
            clip_rho_threshold=hp.clip_rho_threshold,
            clip_pg_rho_threshold=hp.clip_pg_rho_threshold,
        )
        log_policy = F.log_softmax(logits[:-1], dim=-1)
        policy_terms = returns.target_action_log_probs * returns.pg_advantages
        extra = {}
        if hp.trust_region_kl is not None:
            behaviour = F.log_softmax(batch["behaviour_logits"][:-1], dim=-1)
            kl = (log_policy.exp() * (log_policy - behaviour)).sum(-1).mean(0).detach()  # [B]
            kept = (kl <= hp.trust_region_kl).float()
            policy_terms = policy_terms * kept
            extra["trust_region_kept"] = kept.mean()
        baseline_terms = (returns.vs - values[:-1]).pow(2)
        entropy_terms = (log_policy.exp() * log_policy).sum(-1)
        imitated = batch.get("self_imitation")
        self_imitation_loss = 0.0
        if imitated is not None:
            imitated = imitated.to(values.device)
            # These unrolls teach by self-imitation alone: out of the V-trace terms.
            others = (~imitated).to(values.dtype)
            policy_terms = policy_terms * others
            baseline_terms = baseline_terms * others
            entropy_terms = entropy_terms * others
            self_imitation_loss = extra["self_imitation_loss"] = self._self_imitation_loss(
                rewards, discounts, values, returns.target_action_log_probs, imitated
            )
        # Sums over time and batch, as in the reference implementations the lr was tuned with.
        policy_loss = -policy_terms.sum()
        baseline_loss = hp.baseline_cost * 0.5 * baseline_terms.sum()
        entropy_loss = hp.entropy_cost * entropy_terms.sum()
        return {
            "loss": policy_loss + baseline_loss + entropy_loss + self_imitation_loss,
            "policy_loss": policy_loss,
            "baseline_loss": baseline_loss,
            "entropy_loss": entropy_loss,
            # [B]: how much better each unroll went than the value expected (replay priorities).
            "unroll_advantage": (returns.vs - values[:-1]).detach().clamp(min=0).mean(0),
            **extra,
        }

    def _self_imitation_loss(
        self, rewards: torch.Tensor, discounts: torch.Tensor, values: torch.Tensor,
        action_log_probs: torch.Tensor, imitated: torch.Tensor,
    ) -> torch.Tensor:
        """Self-imitation (Oh et al. 2018) on the unrolls `imitated` [B]: each action taken is
        learnt as far as the return that followed it, R_t = r_t + γ_t R_t+1 from R_T = V(x_T),
        beat the value V(x_t), and the value is raised towards that return; where the return fell
        short, nothing is learnt."""
        # With every importance weight 1 (μ = π), V-trace's targets are exactly these returns.
        returns = vtrace.from_importance_weights(
            torch.zeros_like(rewards), discounts, rewards, values[:-1], values[-1],
            clip_rho_threshold=None, clip_pg_rho_threshold=None,
        ).vs
        better = (returns - values[:-1]).clamp(min=0) * imitated.to(values.dtype)  # [T, B]
        policy_loss = -(action_log_probs * better.detach()).sum()
        return policy_loss + self.hparams.self_imitation_value_cost * 0.5 * better.pow(2).sum()

    def on_train_batch_start(self, batch, batch_idx: int) -> int | None:
        if self.env_frames >= self.hparams.max_frames:
            self.trainer.should_stop = True
            return -1
        return None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        losses = self.compute_loss(self.augment(batch))
        advantage = losses.pop("unroll_advantage")
        replay = getattr(getattr(self._trainer, "datamodule", None), "replay_buffer", None)
        if replay is not None and replay.keeps_priorities and "replay_id" in batch:
            replay.update_priorities(batch["replay_id"].cpu(), advantage.float().cpu())
        job = self._job_step(batch)
        # Every rank adds the same sum, so the budget, the lr schedule and the stop agree.
        self.env_frames += job.env_frames
        self._time_share = job.time_share
        if job.stop:
            self.trainer.should_stop = True
        self._log_training(batch, losses, job)
        return losses["loss"]

    @property
    def world_size(self) -> int:
        """Ranks training together (1 without a trainer)."""
        try:
            return self.trainer.world_size
        except RuntimeError:  # not attached to a Trainer
            return 1

    def on_fit_start(self) -> None:
        if self.world_size > 1:
            rank_zero_info(
                f"Learning rate {self.hparams.learning_rate:g} x {self.scaled_learning_rate() / self.hparams.learning_rate:.3g} "
                f"= {self.scaled_learning_rate():.3g} for {self.world_size} ranks (model.lr_scaling {self.hparams.lr_scaling})."
            )
            # The same initial weights everywhere (DDP checks), then each rank's own random
            # stream: its augmentation shifts differ from the other ranks'.
            torch.manual_seed(torch.initial_seed() + 1_000_003 * self.global_rank)

    def on_train_start(self) -> None:
        # The config and the number of ranks decide the learning rate, also on resume, where the
        # checkpoint's optimizer and scheduler states would bring back the rate they were saved with.
        if self.hparams.lr_decay_time:
            # Lightning's Timer, found once: it holds max_time and, on resume, the time of the fits before.
            self._timer = next((callback for callback in self.trainer.callbacks
                                if isinstance(callback, Timer) and callback.time_remaining() is not None), None)
            # Rank 0's clock, so every rank starts at the same rate.
            self._time_share = float(self.trainer.strategy.broadcast(time_share(self._timer)))
        rate = self.scaled_learning_rate()
        for group in self.optimizers().param_groups:
            group["initial_lr"], group["lr"] = rate, rate * self._lr_factor(0)
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.base_lrs = [rate] * len(scheduler.base_lrs)

    def _job_step(self, batch: dict[str, torch.Tensor]) -> JobStep:
        """This rank's fresh frames, finished episodes, frames/s, policy lag and Ctrl-C request,
        gathered from every rank when there are several (one small all_gather per step)."""
        fresh = self._fresh(batch)
        finished = batch["done"][1:] & ~torch.isnan(batch["episode_return"][1:]) & fresh  # [T, B]
        names = sorted(name for name in batch if name.startswith("episode_"))
        share = time_share(self._timer) if self.hparams.lr_decay_time else 0.0
        if self.world_size == 1:
            return JobStep(batch["env_frames"], {name: batch[name][1:][finished] for name in names}, [], time_share=share)
        values = torch.stack([batch[name][1:].double() for name in names])  # [K, T, B]
        self._rank_frames += batch["env_frames"]
        self._rank_throughput.append((time.monotonic(), self._rank_frames))
        (t0, f0), (t1, f1) = self._rank_throughput[0], self._rank_throughput[-1]
        frames_per_s = (f1 - f0) / (t1 - t0) if t1 > t0 else math.nan
        lag = float(self.global_step - batch["policy_version"].float()[fresh].mean())
        head = torch.tensor([batch["env_frames"], frames_per_s, lag, stop_requested(), share],
                            dtype=torch.float64, device=values.device)
        row = torch.cat([head, finished.double().flatten(), values.flatten()])
        # torch's all_gather, not LightningModule.all_gather: that one goes through
        # torch.distributed.nn.functional.all_gather, which torch 2.13 warns is deprecated.
        rows = [torch.empty_like(row) for _ in range(self.world_size)]
        dist.all_gather(rows, row)
        rows = torch.stack(rows)  # [N, ...]: one row per rank
        cells = finished.numel()
        start = head.numel()
        finished_all = rows[:, start:start + cells].bool()
        values_all = rows[:, start + cells:].reshape(rows.shape[0], len(names), cells)
        return JobStep(
            env_frames=int(rows[:, 0].sum()),
            episodes={name: values_all[:, i][finished_all] for i, name in enumerate(names)},
            ranks=[(float(row[1]), float(row[2])) for row in rows],
            stop=bool(rows[:, 3].any()),
            time_share=float(rows[0, 4]),
        )

    @staticmethod
    def _fresh(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B] bool: the unrolls that came from the actors for this batch (not replayed ones)."""
        batch_size = batch["reward"].shape[1]
        fresh = ~batch["replayed"] if "replayed" in batch else torch.ones(batch_size, dtype=torch.bool)
        return fresh.to(batch["reward"].device)

    def augment(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch the loss sees: with model.augmentation random_shift and in training mode,
        its observations shifted; with mirror, each unroll mirrored with probability ½ (see
        models.augmentation); otherwise `batch` itself."""
        if self.hparams.augmentation == "none" or not self.training:
            return batch
        if self.hparams.augmentation == "mirror":
            flip = torch.rand(batch["action"].shape[1]) < 0.5  # [B], on the CPU: mirror loops over it
            return mirror(batch, self.mirror_index, flip)
        return {**batch, "obs": random_shift(batch["obs"], self.hparams.shift_pad)}

    def on_before_optimizer_step(self, optimizer) -> None:
        # Lightning calls this before it clips (trainer.gradient_clip_val), so the norm is the raw
        # one: with losses summed over T x B, how far above the clip it sits sets the step size.
        self.log("train/grad_norm", gradient_norm(self), batch_size=self._batch_size)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        if self.env_frames >= self.hparams.max_frames:
            self.trainer.should_stop = True

    def _log_training(self, batch: dict[str, torch.Tensor], losses: dict[str, torch.Tensor], job: JobStep) -> None:
        batch_size = self._batch_size = batch["reward"].shape[1]
        for name, value in losses.items():
            self.log(f"train/{name}", value.detach(), batch_size=batch_size)
        env_frames = int(self.env_frames)
        self._throughput.append((time.monotonic(), env_frames))
        if len(self._throughput) > 1:
            (t0, f0), (t1, f1) = self._throughput[0], self._throughput[-1]
            self.log("frames_per_s", (f1 - f0) / max(t1 - t0, 1e-9), prog_bar=True, batch_size=batch_size)
        self.log("env_frames", float(env_frames), prog_bar=True, batch_size=batch_size)
        self.log("learning_rate", self.optimizers().param_groups[0]["lr"], batch_size=batch_size)
        # Replayed unrolls were counted when they were fresh: statistics come from fresh ones only.
        fresh = self._fresh(batch)
        versions = batch["policy_version"].float()
        if job.ranks:
            self.log("policy_lag", sum(lag for _, lag in job.ranks) / len(job.ranks), batch_size=batch_size)
            for rank, (frames_per_s, lag) in enumerate(job.ranks):
                if not math.isnan(frames_per_s):
                    self.log(f"rank_{rank}/frames_per_s", frames_per_s, batch_size=batch_size)
                self.log(f"rank_{rank}/policy_lag", lag, batch_size=batch_size)
        else:
            self.log("policy_lag", self.global_step - versions[fresh].mean(), batch_size=batch_size)
        if not fresh.all():
            self.log("train/replay_lag", self.global_step - versions[~fresh].mean(), batch_size=batch_size)
        self.log("train/replay_ratio_effective", float((~fresh).sum()) / float(fresh.sum()), batch_size=batch_size)
        for name, value in batch.get("pool_stats", {}).items():
            self.log(name, value, batch_size=batch_size)

        # Row 0 repeats the previous unroll's last row, so each finished episode counts once.
        self.episodes += int(job.episodes["episode_return"].numel())
        episodes = dict(job.episodes)
        states = episodes.pop("episode_state", None)
        for name, values in episodes.items():
            self._update_mean(name, values)
        # Without a trainer (the module fed batches by hand) there are no state names.
        state_names = getattr(getattr(self._trainer, "datamodule", None), "rotated_states", [])
        if states is not None and state_names:
            # Per state too (the envs rotate among them): which track it learns, and where its frames go.
            # Only the states whose episodes ended in this batch: most steps end none.
            for index in states[~torch.isnan(states)].unique().long().tolist():
                state, mine = state_names[index], states == index
                for name, values in episodes.items():
                    self._update_mean(f"{state}/{name}", values[mine])
                steps = episodes["episode_length"][mine]
                self.state_steps[state] = self.state_steps.get(state, 0.0) + float(steps.nansum())
            # The share of env frames each state took (frame skip is the same for all).
            total = sum(self.state_steps.values())
            if total > 0:
                for state in state_names:
                    self.log(f"train/{state}/frame_share", self.state_steps.get(state, 0.0) / total,
                             batch_size=batch_size)
        for name, mean in self.episode_mean_values.items():
            self.log(f"train/{name}", mean, prog_bar=name == "episode_return", batch_size=batch_size)
        if self.episodes:
            self.log("episodes", float(self.episodes), batch_size=batch_size)

    def _update_mean(self, name: str, values: torch.Tensor) -> None:
        """Add the finished episodes' `values` (NaN: not reported) to the running mean of `name`."""
        values = values[~torch.isnan(values)]
        if values.numel():
            if name not in self.episode_means:
                self.episode_means[name] = running_mean(self.hparams.return_window)
            for value in values.tolist():
                self.episode_means[name].update(value)
            # Computed when it changes, not at every step: most steps end no episode.
            self.episode_mean_values[name] = float(self.episode_means[name].compute())

    # validate and test: one whole episode per step (see EpisodeDataset), summed up per track.

    def on_validation_epoch_start(self) -> None:
        self._episode_results: list[dict[str, Any]] = []

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._episode_results.append(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_summary("val", summarize(self._episode_results))

    def on_test_epoch_start(self) -> None:
        self._episode_results = []

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._episode_results.append(batch)

    def on_test_epoch_end(self) -> None:
        """Print the per-track table and write it, with every episode, to JSON beside the
        checkpoint tested (or in the log folder when no checkpoint was given)."""
        summary = summarize(self._episode_results)
        self._log_summary("test", summary)
        if not self.trainer.is_global_zero:
            return
        table = format_table(summary)
        ckpt_path = self.trainer.ckpt_path
        if ckpt_path:
            report_path = Path(ckpt_path).with_suffix(".test.json")
        else:
            report_path = Path(self.trainer.log_dir or ".") / "test.json"
        report = {
            "checkpoint": ckpt_path,
            "global_step": self.trained_steps,
            "env_frames": int(self.env_frames),
            "tracks": summary,
            "episodes": self._episode_results,
        }
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nHeld-out evaluation of {ckpt_path or 'the untrained policy'}:\n{table}\nWritten to {report_path}")
        experiment = getattr(self.logger, "experiment", None)
        if hasattr(experiment, "add_text"):
            # Markdown renders a code block as fixed width, so the columns stay aligned.
            experiment.add_text("test/table", "    " + table.replace("\n", "\n    "), self.trained_steps)

    @property
    def trained_steps(self) -> int:
        """Learner steps behind these weights: `test` and `validate` load a checkpoint's weights
        but leave the trainer's step count at 0."""
        return max(self.global_step, self._checkpoint_step)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._checkpoint_step = int(checkpoint.get("global_step", 0))

    def _log_summary(self, prefix: str, summary: dict[str, dict[str, Any]]) -> None:
        for name, value in scalar_metrics(prefix, summary).items():
            self.log(name, value)

    def scaled_learning_rate(self) -> float:
        """model.learning_rate scaled for the number of ranks (see lr_scaling)."""
        ranks = self.world_size
        scale = {"none": 1.0, "sqrt": math.sqrt(ranks), "linear": float(ranks)}[self.hparams.lr_scaling]
        return self.hparams.learning_rate * scale

    def configure_optimizers(self):
        hp = self.hparams
        if hp.optimizer == "rmsprop":
            optimizer = torch.optim.RMSprop(
                self.parameters(), lr=self.scaled_learning_rate(), alpha=hp.rmsprop_alpha,
                eps=hp.rmsprop_eps, momentum=hp.rmsprop_momentum,
            )
        else:
            optimizer = torch.optim.Adam(self.parameters(), lr=self.scaled_learning_rate(), eps=hp.adam_eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _lr_factor(self, _step: int) -> float:
        """Linear decay to zero over the frame budget, read from the frame counter so a resumed
        run continues the same schedule; with lr_decay_time, over the time budget where more of
        it is spent."""
        if not self.hparams.lr_decay:
            return 1.0
        spent = int(self.env_frames) / self.hparams.max_frames
        if self.hparams.lr_decay_time:
            spent = max(spent, self._time_share)
        return max(0.0, 1.0 - spent)
