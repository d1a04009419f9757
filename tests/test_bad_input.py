"""Every wrong file or value a user can give ends in one sentence naming the fix, exit code 2, no
traceback, and nothing in a file runs: across fit, test, record, the ROM import and the state maker."""

import gzip
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Queue

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

FRAMES_PER_STEP = 320
"""T=20, B=16 of configs/cartpole.yaml."""


class RunsCode:
    """Unpickling this runs a shell command: what a crafted checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class OtherProgram(LightningModule):
    """Somebody else's Lightning program."""

    def __init__(self) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.fixture(scope="module")
def files(tmp_path_factory, kart) -> dict[str, Path]:
    """A real checkpoint and its policy, and the wrong files a user may pass instead."""
    folder = tmp_path_factory.mktemp("files")
    kart("fit", "--config", "configs/cartpole.yaml", "--model.max_frames", str(10 * FRAMES_PER_STEP),
         "--checkpoint.dirpath", str(folder), "--trainer.default_root_dir", str(folder),
         "--trainer.enable_progress_bar", "false")
    real = folder / "last.ckpt"
    paths = {"checkpoint": real, "policy": folder / "last.policy.pt", "marker": folder / "code-ran"}
    paths["crafted"] = folder / "crafted.ckpt"
    checkpoint = torch.load(real, weights_only=True)
    checkpoint["hyper_parameters"]["payload"] = RunsCode(paths["marker"])
    torch.save(checkpoint, paths["crafted"])
    paths["truncated"] = folder / "truncated.ckpt"
    paths["truncated"].write_bytes(real.read_bytes()[: real.stat().st_size // 2])
    paths["text"] = folder / "notes.ckpt"
    paths["text"].write_text("not a checkpoint\n")
    trainer = Trainer(default_root_dir=folder, max_steps=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(OtherProgram(), DataLoader(torch.zeros(4, 2), batch_size=2))
    paths["other"] = folder / "other.ckpt"
    trainer.save_checkpoint(paths["other"])
    paths["not_a_folder"] = folder / "a-file"
    paths["not_a_folder"].write_text("")
    paths["bad_yaml"] = folder / "bad.yaml"
    paths["bad_yaml"].write_text("model:\n  hidden_size: big\n")
    paths["not_gzip_state"] = folder / "random.state"
    paths["not_gzip_state"].write_bytes(os.urandom(4096))
    paths["gzip_state"] = folder / "garbage.state"
    paths["gzip_state"].write_bytes(gzip.compress(os.urandom(4096)))
    return paths


CARTPOLE = ["--config", "configs/cartpole.yaml"]
AIRSTRIKER = ["--config", "configs/quickstart.yaml"]

CASES = [
    # fit: options and values
    ("fit", [*CARTPOLE, "--model.no_such_option", "1"], "unrecognized arguments"),
    ("fit", [*CARTPOLE, "--model.learning_rate", "fast"], "model.learning_rate"),
    ("fit", ["--config", "{bad_yaml}"], "hidden_size"),
    ("fit", ["--config", "no/such.yaml"], "no/such.yaml"),
    ("fit", [*CARTPOLE, "--data.env.id", "NoSuchGame-v9"], "Unknown env id 'NoSuchGame-v9'"),
    ("fit", [*CARTPOLE, "--data.env.options", "{{bonus: 1}}"], "take no options"),
    ("fit", [*AIRSTRIKER, "--data.envs_per_actor", "2"], "set data.envs_per_actor to 1"),
    ("fit", [*AIRSTRIKER, "--data.env.retro_state", "NoSuchLevel"], "Unknown state 'NoSuchLevel'"),
    ("fit", [*CARTPOLE, "--data.env.retro_state_balance", "steps"], "use episodes (each state in turn) or frames"),
    ("fit", [*AIRSTRIKER, "--data.env.retro_state", "{not_gzip_state}"], "is not a state of this game"),
    ("fit", [*AIRSTRIKER, "--data.env.retro_state", "{gzip_state}"], "is not a state of this game"),
    ("fit", [*CARTPOLE, "--data.batch_size", "0"], "data.batch_size is 0"),
    ("fit", [*CARTPOLE, "--data.num_actors", "1", "--data.batch_size", "16", "--data.slots_per_env", "2"],
     "slots_per_env=2"),
    ("fit", [*CARTPOLE, "--checkpoint.dirpath", "{not_a_folder}/checkpoints"], "choose a writable folder"),
    ("fit", [*CARTPOLE, "--weights_only", "false"], "weights_only=True only"),
    ("fit", [*CARTPOLE, "--checkpoint.monitor", "val/episode_return"], "with evaluation.monitor val/episode_return"),
    ("fit", [*CARTPOLE, "--evaluation.monitor", "train/loss"], "evaluation.monitor is train/loss"),
    ("fit", [*CARTPOLE, "--evaluation.monitor", "val/LunarLander-v3/return_mean"],
     "monitor a track it plays, such as val/CartPole-v1/return_mean."),
    ("fit", [*CARTPOLE, "--evaluation.monitor", "val/episode_checkpoints"], "name one of its metrics (val/episode_return"),
    ("fit", [*CARTPOLE, "--data.replay.ratio", "-1"], "data.replay.ratio is -1.0"),
    ("fit", [*CARTPOLE, "--data.replay.ratio", "0.01"], "leaves no replayed unroll in a batch of 16"),
    ("fit", [*CARTPOLE, "--data.replay.ratio", "1", "--data.replay.capacity", "0"],
     "fewer than a batch of 16: raise data.replay.capacity"),
    ("fit", [*CARTPOLE, "--data.replay.ratio", "1", "--data.replay.self_imitation", "9"],
     "self_imitation is 9, and a batch holds 8 replayed unrolls"),
    ("fit", [*CARTPOLE, "--data.replay.self_imitation", "2"],
     "with replay off nothing is replayed for it: add --data.replay.self_imitation 0"),
    ("fit", [*CARTPOLE, "--model.augmentation", "random_shift"], "set model.augmentation none"),
    ("fit", [*AIRSTRIKER, "--model.augmentation", "mirror"], "names no mirrored actions: set model.augmentation none"),
    ("fit", [*CARTPOLE, "--ranks.silent_timeout_s", "0"], "ranks.silent_timeout_s is 0: set it to a number of seconds"),
    ("fit", [*CARTPOLE, "--evaluation.every_n_steps", "0"], "evaluation.every_n_steps is 0: set it to 1 or more"),
    ("fit", [*CARTPOLE, "--weights.every_n_steps", "0"], "weights.every_n_steps is 0: set it to 1 or more"),
    ("fit", [*CARTPOLE, "--recorder.every_minutes", "0"], "recorder.every_minutes is 0: set it above 0"),
    ("fit", [*CARTPOLE, "--stop.monitor", "train/episode_return"], "stop.threshold is not set: set --stop.threshold"),
    ("fit", [*CARTPOLE, "--stop.threshold", "400"], "stop.monitor is not set: set --stop.monitor"),
    ("fit", [*CARTPOLE, "--model.lr_decay_time", "true"],
     "set trainer.max_time (such as 00:02:15:00), or model.lr_decay_time false"),
    ("fit", [*CARTPOLE, "--ckpt_path", "best"], "the best on the held-out tracks is best.ckpt"),
    # fit and test: files that are not our checkpoints
    ("fit", [*CARTPOLE, "--ckpt_path", "no/such.ckpt"], "checkpoint no/such.ckpt does not exist"),
    ("fit", [*CARTPOLE, "--ckpt_path", "{crafted}"], "holds a posix.system, which kart_lightning never loads"),
    ("fit", [*CARTPOLE, "--ckpt_path", "{policy}"], "is an exported TorchScript policy, not a checkpoint"),
    ("test", [*CARTPOLE, "--ckpt_path", "{crafted}"], "holds a posix.system, which kart_lightning never loads"),
    ("test", [*CARTPOLE, "--ckpt_path", "{truncated}"], "is not a checkpoint, or was cut short"),
    ("test", [*CARTPOLE, "--ckpt_path", "{text}"], "is not a checkpoint, or was cut short"),
    ("test", [*CARTPOLE, "--ckpt_path", "{other}"], "is not a kart_lightning checkpoint"),
    ("test", [*CARTPOLE, "--ckpt_path", "{policy}"], "pass the .ckpt file beside it (last.ckpt)"),
    ("test", [*CARTPOLE, "--model.hidden_size", "32", "--ckpt_path", "{checkpoint}"],
     "was trained with a different model or env"),
    # record
    ("record", ["--ckpt_path", "missing.ckpt"], "checkpoint missing.ckpt does not exist"),
    ("record", ["--ckpt_path", "{crafted}"], "holds a posix.system"),
    ("record", ["--ckpt_path", "{policy}"], "is an exported TorchScript policy"),
    ("record", ["--ckpt_path", "{other}"], "is not a kart_lightning checkpoint"),
    ("record", ["--ckpt_path", "{checkpoint}", "--out", "{not_a_folder}/run.gif"], "choose a writable folder with --out"),
    ("record", ["--ckpt_path", "{checkpoint}", "--fps", "fast"], "fps"),
]


@pytest.fixture(scope="module")
def outcomes(files, kart_servers) -> list[subprocess.CompletedProcess | subprocess.TimeoutExpired]:
    """Every case's run, each its own process forked from one that imported the command line
    once (a fresh interpreter spends most of a case's few seconds importing torch and Lightning),
    two at a time: the cases share no file they write."""
    servers = Queue()
    for _ in range(2):
        servers.put(kart_servers())

    def run(case: tuple[str, list[str], str]) -> subprocess.CompletedProcess | subprocess.TimeoutExpired:
        command, args, _ = case
        server = servers.get()
        try:
            return server(command, *(arg.format(**files) for arg in args), timeout_s=180)
        except subprocess.TimeoutExpired as hung:  # fails its own case, not every case
            return hung
        finally:
            servers.put(server)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(run, CASES))


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_a_wrong_file_or_value_ends_in_one_sentence_and_exit_code_2(case, outcomes, files):
    _command, _args, says = CASES[case]
    result = outcomes[case]
    if isinstance(result, subprocess.TimeoutExpired):
        raise result
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("kart_lightning: error:") and says in last_line, last_line
    assert not files["marker"].exists(), "a file's contents ran as code"


def test_the_crafted_checkpoint_would_run_its_code_if_unpickled_as_a_whole(files):
    """The refusals above mean something: this file does run code when loaded without weights_only."""
    torch.load(files["crafted"], weights_only=False)
    assert files["marker"].exists()
    files["marker"].unlink()


# The Super Mario Kart ROM import and state maker, and fit on a wrong ROM or track


def run_module(module: str, *args: str, cache: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
        check=False, env={**os.environ, "KART_LIGHTNING_CACHE": str(cache)},
    )


def assert_one_sentence(result: subprocess.CompletedProcess, says: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert says in result.stderr.strip().splitlines()[-1]


IMPORT_ROM = "kart_lightning.envs.mario_kart.import_rom"
STATES = "kart_lightning.envs.mario_kart.states"


def test_importing_a_rom_of_another_game_names_the_folder(tmp_path):
    (tmp_path / "roms").mkdir()
    (tmp_path / "roms" / "other.sfc").write_bytes(os.urandom(512 * 1024))
    result = run_module(IMPORT_ROM, str(tmp_path / "roms"), cache=tmp_path / "cache")
    assert_one_sentence(result, f"No Super Mario Kart (USA) ROM found under {tmp_path / 'roms'}")


@pytest.mark.needs_rom
def test_importing_a_corrupted_copy_of_the_rom_finds_no_rom(rom_dir, tmp_path):
    rom = next(path for path in rom_dir.iterdir() if path.suffix in (".sfc", ".smc"))
    data = bytearray(rom.read_bytes())
    data[0x8000] ^= 0xFF
    (tmp_path / "roms").mkdir()
    (tmp_path / "roms" / "kart.sfc").write_bytes(bytes(data))
    result = run_module(IMPORT_ROM, str(tmp_path / "roms"), cache=tmp_path / "cache")
    assert_one_sentence(result, "No Super Mario Kart (USA) ROM found")


@pytest.mark.needs_rom
def test_training_on_a_corrupted_rom_in_the_cache_names_the_import_command(rom_cache, tmp_path, kart):
    cache = tmp_path / "cache"
    shutil.copytree(rom_cache, cache)
    (rom,) = cache.rglob("rom.sfc")
    data = bytearray(rom.read_bytes())
    data[0x8000] ^= 0xFF
    rom.write_bytes(bytes(data))
    result = kart("fit", "--config", "configs/impala.yaml", check=False, env={"KART_LIGHTNING_CACHE": str(cache)})
    assert_one_sentence(result, "is not the Super Mario Kart (USA) ROM: run `python -m kart_lightning.envs.mario_kart.import_rom")


@pytest.mark.needs_rom
@pytest.mark.parametrize("args, says", [
    (["--tracks", "MarioCircuit.Act9"], "Unknown Super Mario Kart state 'MarioCircuit.Act9'"),
    (["--tracks", "MarioCircuit.Act1", "--driver", "Wario"], "Unknown Super Mario Kart driver 'Wario'"),
])
def test_the_state_maker_refuses_an_unknown_track_or_driver(args, says, rom_cache):
    assert_one_sentence(run_module(STATES, *args, cache=rom_cache), says)


@pytest.mark.needs_rom
@pytest.mark.parametrize("state, says", [
    ("MarioCircuit.Act9", "Unknown Super Mario Kart state 'MarioCircuit.Act9'"),
    ("MarioCircuit.Act1.Wario", "Unknown Super Mario Kart state 'MarioCircuit.Act1.Wario'"),
    ("{gzip_state}", "is not a state of this game"),
])
def test_fit_refuses_an_unknown_track_driver_or_state_file(state, says, files, rom_cache, kart):
    result = kart("fit", "--config", "configs/impala.yaml", "--data.env.retro_state", state.format(**files),
                  check=False, env={"KART_LIGHTNING_CACHE": str(rom_cache)})
    assert_one_sentence(result, says)
