"""Find the user's Super Mario Kart ROM by SHA-1 and install it where stable-retro finds it.

Usage: `python -m kart_lightning.envs.mario_kart.import_rom DIR_OR_FILE [...]`.
"""

import argparse
import hashlib
import io
import os
import sys
import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from kart_lightning.envs.mario_kart.paths import (
    GAME,
    PACKAGE_INTEGRATION_DIR,
    register_integration,
    user_game_dir,
)
from kart_lightning.errors import ConfigError

IMPORT_COMMAND = "python -m kart_lightning.envs.mario_kart.import_rom DIR"
ROM_FILE_NAME = "rom.sfc"
"""stable-retro picks the SNES core by this extension (cores/snes9x.json lists only `sfc`)."""

COPIER_HEADER_BYTES = 512
"""Copier (SMC/SWC) header: SNES ROMs are whole KiB, so a 512-byte remainder is a header."""

MAX_ROM_BYTES = 8 * 1024 * 1024 + COPIER_HEADER_BYTES
"""Larger files are skipped unread: the biggest SNES ROMs are 6 MiB."""

ROM_SUFFIXES = (".sfc", ".smc", ".swc", ".fig", ".bin", ".zip")


def known_sha1s() -> frozenset[str]:
    """SHA-1s of the headerless ROMs our integration accepts, from the shipped rom.sha."""
    text = (PACKAGE_INTEGRATION_DIR / GAME / "rom.sha").read_text()
    return frozenset(line.strip() for line in text.splitlines() if line.strip())


def strip_copier_header(data: bytes) -> bytes:
    """The ROM without its 512-byte copier header, if it has one."""
    if len(data) % 1024 == COPIER_HEADER_BYTES:
        return data[COPIER_HEADER_BYTES:]
    return data


def _candidate_blobs(path: Path) -> Iterator[bytes]:
    """Contents of each plausible ROM file at `path` (a file, a folder, or zips within)."""
    files: Iterable[Path] = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        if file.suffix.lower() not in ROM_SUFFIXES or file.stat().st_size > MAX_ROM_BYTES:
            continue
        data = file.read_bytes()
        if file.suffix.lower() != ".zip":
            yield data
            continue
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for entry in archive.infolist():
                    if entry.file_size <= MAX_ROM_BYTES:
                        yield archive.read(entry)
        except zipfile.BadZipFile:
            continue


def find_rom(paths: Iterable[str | os.PathLike[str]]) -> bytes | None:
    """The headerless Super Mario Kart ROM found under `paths`, or None."""
    wanted = known_sha1s()
    for path in paths:
        for blob in _candidate_blobs(Path(path)):
            rom = strip_copier_header(blob)
            if hashlib.sha1(rom).hexdigest() in wanted:
                return rom
    return None


def install_rom(rom: bytes) -> Path:
    """Write the headerless `rom` to the user's integration folder; returns its path."""
    target = user_game_dir() / ROM_FILE_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(".partial")
    partial.write_bytes(rom)
    # Atomic, so a concurrent reader never sees half a ROM.
    partial.replace(target)
    register_integration()
    return target


def require_rom() -> Path:
    """The installed ROM's path; ConfigError naming the import command if it is missing or wrong."""
    register_integration()
    rom_path = user_game_dir() / ROM_FILE_NAME
    if not rom_path.is_file():
        raise ConfigError(
            f"The Super Mario Kart ROM is not imported: run `{IMPORT_COMMAND}` on the folder "
            "that holds your copy of the USA ROM."
        )
    if hashlib.sha1(rom_path.read_bytes()).hexdigest() not in known_sha1s():
        raise ConfigError(
            f"The ROM at {rom_path} is not the Super Mario Kart (USA) ROM: run `{IMPORT_COMMAND}` "
            "on the folder that holds your copy of the USA ROM."
        )
    return rom_path


def main(argv: list[str] | None = None) -> int:
    """Import the ROM from the given files or folders; exit code 2 with one sentence if none matches."""
    parser = argparse.ArgumentParser(
        prog="python -m kart_lightning.envs.mario_kart.import_rom",
        description="Find the Super Mario Kart (USA) ROM by SHA-1 and install it for kart_lightning.",
    )
    parser.add_argument("paths", nargs="+", help="ROM files or folders to search (zips included)")
    args = parser.parse_args(argv)
    rom = find_rom(args.paths)
    if rom is None:
        print(
            f"No Super Mario Kart (USA) ROM found under {', '.join(args.paths)}: pass the folder "
            "or .sfc/.smc file that holds your copy (with or without a copier header).",
            file=sys.stderr,
        )
        return 2
    print(f"Imported Super Mario Kart (USA) to {install_rom(rom)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
