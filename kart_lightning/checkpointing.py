"""How fit's checkpoint files are written: each atomically, with the TorchScript policy it holds
beside it (`NAME.policy.pt` beside `NAME.ckpt`), and `last.ckpt` whenever fit ends.

The policy file needs only torch to run:

    import torch
    extra = {"kart_lightning.json": ""}                  # obs shape and dtype, actions, preprocessing
    policy = torch.jit.load("checkpoints/last.policy.pt", _extra_files=extra)
    obs = torch.zeros(1, 4, 84, 84, dtype=torch.uint8)   # shape and dtype in the metadata
    action, logits, value, state = policy.act(obs, torch.zeros(1, dtype=torch.long), torch.zeros(1),
                                              torch.ones(1, dtype=torch.bool), policy.initial_state(1), True)
"""

import dataclasses
import errno
import json
import os
import pickle
import re
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from kart_lightning.envs import EnvConfig, find_family, registered_families
from kart_lightning.errors import ConfigError, SaveFailed
from kart_lightning.models import ActorCritic

METADATA_FILE = "kart_lightning.json"
"""The policy file's metadata, read with torch.jit.load(path, _extra_files={METADATA_FILE: ""})."""
ARCHITECTURE_KEYS = ("obs_shape", "num_actions", "torso", "hidden_size", "use_lstm", "lstm_size")
"""The model hyperparameters that build the policy (ActorCritic's arguments)."""
TEMPORARY_PREFIX, TEMPORARY_SUFFIX = ".", ".tmp"
"""`write_atomically` writes `NAME` as `.NAME.PID.tmp` first."""
POLICY_INPUTS = (
    "act(obs [B, *obs_shape], prev_action [B] int64, reward [B] float32, done [B] bool, "
    "core_state (h, c), greedy bool) -> (action [B], logits [B, A], value [B], core_state)"
)


def policy_path(checkpoint_path: str | Path) -> Path:
    """`run/last.ckpt` -> `run/last.policy.pt`."""
    return Path(checkpoint_path).with_suffix(".policy.pt")


def policy_metadata(checkpoint: dict[str, Any], obs_dtype: str, env: EnvConfig | None) -> dict[str, Any]:
    """What a user of the policy file needs to feed it: from the checkpoint, its input shape,
    action count and training progress; from the run, the observations' dtype and the env."""
    hparams = checkpoint["hyper_parameters"]
    metadata: dict[str, Any] = {
        "obs_shape": list(hparams["obs_shape"]),
        "obs_dtype": obs_dtype,
        "num_actions": hparams["num_actions"],
        "learner_step": checkpoint["global_step"],
        "env_frames": int(checkpoint["state_dict"]["env_frames"]),
        "inputs": POLICY_INPUTS,
    }
    if env is not None:
        metadata["env"] = dataclasses.asdict(env)
        action_names = find_family(env.id).action_names
        if action_names is not None:
            metadata["actions"] = action_names(env)
    return metadata


