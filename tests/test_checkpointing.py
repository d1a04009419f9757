"""Checkpoint files (atomic, with the TorchScript policy beside each) and the command line's
checkpoint handling that rests on LightningCLI's order of steps."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kart_lightning.checkpointing import METADATA_FILE, PolicyCheckpointIO, action_names, policy_path
from kart_lightning.cli import TRAINER_DEFAULTS, ImpalaCLI
from kart_lightning.data.datamodule import ImpalaDataModule
from kart_lightning.envs import EnvConfig
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


def test_only_mario_kart_actions_have_names():
    kart = action_names(EnvConfig(id="SuperMarioKart-Snes-v0"))
    assert list(kart)[:3] == ["noop", "accelerate", "accelerate_left"] and kart["accelerate"] == ["B"]
    assert action_names(EnvConfig(id="CartPole-v1")) is None


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
