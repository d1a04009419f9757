"""Weights flow one way: the learner's step -> shared memory (or the inference server) -> actors.

SharedWeights holds the latest policy weights for actor-side inference; WeightPublisher is the
callback that publishes them right after each optimizer step.
"""

import time
from collections.abc import Mapping

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from kart_lightning.errors import ConfigError


class SharedWeights:
    """The latest policy weights in shared memory, with a version (the learner step that made them).

    The learner publishes after its updates; actors copy in when the version moves. A sequence
    counter, odd while the learner writes, stands in for a lock: a reader that saw it move copies
    again, and an actor killed mid-copy cannot leave anything held that would block the learner.
    """

    def __init__(self, state: Mapping[str, torch.Tensor], context) -> None:
        self.tensors = {
            name: tensor.detach().to("cpu", copy=True).share_memory_() for name, tensor in state.items()
        }
        self.version = context.Value("q", 0, lock=False)
        self.sequence = context.Value("q", 0, lock=False)

    def publish(self, state: Mapping[str, torch.Tensor], version: int) -> None:
        with torch.no_grad():
            self.sequence.value += 1
            for name, tensor in state.items():
                self.tensors[name].copy_(tensor.detach())
            self.version.value = version
            self.sequence.value += 1

    def copy_into(self, state: Mapping[str, torch.Tensor]) -> int:
        """Copy the published weights into ``state`` (tensors aliasing a module's); return their version."""
        with torch.no_grad():
            while True:
                before = self.sequence.value
                if before % 2:
                    time.sleep(0.0005)
                    continue
                for name, tensor in state.items():
                    tensor.copy_(self.tensors[name])
                version = self.version.value
                if self.sequence.value == before:
                    return version


class WeightPublisher(Callback):
    """Gives the DataModule the module's policy and the learner's device (`fit` starts the actors
    with them; `validate` and `test` play episodes with it), and publishes the policy's weights to
    the actors after every `every_n_steps` optimizer steps, and once before the first step, so a
    resumed run acts with its restored weights.

    Policy lag: Lightning fetches each batch one step ahead, so the batch trained at learner step
    s was taken from the actors before step s - 1 ran; its unrolls began with weights of step s - 1
    at the freshest. `policy_lag` (logged) is s minus the step of the weights an unroll began with:
    at least 1, more when an unroll spans several learner steps.

    Args:
        every_n_steps: learner steps between publications (1: every step, as in the paper).
    """

    def __init__(self, every_n_steps: int = 1) -> None:
        if every_n_steps < 1:
            raise ConfigError(f"weights.every_n_steps is {every_n_steps}: set it to 1 or more.")
        self.every_n_steps = every_n_steps

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        trainer.datamodule.connect_policy(
            pl_module.policy, trainer.strategy.root_device, stage,
            rank=trainer.global_rank, ranks=trainer.world_size, local_ranks=trainer.num_devices,
        )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._publish(trainer, pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step % self.every_n_steps == 0:
            self._publish(trainer, pl_module)

    @staticmethod
    def _publish(trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.datamodule.publish_weights(pl_module.policy.state_dict(), trainer.global_step)
