"""Where the Super Mario Kart integration lives: shipped data here, the user's ROM and states in a cache.

The ROM and everything made from it stay in a per-user folder outside the project, never in the package.
"""

import os
from pathlib import Path

import stable_retro

GAME = "SuperMarioKart-Snes-v0"
"""The stable-retro game id: SNES integrations are named `<Title>-Snes-v0`."""

CACHE_ENV_VAR = "KART_LIGHTNING_CACHE"
PACKAGE_INTEGRATION_DIR = Path(__file__).parent / "integration"
"""Holds `GAME/` with data.json, scenario.json, metadata.json and rom.sha (no ROM)."""


def cache_dir() -> Path:
    """The per-user cache root: $KART_LIGHTNING_CACHE, else ~/.cache/kart_lightning."""
    return Path(os.environ.get(CACHE_ENV_VAR) or Path.home() / ".cache" / "kart_lightning")


def user_integration_dir() -> Path:
    """A second stable-retro integration folder, per user, for the files made from the ROM."""
    return cache_dir() / "integration"


def user_game_dir() -> Path:
    """Where the imported rom.sfc and the track .state files live."""
    return user_integration_dir() / GAME


_registered: list[str] = []
"""The custom paths this module added, so that only those are ever removed."""


def register_integration() -> None:
    """Let stable-retro find our game: the shipped folder, then the user's cache folder.

    Idempotent. Every entry point calls it again, so a cache moved by $KART_LIGHTNING_CACHE after
    import replaces the old one (stable-retro searches its custom paths in order), and the cache
    folder joins once the ROM import has made it.
    """
    integrations = stable_retro.data.Integrations
    # CUSTOM_PATHS only exists once a first path has been added.
    custom_paths: list[str] = getattr(integrations, "CUSTOM_PATHS", [])
    wanted = [str(PACKAGE_INTEGRATION_DIR)]
    # stable-retro's list_games lists every custom folder and fails on one that does not exist.
    if user_integration_dir().is_dir():
        wanted.append(str(user_integration_dir()))
    for stale in [path for path in _registered if path not in wanted]:
        custom_paths.remove(stale)
        _registered.remove(stale)
    for folder in wanted:
        if folder not in custom_paths:
            integrations.add_custom_path(folder)
            _registered.append(folder)
