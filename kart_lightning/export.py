"""The policy as a standalone TorchScript file next to each checkpoint, runnable without this project.

    import torch
    policy = torch.jit.load("checkpoints/last.policy.pt")
    state = policy.initial_state(1)
    obs = torch.zeros(1, 16, 84, 84, dtype=torch.uint8)  # a frame stack, shape in the file's metadata
    action, logits, value, state = policy.act(obs, torch.zeros(1, dtype=torch.long), torch.zeros(1), torch.ones(1, dtype=torch.bool), state, True)

The file also holds `kart_lightning.json` (read it with torch.jit.load(path, _extra_files={...})):
the observation shape and dtype, the action count and, for Super Mario Kart, the buttons of each
action, and the env's preprocessing, so a user can rebuild the inputs.
"""

import dataclasses
import io
import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from kart_lightning.envs.factory import EnvConfig
from kart_lightning.evaluation import script_bytes

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
        if env.id.startswith("SuperMarioKart"):
            from kart_lightning.envs.mario_kart.actions import ACTION_SETS

            metadata["actions"] = {name: list(buttons) for name, buttons in ACTION_SETS[env.mario_kart.actions].items()}
    return metadata


def export_policy(policy: torch.jit.ScriptModule, path: Path, metadata: dict[str, Any]) -> None:
    """Write `policy` (moved to CPU, eval mode) with `metadata` as a TorchScript file at `path`."""
    cpu_policy = torch.jit.load(io.BytesIO(script_bytes(policy)), map_location="cpu")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(cpu_policy, str(path), _extra_files={METADATA_FILE: json.dumps(metadata, indent=2)})


class KartCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also exports the policy next to each checkpoint it writes
    (`NAME.policy.pt` beside `NAME.ckpt`) and removes it with the checkpoint.

    Args:
        export_policy: write the TorchScript policy beside each checkpoint.
        **kwargs: ModelCheckpoint's arguments.
    """

    def __init__(self, *args: Any, export_policy: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.export_policy = export_policy

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if self.export_policy and trainer.is_global_zero:
            module, data = trainer.lightning_module, trainer.datamodule
            metadata = policy_metadata(
                module.hparams.obs_shape, str(getattr(data, "obs_dtype", "")).removeprefix("torch."),
                module.hparams.num_actions, getattr(data, "env", None), trainer.global_step, int(module.env_frames),
            )
            export_policy(module.policy, policy_path(filepath), metadata)

    def _remove_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            policy_path(filepath).unlink(missing_ok=True)
