"""Super Mario Kart as a game family: how its envs are built (actions, RAM reward, episode ends,
view), what each race reports at its end, and the trajectory picture of a recorded race."""

import math
import os
from pathlib import Path
from typing import Any

import gymnasium
import stable_retro

from kart_lightning.envs.factory import EnvConfig, skip_frames_and_limit_steps, stack_frames
from kart_lightning.envs.mario_kart.actions import ACTION_SETS, discrete_actions, mirrored_actions
from kart_lightning.envs.mario_kart.config import MarioKartConfig
from kart_lightning.envs.mario_kart.game import DRIVER_VIEW_ROWS, RACE_FRAME_LIMIT, RACE_LAPS
from kart_lightning.envs.mario_kart.paths import GAME
from kart_lightning.envs.mario_kart.restarts import CheckpointRestarts
from kart_lightning.envs.mario_kart.reward import RaceRewardWrapper
from kart_lightning.envs.registry import EnvConfigError, EnvFamily, family_options, register_env_family
from kart_lightning.envs.retro import open_emulator, retro_state_names
from kart_lightning.envs.wrappers import CropRows

DEFAULT_STATE = "MarioCircuit.Act1"
"""The state stable-retro loads when none is named (metadata.json's default_state)."""

RACE_STATS = {
    "checkpoints": "mean",
    "laps": "mean",
    "finished": "sum",
    "race_time_s": "mean",
    "best_lap_s": "min",
}
"""What a race reports at its end (RaceRewardWrapper's `episode_extra_stats`), and how `test` sums
each up over a track's episodes: checkpoints passed (net), laps completed, whether the race was
finished (counted), its time if finished (mean of the finished ones) and its best lap (the best)."""


def kart_options(config: EnvConfig) -> MarioKartConfig:
    """The config's Super Mario Kart options, checked: one sentence naming the fix for a value
    that cannot be built, before any emulation."""
    kart = family_options(FAMILY, config.options)
    if kart.actions not in ACTION_SETS:
        raise EnvConfigError(
            f"Unknown Super Mario Kart action set '{kart.actions}': use one of {', '.join(ACTION_SETS)}."
        )
    if kart.view not in ("driver", "full"):
        raise EnvConfigError(f"Unknown Super Mario Kart view '{kart.view}': use 'driver' or 'full'.")
    if kart.progress not in ("net", "furthest"):
        raise EnvConfigError(
            f"Unknown options.progress '{kart.progress}': use net (checkpoints driven back cost "
            "their reward) or furthest (only checkpoints past the race's furthest pay)."
        )
    if not 1 <= kart.laps <= RACE_LAPS:
        raise EnvConfigError(f"options.laps is {kart.laps}: set it to 1 to {RACE_LAPS}, the race's laps.")
    if kart.stall_steps is not None and kart.stall_steps < 1:
        raise EnvConfigError(
            f"options.stall_steps is {kart.stall_steps}: set it to 1 or more, or null to never cut a race."
        )
    if not 0.0 <= kart.restart_share < 1.0:
        raise EnvConfigError(
            f"options.restart_share is {kart.restart_share}: set it from 0 (every race on the grid) to below 1."
        )
    if kart.restart_from not in ("anywhere", "race_ends"):
        raise EnvConfigError(
            f"Unknown options.restart_from '{kart.restart_from}': use anywhere (a checkpoint drawn "
            "uniformly) or race_ends (just before where recent races ended)."
        )
    return kart


def make_mario_kart(config: EnvConfig, env_index: int) -> gymnasium.Env:
    """Super Mario Kart with MarioKartConfig's actions, RAM reward, episode ends and view."""
    kart = kart_options(config)
    _prepare(config)
    env = open_emulator(config, env_index, stable_retro.Actions.ALL)
    if kart.restart_share > 0:
        env = CheckpointRestarts(env, kart.restart_share, kart.restart_from)
    env = discrete_actions(env, kart.actions)
    # Beneath the frame skip, so that the reward sees every frame's RAM (see RaceRewardWrapper).
    env = RaceRewardWrapper(env, kart, frames_per_step=config.frame_skip)
    env = skip_frames_and_limit_steps(env, config, math.ceil(RACE_FRAME_LIMIT / config.frame_skip))
    if kart.view == "driver":
        # After the max-pool: one crop per agent step rather than one per frame.
        env = CropRows(env, *DRIVER_VIEW_ROWS)
    return stack_frames(env, config)


def _prepare(config: EnvConfig) -> None:
    """The user's ROM must be imported (one sentence naming the command if not), and the track
    states are made from it on first use."""
    # Imported here: the state maker pulls in Pillow and the menu tables, needed only to build an env.
    from kart_lightning.envs.mario_kart.import_rom import require_rom
    from kart_lightning.envs.mario_kart.states import make_states

    require_rom()
    names = retro_state_names(config) or [DEFAULT_STATE]
    # All at once: the maker boots an emulator, which is only possible before this process's first env.
    make_states([name.removesuffix(".state") for name in names if not os.path.isfile(name)])


def _action_names(config: EnvConfig) -> dict[str, list[str]]:
    """Each action's SNES buttons, in action order."""
    return {name: list(buttons) for name, buttons in ACTION_SETS[kart_options(config).actions].items()}


def _plot_race(env: gymnasium.Env, infos: list[dict[str, Any]], png_path: Path) -> None:
    """The kart's path over the course's map (read from the running emulator), coloured by speed."""
    # Imported here: matplotlib is needed only when a race is recorded.
    from kart_lightning.envs.mario_kart.track_map import plot_trajectory, track_map

    path = [(info["race"]["x"], info["race"]["y"], info["race"]["speed"]) for info in infos if "race" in info]
    xs, ys, speeds = zip(*path, strict=True)
    plot_trajectory(track_map(env.unwrapped), xs, ys, speeds, path=png_path)


FAMILY = EnvFamily(
    name="Super Mario Kart",
    matches=lambda env_id: env_id == GAME,
    make=make_mario_kart,
    options=MarioKartConfig,
    envs_per_process=1,
    extra_stats=RACE_STATS,
    action_names=_action_names,
    mirrored_actions=lambda config: mirrored_actions(kart_options(config).actions),
    episode_plot=_plot_race,
    known_ids=lambda: [GAME],
)
register_env_family(FAMILY)
