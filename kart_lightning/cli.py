"""The command line: LightningCLI over ImpalaModule and ImpalaDataModule (fit, validate, test).

User mistakes are caught here and end in one sentence naming the fix, with exit code 2.
"""

import dataclasses
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import gymnasium
import torch
from jsonargparse import ArgumentError, ArgumentParser
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from kart_lightning.callbacks import EpisodeRecorder, HeldOutEvaluation, StopAtThreshold
from kart_lightning.checkpointing import (
    ARCHITECTURE_KEYS,
    CheckpointFiles,
    allow_config_types,
    read_checkpoint,
)
from kart_lightning.console import quiet_library_notices
from kart_lightning.data import ActorFailed, ImpalaDataModule, WeightPublisher
from kart_lightning.distributed import RESUME_HINT, RankWatch, first_line, is_collective_failure, rank_prefix
from kart_lightning.envs import env_config_from_dict
from kart_lightning.errors import ConfigError, SaveFailed
from kart_lightning.evaluation import held_out_envs
from kart_lightning.module import ImpalaModule
from kart_lightning.recording import RecordOptions, record_episode

# Lightning's ckpt_path values that name no file; not "best", which no checkpoint callback here
# tracks across processes (the best on held-out tracks is the file best.ckpt).
LIGHTNING_CKPT_ALIASES = ("last", "hpc", "registry")

TRAINER_DEFAULTS: dict[str, Any] = {
    # The trajectory stream is endless: model.max_frames ends a run, not epochs.
    "max_epochs": -1,
    "gradient_clip_val": 40.0,
    "check_val_every_n_epoch": None,
    "num_sanity_val_steps": 0,
    "log_every_n_steps": 10,
}
CHECKPOINT_DEFAULTS: dict[str, Any] = {
    "checkpoint.dirpath": "checkpoints",
    "checkpoint.save_last": True,
    "checkpoint.every_n_train_steps": 500,
    # Nothing monitored: a top-k file would be a copy of last.ckpt (HeldOutEvaluation keeps the best).
    "checkpoint.save_top_k": 0,
}


