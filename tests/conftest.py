"""Fixtures shared by the test modules: the `kart` command-line runner and the Super Mario Kart ROM.

The ROM tests (marked `needs_rom`) find the ROM in the folder named by $KART_LIGHTNING_TEST_ROM_DIR
(CI sets it to ../shared/roms) and are skipped, naming the variable, when it is unset or holds no ROM.
"""

import functools
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kart_lightning.envs.mario_kart import import_rom, register_integration, states

REPO = Path(__file__).resolve().parents[1]
ROM_DIR_VARIABLE = "KART_LIGHTNING_TEST_ROM_DIR"
ROM_STATE = "MarioCircuit.Act1"
"""The one start state the shared ROM cache holds from the start; the others are made on first use."""


def run_kart(
    *args: str, timeout_s: float = 300, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """`python -m kart_lightning ARGS` from the repository root, its output captured as text.

    `env` overrides variables of this process's environment (e.g. KART_LIGHTNING_CACHE); with `check`,
    a non-zero exit fails the test and shows the end of stderr.
    """
    result = subprocess.run(
        [sys.executable, "-m", "kart_lightning", *args], cwd=REPO, capture_output=True, text=True,
        timeout=timeout_s, check=False, env={**os.environ, **(env or {})},
    )  # fmt: skip
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="session")
def kart() -> Callable[..., subprocess.CompletedProcess]:
    """The command-line runner `run_kart`: `kart("fit", "--config", ..., env={...})`."""
    return run_kart


class KartServer:
    """`python -m kart_lightning ARGS` as a forked child of a process that has imported it once
    (tests/cli_server.py): the same command, exit code and output as `run_kart` gives, without
    each run's ~3 s of imports. For the many short runs that end at a refusal; the environment
    is this process's at the server's start."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.runs = 0
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "tests" / "cli_server.py")], cwd=REPO, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip

    def __call__(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        self.runs += 1
        out, err = self.folder / f"run-{self.runs}.out", self.folder / f"run-{self.runs}.err"
        request = {"args": list(args), "cwd": str(REPO), "stdout": str(out), "stderr": str(err),
                   "timeout_s": timeout_s}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer = self.process.stdout.readline()
        while answer and not answer.startswith("ANSWER "):  # something else printed on the server's stdout
            answer = self.process.stdout.readline()
        if not answer:
            raise RuntimeError(f"tests/cli_server.py ended (exit {self.process.wait()})")
        answer = json.loads(answer.removeprefix("ANSWER "))
        stdout, stderr = (path.read_text() if path.exists() else "" for path in (out, err))
        command = [sys.executable, "-m", "kart_lightning", *args]
        if answer["timed_out"]:
            raise subprocess.TimeoutExpired(command, timeout_s, stdout, stderr)
        if answer["left_running"]:
            # As its last line, so that a test of the command's last sentence shows it.
            stderr += "tests/cli_server.py: the command left processes running after it exited (killed)\n"
        return subprocess.CompletedProcess(command, answer["returncode"], stdout, stderr)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def kart_servers(tmp_path_factory) -> Iterator[Callable[[], KartServer]]:
    """Makes KartServers (`server = kart_servers()`; `server("fit", ...)`), closed after the module."""
    made = []

    def make() -> KartServer:
        made.append(KartServer(tmp_path_factory.mktemp("cli-server")))
        return made[-1]

    yield make
    for server in made:
        server.close()


# The Super Mario Kart ROM


@functools.cache
def _rom_skip_reason() -> str | None:
    """Why the ROM tests cannot run here, or None when $KART_LIGHTNING_TEST_ROM_DIR holds the ROM."""
    folder = os.environ.get(ROM_DIR_VARIABLE)
    if not folder:
        return f"no Super Mario Kart ROM: set {ROM_DIR_VARIABLE} to a folder holding the USA ROM"
    if import_rom.find_rom([folder]) is None:
        return f"no Super Mario Kart (USA) ROM in {ROM_DIR_VARIABLE}={folder}"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    # Before any fixture is set up, so a ROM test's costly fixtures are not built only to be skipped.
    if item.get_closest_marker("needs_rom") and _rom_skip_reason():
        pytest.skip(_rom_skip_reason())


@pytest.fixture(scope="session")
def rom_dir() -> Path:
    """The folder $KART_LIGHTNING_TEST_ROM_DIR, which holds the ROM (the test is skipped otherwise)."""
    if _rom_skip_reason():
        pytest.skip(_rom_skip_reason())
    return Path(os.environ[ROM_DIR_VARIABLE])


@pytest.fixture(scope="session")
def rom_cache(rom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder for this session, holding the imported ROM and the MarioCircuit.Act1 state.

    Pass it to a command as KART_LIGHTNING_CACHE, or use `in_rom_cache` to point the test's own process at it.
    """
    cache = tmp_path_factory.mktemp("kart_lightning_cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KART_LIGHTNING_CACHE", str(cache))
        assert import_rom.main([str(rom_dir)]) == 0
        states.make_states([ROM_STATE])
    register_integration()
    return cache


@pytest.fixture
def in_rom_cache(rom_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """This test's process uses the session's ROM cache (KART_LIGHTNING_CACHE, stable-retro's paths)."""
    yield from _use_cache(rom_cache, monkeypatch)


@pytest.fixture
def empty_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """This test's process uses a cache of its own with no ROM and no states."""
    yield from _use_cache(tmp_path / "kart_lightning_cache", monkeypatch)


def _use_cache(cache: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("KART_LIGHTNING_CACHE", str(cache))
    register_integration()
    yield cache
    monkeypatch.undo()
    register_integration()
