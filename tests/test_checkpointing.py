"""Checkpoint files (atomic, with the TorchScript policy beside each), and the promise that
kart_lightning uses only Lightning's public API, with the order of LightningCLI's steps that
the command line's checkpoint handling rests on."""

import errno
import importlib
import inspect
import json
import os
import pkgutil
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from kart_lightning.checkpointing import (
    METADATA_FILE,
    PolicyCheckpointIO,
    policy_metadata,
    policy_path,
    remove_stale_temporaries,
    write_atomically,
)
from kart_lightning.cli import TRAINER_DEFAULTS, ImpalaCLI
from kart_lightning.data.datamodule import ImpalaDataModule
from kart_lightning.envs import EnvConfig
from kart_lightning.errors import SaveFailed
from kart_lightning.module import ImpalaModule

REPO = Path(__file__).resolve().parents[1]


def checkpoint_of(module: ImpalaModule, step: int) -> dict:
    """What Lightning's trainer.save_checkpoint hands the checkpoint IO, in the parts used here."""
    return {"global_step": step, "hyper_parameters": dict(module.hparams), "state_dict": module.state_dict()}


def test_each_checkpoint_has_its_policy_beside_it_with_its_weights_and_loses_it_with_it(tmp_path):
    torch.manual_seed(0)
    module = ImpalaModule(obs_shape=[4], num_actions=2, torso="mlp", hidden_size=16)
    io = PolicyCheckpointIO(obs_dtype="float32", env=EnvConfig(id="CartPole-v1"))
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(checkpoint_of(module, step=7), path)
    with torch.no_grad():
        module.policy.policy.weight.add_(1.0)  # the next checkpoint's weights differ
    io.save_checkpoint(checkpoint_of(module, step=8), path)

    policy = torch.jit.load(policy_path(path), _extra_files=(extra := {METADATA_FILE: ""}))
    assert policy_path(path).name == "last.policy.pt"
    saved = torch.load(path, weights_only=True)
    for name, tensor in policy.state_dict().items():
        assert torch.equal(tensor, saved["state_dict"][f"policy.{name}"]), name
    metadata = json.loads(extra[METADATA_FILE])
    assert metadata["learner_step"] == 8 and metadata["obs_shape"] == [4] and metadata["obs_dtype"] == "float32"
    assert metadata["env"]["id"] == "CartPole-v1" and "actions" not in metadata

    io.remove_checkpoint(path)
    assert list(tmp_path.iterdir()) == []


KILLED_MID_WRITE = r"""
import sys, time
from pathlib import Path
from kart_lightning.checkpointing import write_atomically

def write(file):
    file.write(b"new" * 100_000)
    file.flush()
    print("halfway", flush=True)
    time.sleep(120)

write_atomically(Path(sys.argv[1]), write)
"""


