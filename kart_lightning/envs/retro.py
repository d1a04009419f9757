"""stable-retro games: any integrated game whose ROM is imported, one emulator per process.

Also the building blocks a game folder on stable-retro uses: the bare emulator at its state, and
the list of states a config names (played in turn, or balanced by frames: RotateStates).
"""

import os

import gymnasium
import stable_retro

from kart_lightning.envs.factory import EnvConfig, skip_frames_and_limit_steps, stack_frames
from kart_lightning.envs.registry import EnvConfigError, EnvFamily, register_env_family
from kart_lightning.envs.wrappers import RotateStates

INTEGRATIONS = stable_retro.data.Integrations.ALL
"""Stable, contrib, experimental and custom integrations (a game folder's own among them)."""


def is_retro_game(env_id: str) -> bool:
    return stable_retro.data.get_file_path(env_id, "rom.sha", INTEGRATIONS) is not None


def make_retro(config: EnvConfig, env_index: int) -> gymnasium.Env:
    """A stable-retro game with its discrete action set, frame skip and stacked frames."""
    require_rom_imported(config.id)
    env = open_emulator(config, env_index, stable_retro.Actions.DISCRETE)
    env = skip_frames_and_limit_steps(env, config)
    return stack_frames(env, config)


def require_rom_imported(env_id: str) -> None:
    try:
        stable_retro.data.get_romfile_path(env_id, INTEGRATIONS)
    except FileNotFoundError:
        raise EnvConfigError(
            f"The ROM for '{env_id}' is not imported: run `python -m stable_retro.import DIR` "
            "on the folder that holds it."
        ) from None


def open_emulator(config: EnvConfig, env_index: int, actions: stable_retro.Actions) -> gymnasium.Env:
    """The bare stable-retro env of `config`, at its state for env `env_index`; with several
    states, each episode starts from the next, or from the one least played (RotateStates)."""
    state = _retro_state(config, env_index)
    try:
        env = stable_retro.make(
            config.id, state=state, inttype=INTEGRATIONS, render_mode=config.render_mode,
            use_restricted_actions=actions,
        )
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise _not_a_state(state, error) from None
    count = len(retro_state_names(config))
    states = []
    for index in range(count):
        # load_state reads and decompresses a state file into initial_state, as make did.
        state = _retro_state(config, index)
        try:
            env.unwrapped.load_state(state, INTEGRATIONS)
        except (OSError, EOFError) as error:
            env.close()
            raise _not_a_state(state, error) from None
        # The emulator refuses a state of another core or game; stable-retro ignores that.
        if not env.unwrapped.em.set_state(env.unwrapped.initial_state):
            env.close()
            raise _not_a_state(state, "the emulator refuses it")
        states.append(env.unwrapped.initial_state)
    if count < 2:
        return env
    return RotateStates(env, states, first=env_index, balance=config.retro_state_balance)


def _not_a_state(state: object, why: object) -> EnvConfigError:
    return EnvConfigError(
        f"{state} is not a state of this game ({why}): pass a .state file that stable-retro saved "
        "for it, or a state name."
    )


def retro_state_names(config: EnvConfig) -> list[str]:
    """The states `config.retro_state` names, as a list (empty for the game's default state)."""
    if config.retro_state is None:
        return []
    names = [config.retro_state] if isinstance(config.retro_state, str) else list(config.retro_state)
    if not names:
        raise EnvConfigError("retro_state is an empty list: name at least one state, or leave it unset.")
    return names


def _retro_state(config: EnvConfig, env_index: int) -> object:
    """The `state` argument for stable_retro.make: a state name, an absolute path, or DEFAULT."""
    names = retro_state_names(config)
    if not names:
        return stable_retro.State.DEFAULT
    # Env i starts from state i; RotateStates picks each later episode's state (in turn, or by frames).
    state = names[env_index % len(names)]
    if os.path.isfile(state):
        # stable-retro looks names up inside the integration folder; an absolute path escapes it.
        return os.path.abspath(state)
    file_name = state.removesuffix(".state") + ".state"
    if stable_retro.data.get_file_path(config.id, file_name, INTEGRATIONS) is None:
        states = stable_retro.data.list_states(config.id, INTEGRATIONS)
        raise EnvConfigError(
            f"Unknown state '{state}' for '{config.id}': use one of {states}, a path "
            "to a .state file, or leave retro_state unset for the game's default."
        )
    return state


register_env_family(EnvFamily(
    name="stable-retro",
    matches=is_retro_game,
    make=make_retro,
    envs_per_process=1,
    known_ids=lambda: stable_retro.data.list_games(INTEGRATIONS),
))
