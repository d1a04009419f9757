"""The command line's checkpoint handling that rests on LightningCLI's order of steps."""

from pathlib import Path

import pytest
import torch

from kart_lightning.cli import TRAINER_DEFAULTS, ImpalaCLI
from kart_lightning.data.datamodule import ImpalaDataModule
from kart_lightning.module import ImpalaModule

REPO = Path(__file__).resolve().parents[1]


def checkpoint_of(module: ImpalaModule, step: int) -> dict:
    """What Lightning's trainer.save_checkpoint hands the checkpoint IO, in the parts used here."""
    return {"global_step": step, "hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}


class Stop(Exception):
    """Raised by ProbeCLI before fit starts, carrying the CLI."""


class ProbeCLI(ImpalaCLI):
    """ImpalaCLI that notes the model's max_frames that Lightning left in the config, and stops
    before fit."""

    def before_instantiate_classes(self) -> None:
        self.max_frames_from_lightning = self.config.fit.model.max_frames
        super().before_instantiate_classes()

    def before_fit(self) -> None:
        super().before_fit()
        raise Stop(self)


def test_lightning_cli_puts_the_checkpoints_hyperparameters_in_the_config_and_the_configs_win(tmp_path):
    # The checkpoint of a run with another budget and lr (cartpole.yaml's architecture).
    module = ImpalaModule(obs_shape=[4], num_actions=2, torso="mlp", hidden_size=64,
                          max_frames=111, learning_rate=0.5)
    ckpt_path = tmp_path / "last.ckpt"
    torch.save(checkpoint_of(module, step=3), ckpt_path)
    args = ["fit", "--config", str(REPO / "configs/cartpole.yaml"), "--ckpt_path", str(ckpt_path),
            "--model.max_frames", "222", "--trainer.logger", "false", "--checkpoint.dirpath", str(tmp_path)]
    with pytest.raises(Stop) as stop:
        ProbeCLI(ImpalaModule, ImpalaDataModule, trainer_defaults=TRAINER_DEFAULTS,
                 auto_configure_optimizers=False, save_config_callback=None,
                 parser_kwargs={"exit_on_error": False}, args=args)
    cli = stop.value.args[0]
    # What ImpalaCLI undoes: if Lightning stops doing it, ImpalaCLI's parse_arguments and
    # before_instantiate_classes can go.
    assert cli.max_frames_from_lightning == 111, "LightningCLI no longer puts the checkpoint's hyperparameters in"
    assert cli.model.hparams.max_frames == 222 and cli.model.hparams.learning_rate == 0.003
