"""A callback the distributed tests add to `fit` (`--config` of a small YAML naming it): each rank
writes what it did, so a test can compare the ranks. On PYTHONPATH in those tests only."""

import hashlib
import json
import os
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer


class RankReport(Callback):
    """Writes FOLDER/rank-R-started.json once training starts (pid, step and frame counter it
    started from) and FOLDER/rank-R.json when fit ends (steps, the job's frame counter, the fresh
    frames this rank's own batches held, a digest of its policy weights, its learning rate at the
    start and at the end of the schedule so far, the sum of its first batch's observations)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)
        self.frames = 0
        self.steps = 0

    def _write(self, trainer: Trainer, name: str, report: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"rank-{trainer.global_rank}{name}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(report))
        temporary.replace(path)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.start = {"step": trainer.global_step, "env_frames": int(pl_module.env_frames)}
        self._write(trainer, "-started", {"pid": os.getpid(), **self.start})

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if not self.steps:
            self.first_observations = float(batch["obs"].double().sum())
        self.frames += int(batch["env_frames"])
        self.steps += 1

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        digest = hashlib.sha256()
        for name, tensor in sorted(pl_module.policy.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self._write(trainer, "", {
            "pid": os.getpid(), "start": self.start, "global_step": trainer.global_step, "steps": self.steps,
            "env_frames": int(pl_module.env_frames), "own_frames": self.frames, "weights": digest.hexdigest(),
            "lr": trainer.optimizers[0].param_groups[0]["initial_lr"], "world_size": trainer.world_size,
            "lr_now": trainer.optimizers[0].param_groups[0]["lr"],
            "first_observations": self.first_observations,
        })