def test_a_process_killed_mid_write_leaves_the_previous_checkpoint_whole(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"old")
    writer = subprocess.Popen([sys.executable, "-c", KILLED_MID_WRITE, str(path)],
                              cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline() == "halfway\n"
    finally:
        writer.kill()
        writer.wait(timeout=30)
    assert path.read_bytes() == b"old"


def test_a_write_that_fails_leaves_the_previous_checkpoint_whole_and_no_temporary_file(tmp_path):
    module = ImpalaModule(obs_shape=[4], num_actions=2, torso="mlp", hidden_size=16)
    io = PolicyCheckpointIO(export_policy=False)
    path = tmp_path / "last.ckpt"
    io.save_checkpoint(checkpoint_of(module, step=7), path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("the write fails halfway")

    broken = {**checkpoint_of(module, step=8), "big": torch.zeros(1_000_000), "zz": Unpicklable()}
    with pytest.raises(RuntimeError, match="halfway"):
        io.save_checkpoint(broken, path)
    assert torch.load(path, weights_only=True)["global_step"] == 7
    assert [file.name for file in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_full_disk_is_one_sentence_and_leaves_the_previous_checkpoint_whole(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"old")

    def fill(file):
        file.write(b"new")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what write() says on a full disk

    with pytest.raises(SaveFailed) as failure:
        write_atomically(path, fill)
    assert str(failure.value) == (
        f"cannot write {path} (No space left on device): free space in {tmp_path} or choose another folder "
        "with --checkpoint.dirpath; last.ckpt there is unchanged."
    )
    assert path.read_bytes() == b"old" and [file.name for file in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.fixture
def small_disk(tmp_path):
    """A real 256 KiB file system (tmpfs), mounted for the test: mounting needs root."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a small tmpfs is mounted to fill it, which needs root")
    folder = tmp_path / "small-disk"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], check=True)
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_a_checkpoint_bigger_than_the_free_space_is_one_sentence_and_the_previous_one_stays(small_disk):
    module = ImpalaModule(obs_shape=[4], num_actions=2, torso="mlp", hidden_size=16)
    io = PolicyCheckpointIO(obs_dtype="float32", env=EnvConfig(id="CartPole-v1"))
    path = small_disk / "last.ckpt"
    io.save_checkpoint(checkpoint_of(module, step=7), path)
    too_big = {**checkpoint_of(module, step=8), "filler": torch.zeros(100_000)}  # 400 kB
    with pytest.raises(SaveFailed, match=r"\(No space left on device\): free space in .* last.ckpt there is unchanged"):
        io.save_checkpoint(too_big, path)
    assert torch.load(path, weights_only=True)["global_step"] == 7
    assert sorted(file.name for file in small_disk.iterdir()) == ["last.ckpt", "last.policy.pt"]


def test_temporary_files_of_killed_writers_are_removed_and_those_of_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".last.ckpt.{dead.pid}.tmp"
    live = tmp_path / f".last.ckpt.{os.getpid()}.tmp"
    for file in (stale, live, tmp_path / "last.ckpt"):
        file.write_bytes(b"x")
    assert remove_stale_temporaries(tmp_path) == [stale]
    assert sorted(file.name for file in tmp_path.iterdir()) == sorted([live.name, "last.ckpt"])


def test_the_policy_metadata_names_the_actions_where_the_env_family_does():
    checkpoint = {"hyper_parameters": {"obs_shape": [4, 84, 84], "num_actions": 7}, "global_step": 3,
                  "state_dict": {"env_frames": torch.tensor(960)}}
    kart = policy_metadata(checkpoint, "uint8", EnvConfig(id="SuperMarioKart-Snes-v0"))["actions"]
    assert list(kart)[:3] == ["noop", "accelerate", "accelerate_left"] and kart["accelerate"] == ["B"]
    assert "actions" not in policy_metadata(checkpoint, "float32", EnvConfig(id="CartPole-v1"))


class Stop(Exception):
    """Raised by the probes below to end the CLI before fit, carrying what they saw."""


class StockProbeCLI(ImpalaCLI):
    """ImpalaCLI with LightningCLI's own parse_arguments, stopped before instantiation with the
    model's max_frames that Lightning left in the config."""

    def parse_arguments(self, parser, args) -> None:
        LightningCLI.parse_arguments(self, parser, args)

    def before_instantiate_classes(self) -> None:
        raise Stop(self.config.fit.model.max_frames)


class ProbeCLI(ImpalaCLI):
    """ImpalaCLI stopped where fit would start."""

    def before_fit(self) -> None:
        super().before_fit()
        raise Stop(self)


def run_until_stopped(cli_class: type[ImpalaCLI], ckpt_path: Path, run_dir: Path):
    args = ["fit", "--config", str(REPO / "configs/cartpole.yaml"), "--ckpt_path", str(ckpt_path),
            "--model.max_frames", "222", "--trainer.logger", "false", "--checkpoint.dirpath", str(run_dir)]
    with pytest.raises(Stop) as stop:
        cli_class(ImpalaModule, ImpalaDataModule, trainer_defaults=TRAINER_DEFAULTS,
                  auto_configure_optimizers=False, save_config_callback=None,
                  parser_kwargs={"exit_on_error": False}, args=args)
    return stop.value.args[0]


def test_lightning_cli_reads_a_checkpoints_hyperparameters_into_the_config_before_instantiating(tmp_path):
    # What ImpalaCLI.parse_arguments keeps the checkpoint away from. When this fails, Lightning
    # has moved or dropped that step: ImpalaCLI's parse_arguments and before_instantiate_classes
    # must follow (or can go).
    module = ImpalaModule(obs_shape=[4], num_actions=2, torso="mlp", hidden_size=64, max_frames=111)
    torch.save(checkpoint_of(module, step=3), ckpt_path := tmp_path / "last.ckpt")
    assert run_until_stopped(StockProbeCLI, ckpt_path, tmp_path) == 111


def test_the_config_decides_the_hyperparameters_of_a_run_given_any_checkpoint_of_its_model(tmp_path):
    # A run with another budget and lr (cartpole.yaml's architecture), saved from Python (a
    # dataclass among its hyperparameters) by a version whose model had another argument.
    module = ImpalaModule(obs_shape=[4], num_actions=2, torso="mlp", hidden_size=64,
                          max_frames=111, learning_rate=0.5)
    checkpoint = {**checkpoint_of(module, step=3), "datamodule_hyper_parameters": {"env": EnvConfig("CartPole-v1")}}
    checkpoint["hyper_parameters"]["no_longer_an_argument"] = 1
    torch.save(checkpoint, ckpt_path := tmp_path / "last.ckpt")
    cli = run_until_stopped(ProbeCLI, ckpt_path, tmp_path)
    assert cli.model.hparams.max_frames == 222 and cli.model.hparams.learning_rate == 0.003
    assert cli.config_init.fit.ckpt_path == str(ckpt_path), "fit still resumes from the checkpoint"


PRIVATE_LIGHTNING = re.compile(r"trainer\._|_checkpoint_connector|strategy\._|experiment\._")


def test_kart_lightning_uses_only_lightnings_public_api():
    package = REPO / "kart_lightning"
    uses = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()}"
        for path in sorted(package.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if PRIVATE_LIGHTNING.search(line)
    ]
    assert uses == []
    overrides = []
    for info in pkgutil.walk_packages([str(package)], prefix="kart_lightning."):
        module = importlib.import_module(info.name)
        for cls in vars(module).values():
            if not (inspect.isclass(cls) and cls.__module__ == module.__name__):
                continue
            lightning = [base for base in cls.__mro__[1:] if base.__module__.startswith("lightning")]
            overrides += [
                f"{cls.__qualname__}.{name}" for name in vars(cls)
                if name.startswith("_") and not name.startswith("__") and name != "_abc_impl"
                and any(name in vars(base) for base in lightning)
            ]
    assert overrides == []
