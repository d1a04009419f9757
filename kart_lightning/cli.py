"""The command line: LightningCLI over ImpalaModule and ImpalaDataModule (fit, validate, test).

User mistakes are caught here and end in one sentence naming the fix, with exit code 2.
"""

import os
import pickle
import sys
from typing import Any

import torch
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from kart_lightning.data.datamodule import ImpalaDataModule
from kart_lightning.data.pool import ActorFailed
from kart_lightning.errors import ConfigError
from kart_lightning.module import ImpalaModule

LIGHTNING_CKPT_ALIASES = ("last", "best", "hpc", "registry")
# Weights that must match between a checkpoint and the model built from the config.
ARCHITECTURE_KEYS = ("obs_shape", "num_actions", "torso", "hidden_size", "use_lstm", "lstm_size")

TRAINER_DEFAULTS: dict[str, Any] = {
    # The trajectory stream is endless: model.max_frames ends a run, not epochs.
    "max_epochs": -1,
    "gradient_clip_val": 40.0,
    "check_val_every_n_epoch": None,
    "val_check_interval": 1000,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 10,
}
CHECKPOINT_DEFAULTS: dict[str, Any] = {
    "checkpoint.dirpath": "checkpoints",
    "checkpoint.save_last": True,
    "checkpoint.every_n_train_steps": 500,
}


class KartCLI(LightningCLI):
    """LightningCLI that fills the model's observation shape and action count from the env."""

    @staticmethod
    def subcommands() -> dict[str, set]:
        commands = LightningCLI.subcommands()
        return {name: commands[name] for name in ("fit", "validate", "test")}

    def add_arguments_to_parser(self, parser) -> None:
        # Always one ModelCheckpoint, configured under `checkpoint:`; fit --ckpt_path last finds it.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(CHECKPOINT_DEFAULTS)
        parser.link_arguments("data.obs_shape", "model.obs_shape", apply_on="instantiate")
        parser.link_arguments("data.num_actions", "model.num_actions", apply_on="instantiate")

    def _parse_ckpt_path(self) -> None:
        """Keep the config's hyperparameters rather than the checkpoint's, so a resumed run can
        change max_frames or the lr; `check_checkpoint` refuses a checkpoint of another model."""

    def _run_subcommand(self, subcommand: str) -> None:
        check_checkpoint(self.config_init[subcommand].get("ckpt_path"), self.model.hparams)
        super()._run_subcommand(subcommand)


def check_checkpoint(ckpt_path: str | None, model_hparams: dict[str, Any]) -> None:
    """Raise ConfigError unless ckpt_path is empty, a Lightning alias, or a readable checkpoint
    whose architecture matches the model built from the config."""
    if ckpt_path is None or ckpt_path in LIGHTNING_CKPT_ALIASES:
        return
    if not os.path.isfile(ckpt_path):
        raise ConfigError(
            f"checkpoint {ckpt_path} does not exist: pass --ckpt_path an existing .ckpt file "
            "(or `last` to resume the latest checkpoint in the checkpoint folder)."
        )
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        saved = checkpoint["hyper_parameters"]
    except (OSError, RuntimeError, KeyError, EOFError, ValueError, pickle.UnpicklingError) as error:
        raise ConfigError(
            f"checkpoint {ckpt_path} cannot be read ({type(error).__name__}): pass a .ckpt file "
            "written by kart_lightning fit."
        ) from None
    differences = [
        f"{key} {saved.get(key)} vs {model_hparams.get(key)}"
        for key in ARCHITECTURE_KEYS
        if list_or_value(saved.get(key)) != list_or_value(model_hparams.get(key))
    ]
    if differences:
        raise ConfigError(
            f"checkpoint {ckpt_path} was trained with a different model or env "
            f"({'; '.join(differences)} in checkpoint vs config): use the config it was trained with."
        )


def list_or_value(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def main(args: list[str] | None = None) -> None:
    try:
        KartCLI(
            ImpalaModule,
            ImpalaDataModule,
            trainer_defaults=TRAINER_DEFAULTS,
            seed_everything_default=0,
            # The module configures RMSProp/Adam and the frame-based lr decay itself.
            auto_configure_optimizers=False,
            save_config_kwargs={"overwrite": True},
            # Parse errors come back as exceptions, so they print as one line, not a usage dump.
            parser_kwargs={"exit_on_error": False, "prog": "python -m kart_lightning"},
            args=args,
        )
    except ArgumentError as error:
        fail(f"{' '.join(str(error).split())} (see `python -m kart_lightning SUBCOMMAND --help`).")
    except ConfigError as error:
        fail(str(error))
    except ActorFailed as error:
        # Not the user's mistake, but the actor's traceback says more than ours would.
        fail(str(error), exit_code=1)


def fail(message: str, exit_code: int = 2) -> None:
    print(f"kart_lightning: error: {message}", file=sys.stderr)
    sys.exit(exit_code)
