"""The env registry: each game family registers how to build its envs, and `make_env` finds it by id.

Built-in families: gymnasium vector envs, ALE (Atari) and stable-retro games. Every sub-package of
`kart_lightning.envs` is a game family's folder and registers itself when imported; a program of
your own registers its families before it calls `kart_lightning.cli.main()`.
"""

import dataclasses
import difflib
import importlib
import pkgutil
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import gymnasium

from kart_lightning.errors import ConfigError

Aggregation = Literal["mean", "sum", "min", "max"]


class EnvConfigError(ConfigError):
    """A user's env config names something that cannot be built; the message names the fix."""


class UnknownEnvError(EnvConfigError):
    """No registered game family knows the env id."""


@dataclass(frozen=True)
class EnvFamily:
    """How to build and describe the envs of one family of games.

    Args:
        name: short name, used in messages (e.g. "atari").
        matches: whether an env id belongs to this family.
        make: `(config, env_index) -> env` with a Discrete action space, observations as the
            config asks, `info["episode"]` at episode end (gymnasium's RecordEpisodeStatistics)
            and, if the family reports any, `info["episode_extra_stats"]` on the last step of an
            episode; `info["restart"]` True on the steps of an episode that began mid-game from
            a saved state (it trains, but is left out of the episode statistics); `env_index` is
            the env's number among the run's envs. make_env seeds it.
        options: the dataclass of the family's own settings (`EnvConfig.options`, a dict in
            configs), or None when it has none.
        frames_per_step: env frames per agent step of `config` (the frame skip, 1 for vectors).
        envs_per_process: at most this many envs per process (an emulator that allows one per
            process), or None.
        extra_stats: per-episode numbers the envs report in `info["episode_extra_stats"]`, in the
            order tables show them, each with how `test` sums it up over a track's episodes.
            A value may be None (not applicable to that episode: it is left out of the sum-up).
        action_names: `config -> {action name: what it does}` for the exported policy's metadata.
        mirrored_actions: `config -> [num_actions] ints`, a permutation: action a's mirror image
            left to right (for `model.augmentation mirror`: the game plays the same on a mirrored
            screen with left and right swapped); None when the game has no such symmetry.
        episode_plot: `(env, infos, png_path)`: after a recorded episode, draw it (the infos of
            every step) as a PNG, before the env closes; None if the family has no such picture.
        known_ids: ids to suggest when a user's id is unknown.
    """

    name: str
    matches: Callable[[str], bool]
    make: Callable[[Any, int], gymnasium.Env]
    options: type | None = None
    frames_per_step: Callable[[Any], int] = lambda config: config.frame_skip
    envs_per_process: int | None = None
    extra_stats: Mapping[str, Aggregation] = field(default_factory=dict)
    action_names: Callable[[Any], dict[str, Any]] | None = None
    mirrored_actions: Callable[[Any], list[int]] | None = None
    episode_plot: Callable[[gymnasium.Env, list[dict[str, Any]], Path], None] | None = None
    known_ids: Callable[[], Iterable[str]] = lambda: ()


_FAMILIES: list[EnvFamily] = []
_GAME_FOLDERS_IMPORTED = False


def register_env_family(family: EnvFamily) -> None:
    """Add `family`; families registered later are asked first, so a game folder can claim ids
    that a generic family (such as stable-retro's) would also match. Registering a family of the
    same name again replaces it."""
    _FAMILIES[:] = [known for known in _FAMILIES if known.name != family.name]
    _FAMILIES.append(family)


def registered_families() -> list[EnvFamily]:
    """Every registered family, the most recently registered first (the order ids are matched in)."""
    _import_game_folders()
    return list(reversed(_FAMILIES))


def find_family(env_id: str) -> EnvFamily:
    """The family that builds `env_id`; UnknownEnvError, naming the closest known id, if none."""
    families = registered_families()
    for family in families:
        if family.matches(env_id):
            return family
    known = [known_id for family in families for known_id in family.known_ids()]
    close = difflib.get_close_matches(env_id, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise UnknownEnvError(
        f"Unknown env id '{env_id}'{hint}: use a gymnasium id such as CartPole-v1, an ALE id "
        "such as ALE/Pong-v5, or a stable-retro game such as Airstriker-Genesis-v0 (see "
        '`python -c "import stable_retro; print(stable_retro.data.list_games())"`).'
    )


def family_options(family: EnvFamily, options: Mapping[str, Any]) -> Any:
    """The family's options dataclass filled from a config's `options` dict (defaults for the
    rest); EnvConfigError naming the known keys for an unknown one."""
    if family.options is None:
        if options:
            raise EnvConfigError(
                f"data.env.options {dict(options)} is set, but {family.name} envs take no options: remove it."
            )
        return None
    if isinstance(options, family.options):
        return options
    names = [option.name for option in dataclasses.fields(family.options)]
    unknown = [key for key in options if key not in names]
    if unknown:
        raise EnvConfigError(
            f"data.env.options has no setting '{unknown[0]}' for {family.name} envs: use one of {', '.join(names)}."
        )
    return family.options(**options)


def _import_game_folders() -> None:
    """Import every sub-package of kart_lightning.envs: each is a game family that registers itself."""
    global _GAME_FOLDERS_IMPORTED
    if _GAME_FOLDERS_IMPORTED:
        return
    _GAME_FOLDERS_IMPORTED = True
    package = importlib.import_module("kart_lightning.envs")
    for module in pkgutil.iter_modules(package.__path__):
        if module.ispkg:
            importlib.import_module(f"{package.__name__}.{module.name}")