class ImpalaCLI(LightningCLI):
    """LightningCLI that fills the model's observation shape and action count from the env.

    During fit, evaluation and recording run in their own processes (`evaluation:` and
    `recorder:`, see callbacks.py), so Lightning's in-process validation loop is off; `validate`
    and `test` play their episodes in-process.

    The config decides the hyperparameters, also when --ckpt_path resumes a run or names the
    weights to test, so a resumed run can raise max_frames or change the lr; a checkpoint of
    another architecture is refused.
    """

    @staticmethod
    def subcommands() -> dict[str, set]:
        commands = LightningCLI.subcommands()
        return {name: commands[name] for name in ("fit", "validate", "test")}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # With several ranks (DDP): one that fails or vanishes ends the whole job, not a hang. First,
        # so every rank has stopped watching before the final checkpoint's collectives, and no rank
        # takes another's normal exit for a loss.
        parser.add_lightning_class_args(RankWatch, "ranks")
        # Always one ModelCheckpoint, configured under `checkpoint:`; fit --ckpt_path last finds it.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults(CHECKPOINT_DEFAULTS)
        parser.add_lightning_class_args(CheckpointFiles, "checkpoint_files")
        parser.add_lightning_class_args(HeldOutEvaluation, "evaluation")
        parser.add_lightning_class_args(EpisodeRecorder, "recorder")
        parser.add_lightning_class_args(StopAtThreshold, "stop")
        # Hands the policy to the DataModule and its weights to the actors after each step.
        parser.add_lightning_class_args(WeightPublisher, "weights")
        parser.link_arguments("data.obs_shape", "model.obs_shape", apply_on="instantiate")
        parser.link_arguments("data.num_actions", "model.num_actions", apply_on="instantiate")
        parser.link_arguments("data.mirrored_actions", "model.mirrored_actions", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is None:
            return
        config = self.config[subcommand]
        if config.get("weights_only") is False:
            raise ConfigError(
                "weights_only false would let a checkpoint run code as it loads: kart_lightning reads "
                "checkpoints with weights_only=True only; remove --weights_only."
            )
        check_checkpoint(config.ckpt_path, None)
        if subcommand == "fit":
            check_checkpoint_monitor(config.checkpoint.monitor)
            if config.model.trust_region_kl is not None and config.data.exploration.epsilon > 0:
                raise ConfigError(
                    "model.trust_region_kl leaves out every unroll with a held random action "
                    "(data.exploration): set one of --model.trust_region_kl null or --data.exploration.epsilon 0."
                )
            if config.model.lr_decay_time and config.trainer.max_time is None:
                raise ConfigError(
                    "model.lr_decay_time decays the lr over trainer.max_time, which is not set: set "
                    "trainer.max_time (such as 00:02:15:00), or model.lr_decay_time false."
                )
        # LightningCLI (2.6.6) next reads the checkpoint's model arguments into the config, which
        # would replace the config's, loading it with weights_only=True (which refuses a checkpoint
        # whose hyperparameters hold a dataclass) and parsing them (which refuses arguments the
        # model no longer has). It finds no ckpt_path: before_instantiate_classes puts it back
        # (tests/test_checkpointing.py checks this order).
        self.ckpt_path, config.ckpt_path = config.ckpt_path, None

    def before_instantiate_classes(self) -> None:
        if self.subcommand is not None:
            self.config[self.subcommand].ckpt_path = self.ckpt_path

    def before_fit(self) -> None:
        self.trainer.limit_val_batches = 0
        note_slow_precision(self.trainer)
        check_checkpoint(self.config.fit.ckpt_path, self.model.hparams)
        for callback in self.trainer.callbacks:
            if isinstance(callback, HeldOutEvaluation):
                callback.check_monitor(self.datamodule.eval_env)
        for checkpoint in self.trainer.checkpoint_callbacks:
            if checkpoint.dirpath:
                check_writable(checkpoint.dirpath, "--checkpoint.dirpath")

    def before_validate(self) -> None:
        check_checkpoint(self.config.validate.ckpt_path, self.model.hparams)

    def before_test(self) -> None:
        check_checkpoint(self.config.test.ckpt_path, self.model.hparams)


def note_slow_precision(trainer) -> None:
    """One sentence when bfloat16 on this CPU learner would be emulated, slower than float32."""
    bfloat16_on_cpu = str(trainer.precision).startswith("bf16") and trainer.strategy.root_device.type == "cpu"
    # oneDNN's own bf16 check passes on any AVX512 CPU, where bfloat16 is still emulated. These
    # checks are torch's private ones: a torch without them is taken to have the instructions.
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    if bfloat16_on_cpu and not any(getattr(torch.cpu, check, lambda: True)() for check in checks):
        rank_zero_info(
            "kart_lightning: this CPU has no bfloat16 instructions (AMX or AVX512-BF16), so "
            f"trainer.precision {trainer.precision} runs slower than float32: set --trainer.precision 32-true."
        )


def check_checkpoint_monitor(monitor: str | None) -> None:
    """Raise ConfigError when ModelCheckpoint monitors a metric of the held-out evaluation: its
    score comes from another process, after ModelCheckpoint's save was due, and Lightning then
    defers that save to a validation loop that never runs during fit."""
    if (monitor or "").startswith("val/"):
        raise ConfigError(
            f"checkpoint.monitor is {monitor}, which the held-out evaluation computes in its own process: keep "
            f"the best checkpoint by it with evaluation.monitor {monitor} (and evaluation.mode) instead, and set "
            "checkpoint.monitor null."
        )


def check_checkpoint(ckpt_path: str | None, model_hparams: dict[str, Any] | None) -> None:
    """Raise ConfigError unless ckpt_path is empty, a Lightning alias, or a readable checkpoint
    whose architecture matches the model built from the config (when there is one)."""
    if ckpt_path is None or ckpt_path in LIGHTNING_CKPT_ALIASES:
        return
    if not os.path.isfile(ckpt_path):
        raise ConfigError(
            f"checkpoint {ckpt_path} does not exist: pass --ckpt_path an existing .ckpt file "
            "(or `last` to resume the latest checkpoint in the checkpoint folder; the best on the held-out "
            "tracks is best.ckpt there)."
        )
    saved = read_checkpoint(ckpt_path, mmap=True)["hyper_parameters"]
    if model_hparams is None:
        return
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


def check_writable(folder: str | Path, option: str) -> None:
    """Raise ConfigError naming `option` unless files can be written in `folder` (made if missing):
    found before training rather than at the first checkpoint."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ConfigError(
            f"cannot write to {folder} ({error.strerror or error}): choose a writable folder with {option}."
        ) from None


def list_or_value(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


def record(args: list[str]) -> None:
    """`record --ckpt_path PATH [--track NAME] [--out FILE]`: one episode of a checkpoint's policy
    as a GIF (and, for a race, the trajectory PNG beside it), with the checkpoint's eval env."""
    parser = ArgumentParser(
        prog="python -m kart_lightning record", exit_on_error=False,
        description="Record one episode of a trained policy as a GIF at the emulator's full resolution.",
    )
    parser.add_argument("--ckpt_path", type=str, required=True, help="a .ckpt file written by fit")
    parser.add_argument("--track", type=str | None, default=None,
                        help="state to play, e.g. one of data.eval_env.retro_state (default: the first of the checkpoint's data.eval_env.retro_state)")
    parser.add_argument("--out", type=str | None, default=None,
                        help="GIF file to write (default: beside the checkpoint, NAME-TRACK.gif)")
    parser.add_class_arguments(RecordOptions)
    config = parser.parse_args(args)
    check_checkpoint(config.ckpt_path, None)
    checkpoint = read_checkpoint(config.ckpt_path)
    data = checkpoint.get("datamodule_hyper_parameters")
    if not isinstance(data, dict) or "env" not in data:
        raise ConfigError(
            f"{config.ckpt_path} holds no env settings (a checkpoint of another program?): pass a .ckpt file "
            "written by kart_lightning fit."
        )
    env = env_config_from_dict(data["eval_env"] or data["env"])
    name, env = held_out_envs(env)[0]
    if config.track is not None:
        name, env = config.track, dataclasses.replace(env, retro_state=config.track)
    out = Path(config.out or Path(config.ckpt_path).with_name(f"{Path(config.ckpt_path).stem}-{Path(name).stem}.gif"))
    check_writable(out.parent, "--out")
    module = ImpalaModule.load_from_checkpoint(config.ckpt_path, map_location="cpu", weights_only=True)
    options = RecordOptions(**{field.name: config[field.name] for field in dataclasses.fields(RecordOptions)})
    try:
        result = record_episode(module.policy, env, out, options)
    except gymnasium.error.DependencyNotInstalled as error:
        raise ConfigError(f"{env.id} cannot render frames: {error}") from None
    extra = "".join(f", {key} {value}" for key, value in result.items()
                    if key not in ("return", "length", "gif", "png") and value is not None)
    written = ", ".join(result[key] for key in ("gif", "png") if key in result)
    print(f"{name}: return {result['return']:.2f} in {result['length']} steps{extra}; wrote {written}")


def build_cli(args: list[str] | None, run: bool = True, prog: str = "python -m kart_lightning",
              **cli_kwargs: Any) -> ImpalaCLI:
    """The ImpalaCLI of `python -m kart_lightning` (also what benchmarks build their runs with);
    `cli_kwargs` override LightningCLI's arguments."""
    return ImpalaCLI(
        ImpalaModule,
        ImpalaDataModule,
        **{
            "trainer_defaults": TRAINER_DEFAULTS,
            "seed_everything_default": 0,
            # The module configures RMSProp/Adam and the frame-based lr decay itself.
            "auto_configure_optimizers": False,
            "save_config_kwargs": {"overwrite": True},
            # Parse errors come back as exceptions, so they print as one line, not a usage dump.
            "parser_kwargs": {"exit_on_error": False, "prog": prog},
            "args": args,
            "run": run,
            **cli_kwargs,
        },
    )


def main(args: list[str] | None = None) -> None:
    """The command line, from `args` or else sys.argv."""
    argv = sys.argv[1:] if args is None else args
    quiet_library_notices(argv[0] if argv else None)
    # Lightning's own checkpoint loads (fit --ckpt_path, test) take the same few types as ours.
    allow_config_types()
    try:
        if argv[:1] == ["record"]:
            record(argv[1:])
            return
        # None reads sys.argv, as LightningCLI expects (given both, it warns).
        build_cli(args)
    except ArgumentError as error:
        fail(f"{' '.join(str(error).split())} (see `python -m kart_lightning SUBCOMMAND --help`).")
    except ConfigError as error:
        fail(str(error))
    except SaveFailed as error:
        # Not the user's input: the machine's disk (exit 1), said in one sentence.
        fail(str(error), exit_code=1)
    except ActorFailed as error:
        # Not the user's mistake, but the actor's traceback says more than ours would.
        fail(str(error), exit_code=1)
    except Exception as error:
        # With several ranks: one of the others is gone (RankWatch usually says which first).
        if not (rank_prefix() and is_collective_failure(error)):
            raise
        fail(f"lost contact with the other ranks ({first_line(str(error))[:200]}): the whole job stops ({RESUME_HINT}).",
             exit_code=1)


def fail(message: str, exit_code: int = 2) -> None:
    print(f"kart_lightning: error: {rank_prefix()}{message}", file=sys.stderr)
    sys.exit(exit_code)