def write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write` on a temporary file in `path`'s folder, then rename it to `path`: a process
    killed mid-write (or a write that fails) leaves the previous file whole."""
    temporary = path.with_name(f"{TEMPORARY_PREFIX}{path.name}.{os.getpid()}{TEMPORARY_SUFFIX}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as file:
            write(file)
            file.flush()
            # On disk before the rename, so that a machine that goes down keeps one whole file.
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except Exception as error:
        cause = _os_error(error)
        if cause is None or cause.errno not in SAVE_FIXES:
            raise
        kept = f"{path.name} there is unchanged" if path.is_file() else f"no {path.name} was written"
        raise SaveFailed(
            f"cannot write {path} ({cause.strerror}): {SAVE_FIXES[cause.errno].format(folder=path.parent)}; {kept}."
        ) from error
    finally:
        temporary.unlink(missing_ok=True)


SAVE_FIXES = {
    errno.ENOSPC: "free space in {folder} or choose another folder with --checkpoint.dirpath",
    errno.EDQUOT: "free space in {folder} or choose another folder with --checkpoint.dirpath",
    errno.EACCES: "choose a writable folder with --checkpoint.dirpath",
    errno.EPERM: "choose a writable folder with --checkpoint.dirpath",
    errno.EROFS: "choose a writable folder with --checkpoint.dirpath",
}
"""The write errors a user can fix (a full disk, a folder they may not write), and how."""


def _os_error(error: BaseException) -> OSError | None:
    """The OSError behind `error`: itself, or what it was raised from or during (torch.save's
    zip writer may fail again while closing the archive and report that instead)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError) and error.errno is not None:
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files that `write_atomically` calls killed mid-write left in
    `folder` (those of processes no longer running), and return them."""
    removed = []
    for candidate in Path(folder).glob(f"{TEMPORARY_PREFIX}*{TEMPORARY_SUFFIX}"):
        pid = candidate.name.removesuffix(TEMPORARY_SUFFIX).rpartition(".")[2]
        if pid.isdigit() and not _running(int(pid)):
            candidate.unlink(missing_ok=True)
            removed.append(candidate)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def move_checkpoint(source: Path, target: Path) -> None:
    """Rename a checkpoint and its policy file, replacing `target`'s."""
    if policy_path(source).is_file():
        os.replace(policy_path(source), policy_path(target))
    else:
        policy_path(target).unlink(missing_ok=True)
    os.replace(source, target)


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint and its policy file, if there."""
    Path(path).unlink(missing_ok=True)
    policy_path(path).unlink(missing_ok=True)


def allow_config_types() -> None:
    """Let torch.load(weights_only=True), ours and Lightning's, read the config dataclasses that
    checkpoints saved from Python hold among their hyperparameters (EnvConfig and the game
    families' options): they are plain data. Nothing else beyond tensors and plain types."""
    torch.serialization.add_safe_globals(
        [EnvConfig, *(family.options for family in registered_families() if family.options is not None)]
    )


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """The checkpoint at `path`, read with torch.load(weights_only=True): tensors and plain Python
    types only, so nothing in the file runs. ConfigError, in one sentence naming the fix, for a
    file that is not a kart_lightning checkpoint (missing, an exported policy, truncated, of
    another program, or holding any other type)."""
    path = Path(path)
    fix = "pass a .ckpt file written by kart_lightning fit"
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist: {fix}.")
    if not zipfile.is_zipfile(path):
        # torch.save writes a zip archive; a file cut short loses the archive's directory at its end.
        raise ConfigError(f"{path} is not a checkpoint, or was cut short: {fix}.")
    if _is_torchscript(path):
        raise ConfigError(
            f"{path} is an exported TorchScript policy, not a checkpoint: pass the .ckpt file beside it "
            f"({path.name.removesuffix('.policy.pt')}.ckpt)."
        )
    allow_config_types()
    try:
        # mmap: only the small pickled part is read, not the weights and optimizer state.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        unsafe = re.search(r"GLOBAL ([\w.]+)", str(error))
        if unsafe:
            raise ConfigError(
                f"checkpoint {path} holds a {unsafe.group(1)}, which kart_lightning never loads (loading it "
                f"could run code): {fix}."
            ) from None
        raise ConfigError(f"{path} is not a checkpoint (it cannot be unpickled): {fix}.") from None
    except (OSError, RuntimeError, EOFError, ValueError) as error:
        raise ConfigError(f"checkpoint {path} cannot be read ({_first_line(error)}): {fix}.") from None
    if not (isinstance(checkpoint, dict) and isinstance(checkpoint.get("hyper_parameters"), dict)
            and any(name.startswith("policy.") for name in checkpoint.get("state_dict", {}))):
        raise ConfigError(f"{path} is not a kart_lightning checkpoint (another program's?): {fix}.")
    return checkpoint


def _is_torchscript(path: Path) -> bool:
    """Whether the zip archive at `path` is TorchScript's: the scripted code in a `code/` folder."""
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def saved_step(path: Path) -> int | None:
    """The learner step of the checkpoint at `path`; None when there is none."""
    if not path.is_file():
        return None
    return read_checkpoint(path, mmap=True)["global_step"]


class PolicyCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO, with every `NAME.ckpt` written atomically and, when
    `export_policy`, the policy it holds written beside it as TorchScript on the CPU
    (`NAME.policy.pt`, with METADATA_FILE); the two are removed together.

    The policy is built from the checkpoint itself (its hyperparameters and `policy.` weights),
    so it holds exactly the checkpoint's weights, whenever they were saved.

    Args:
        export_policy: write `NAME.policy.pt` beside each checkpoint.
        obs_dtype: the observations' dtype (`uint8`, `float32`), for the metadata.
        env: the env the policy plays, for the metadata.
    """

    def __init__(self, export_policy: bool = True, obs_dtype: str = "", env: EnvConfig | None = None) -> None:
        self.export_policy = export_policy
        self.obs_dtype = obs_dtype
        self.env = env
        # Scripting takes a while: one scripted module per architecture, given each checkpoint's weights.
        self._policy: torch.jit.ScriptModule | None = None
        self._architecture: dict[str, Any] | None = None

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options.")
        path = Path(path)
        write_atomically(path, lambda file: torch.save(checkpoint, file))
        if self.export_policy:
            policy = self.policy(checkpoint)
            metadata = json.dumps(policy_metadata(checkpoint, self.obs_dtype, self.env), indent=2)
            extra_files = {METADATA_FILE: metadata}
            write_atomically(policy_path(path), lambda file: torch.jit.save(policy, file, _extra_files=extra_files))

    def remove_checkpoint(self, path: str | Path) -> None:
        remove_checkpoint(Path(path))

    def policy(self, checkpoint: dict[str, Any]) -> torch.jit.ScriptModule:
        """The scripted policy with the checkpoint's weights, on the CPU, in eval mode."""
        architecture = {key: checkpoint["hyper_parameters"][key] for key in ARCHITECTURE_KEYS}
        if architecture != self._architecture:
            self._policy = torch.jit.script(ActorCritic(**architecture)).eval()
            self._architecture = architecture
        prefix = "policy."
        weights = {name.removeprefix(prefix): tensor for name, tensor in checkpoint["state_dict"].items()
                   if name.startswith(prefix)}
        self._policy.load_state_dict(weights)
        return self._policy


class CheckpointFiles(Callback):
    """Makes fit's checkpoint files complete: writes them through PolicyCheckpointIO (atomically,
    each with its TorchScript policy beside it), and saves `last.ckpt` whenever fit ends (the frame
    budget, max_time, Ctrl-C), not only at ModelCheckpoint's interval, so a stopped run loses no
    learner steps. SIGTERM (a scheduler's stop, torchrun's restart, `kill`) is such an end too:
    Lightning ends fit after the step under way, and last.ckpt holds it. Other exceptions leave
    the last good `last.ckpt` as it is.

    Args:
        export_policy: write `NAME.policy.pt`, the policy alone as TorchScript, beside each `NAME.ckpt`.
    """

    def __init__(self, export_policy: bool = True) -> None:
        self.export_policy = export_policy

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        io = trainer.strategy.checkpoint_io
        if type(io) not in (TorchCheckpointIO, PolicyCheckpointIO):
            raise ConfigError(
                f"the trainer writes checkpoints with {type(io).__name__}, and CheckpointFiles needs to write them "
                "itself: remove that plugin from trainer.plugins."
            )
        data = trainer.datamodule
        obs_dtype = str(getattr(data, "obs_dtype", "")).removeprefix("torch.")
        env = getattr(data, "env", None)
        trainer.strategy.checkpoint_io = PolicyCheckpointIO(self.export_policy, obs_dtype, env)
        if trainer.is_global_zero:
            for checkpoint in trainer.checkpoint_callbacks:
                if checkpoint.dirpath and Path(checkpoint.dirpath).is_dir():
                    remove_stale_temporaries(Path(checkpoint.dirpath))

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.save_last(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):  # Ctrl-C: the user chose to stop here
            self.save_last(trainer)
        elif isinstance(exception, SIGTERMException):  # raised between two steps, on every rank
            self.save_last(trainer)
            if trainer.is_global_zero:
                print(f"kart_lightning: SIGTERM: fit stopped after step {trainer.global_step} and saved last.ckpt "
                      "(resume with --ckpt_path last).", file=sys.stderr, flush=True)

    def save_last(self, trainer: Trainer) -> None:
        """Save `last.ckpt` in each ModelCheckpoint's folder that keeps one, unless it holds this step."""
        if trainer.state.fn != TrainerFn.FITTING or trainer.fast_dev_run or trainer.global_step == 0:
            return
        for checkpoint in trainer.checkpoint_callbacks:
            if not (isinstance(checkpoint, ModelCheckpoint) and checkpoint.save_last and checkpoint.dirpath):
                continue
            path = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
            behind = trainer.is_global_zero and saved_step(path) != trainer.global_step
            # Saving is collective: every rank follows rank 0, the one that reads the file.
            if trainer.strategy.broadcast(behind):
                trainer.save_checkpoint(path, weights_only=checkpoint.save_weights_only)
                # ModelCheckpoint saves `last` at the end too when it never has (a run shorter than
                # its interval); knowing this file as its own, it writes it again rather than
                # beside it as last-v1.ckpt.
                checkpoint.last_model_path = str(path)
