"""The policy as a standalone TorchScript file next to each checkpoint, runnable without this project.

    import torch
    policy = torch.jit.load("checkpoints/last.policy.pt")
    state = policy.initial_state(1)
    obs = torch.zeros(1, 16, 84, 84, dtype=torch.uint8)  # a frame stack, shape in the file's metadata
    action, logits, value, state = policy.act(obs, torch.zeros(1, dtype=torch.long), torch.zeros(1), torch.ones(1, dtype=torch.bool), state, True)

The file also holds `kart_lightning.json` (read it with torch.jit.load(path, _extra_files={...})):
the observation shape and dtype, the action count and, where the env family names them, what each
action does, and the env's preprocessing, so a user can rebuild the inputs.
"""

import copy
import dataclasses
import io
import json
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from kart_lightning.envs import EnvConfig, find_family
from kart_lightning.models import script_bytes

METADATA_FILE = "kart_lightning.json"


def policy_path(checkpoint_path: str | Path) -> Path:
    """`run/last.ckpt` -> `run/last.policy.pt`."""
    return Path(checkpoint_path).with_suffix(".policy.pt")


def policy_metadata(obs_shape, obs_dtype: str, num_actions: int, env: EnvConfig | None, step: int, env_frames: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "obs_shape": list(obs_shape),
        "obs_dtype": obs_dtype,
        "num_actions": num_actions,
        "learner_step": step,
        "env_frames": env_frames,
        "inputs": "act(obs [B, *obs_shape], prev_action [B] int64, reward [B] float32, done [B] bool, "
        "core_state (h, c), greedy bool) -> (action [B], logits [B, A], value [B], core_state)",
    }
    if env is not None:
        metadata["env"] = dataclasses.asdict(env)
        action_names = find_family(env.id).action_names
        if action_names is not None:
            metadata["actions"] = action_names(env)
    return metadata


def export_policy(policy: torch.jit.ScriptModule, path: Path, metadata: dict[str, Any]) -> None:
    """Write `policy` (moved to CPU, eval mode) with `metadata` as a TorchScript file at `path`."""
    cpu_policy = torch.jit.load(io.BytesIO(script_bytes(policy)), map_location="cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(cpu_policy, str(path), _extra_files={METADATA_FILE: json.dumps(metadata, indent=2)})


@dataclasses.dataclass
class Snapshot:
    """A fit's checkpoint at one learner step and its scripted policy, kept in memory while that
    policy is evaluated in another process, so the checkpoint kept for its score holds its weights."""

    step: int
    env_frames: int
    checkpoint: dict[str, Any]
    policy: bytes


def take_snapshot(trainer: Trainer, policy: bytes, weights_only: bool = False) -> Snapshot:
    # dump_checkpoint's tensors are the live parameters and optimizer state: copy them.
    checkpoint = copy.deepcopy(trainer._checkpoint_connector.dump_checkpoint(weights_only))
    return Snapshot(trainer.global_step, int(trainer.lightning_module.env_frames), checkpoint, policy)


class KartCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also exports the policy next to each checkpoint it writes
    (`NAME.policy.pt` beside `NAME.ckpt`) and removes it with the checkpoint.

    Unlike Lightning's, it saves `last` whenever fit ends (max_time, the frame budget, Ctrl-C), not
    only at the checkpoint interval, so a stopped run loses no learner steps.

    When it monitors a metric the held-out evaluation computes in its own process (`val/...`), that
    evaluation calls `keep_evaluated` with the score and a snapshot of the weights that earned it:
    the top-k checkpoints are those weights, named by their step. Its periodic saves then write
    `last` only, from the first interval on rather than after the first score comes back.

    Args:
        export_policy: write the TorchScript policy beside each checkpoint.
        **kwargs: ModelCheckpoint's arguments.
    """

    def __init__(self, *args: Any, export_policy: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.export_policy = export_policy
        self.scored_elsewhere = False
        """Set by HeldOutEvaluation when it computes `monitor`."""
        self._snapshot: Snapshot | None = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.scored_elsewhere:
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        elif self._interval_reached(trainer) and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _interval_reached(self, trainer: Trainer) -> bool:
        # ModelCheckpoint.on_train_batch_end's step and time triggers, without its wait for the monitor.
        by_steps = self._every_n_train_steps >= 1 and trainer.global_step % self._every_n_train_steps == 0
        interval, last, now = self._train_time_interval, self._last_time_checked, time.monotonic()
        by_time = interval is not None and last is not None and now - last >= interval.total_seconds()
        if by_time:
            self._last_time_checked = now
        return by_steps or by_time

    def keep_evaluated(self, trainer: Trainer, snapshot: Snapshot, metrics: dict[str, float]) -> None:
        """Keep `snapshot` among the top-k checkpoints if its held-out `metrics` earn it a place."""
        candidates = self._monitor_candidates(trainer)
        candidates.update({name: torch.tensor(value) for name, value in metrics.items()})
        candidates["step"] = torch.tensor(snapshot.step)
        self._snapshot = snapshot
        try:
            self._save_topk_checkpoint(trainer, candidates)
        finally:
            self._snapshot = None

    def on_train_end(self, trainer: Trainer, pl_module: Any) -> None:
        self._save_last_if_behind(trainer)

    def on_exception(self, trainer: Trainer, pl_module: Any, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):  # Ctrl-C: the user chose to stop here
            self._save_last_if_behind(trainer)
        else:
            super().on_exception(trainer, pl_module, exception)

    def _save_last_if_behind(self, trainer: Trainer) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        if self._snapshot is not None:
            self._save_snapshot(trainer, self._snapshot, filepath)
            return
        super()._save_checkpoint(trainer, filepath)
        if self.export_policy and trainer.is_global_zero:
            module = trainer.lightning_module
            export_policy(module.policy, policy_path(filepath), self._metadata(trainer, trainer.global_step, int(module.env_frames)))

    def _save_snapshot(self, trainer: Trainer, snapshot: Snapshot, filepath: str) -> None:
        # Not `_last_global_step_saved`: that is the live weights' step, which this is not.
        trainer.strategy.save_checkpoint(snapshot.checkpoint, filepath)
        trainer.strategy.barrier()
        if self.export_policy and trainer.is_global_zero:
            policy = torch.jit.load(io.BytesIO(snapshot.policy), map_location="cpu")
            export_policy(policy, policy_path(filepath), self._metadata(trainer, snapshot.step, snapshot.env_frames))

    def _metadata(self, trainer: Trainer, step: int, env_frames: int) -> dict[str, Any]:
        module, data = trainer.lightning_module, trainer.datamodule
        return policy_metadata(
            module.hparams.obs_shape, str(getattr(data, "obs_dtype", "")).removeprefix("torch."),
            module.hparams.num_actions, getattr(data, "env", None), step, env_frames,
        )

    def _remove_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            policy_path(filepath).unlink(missing_ok=True)
