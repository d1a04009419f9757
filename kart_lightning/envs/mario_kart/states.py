"""Makes, checks and caches the start states of Super Mario Kart from the user's ROM: Time Trial
on all four cups' courses (the save is given the trophies that unlock the Special Cup before the
menus), and 50cc Mario GP on each cup's first course (NAME.GP50, with the seven CPU drivers).

Usage: `python -m kart_lightning.envs.mario_kart.states [--tracks NAME ...] [--driver NAME] [--force]
[--contact-sheet PNG]`. Mario drives unless the state name (MarioCircuit.Act4.Luigi) or --driver says otherwise.
"""

import argparse
import gzip
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import stable_retro
from PIL import Image, ImageDraw

from kart_lightning.envs.mario_kart.game import (
    GP_GRID_CHECKPOINTS_BEHIND_LINE,
    GP_START_COINS,
    GP_START_RANK,
    GRID_CHECKPOINTS_BEHIND_LINE,
    LAP_ON_GRID,
    SAVE_BLOCK,
    SAVE_TROPHIES,
    SPECIAL_CUP_TROPHIES,
)
from kart_lightning.envs.mario_kart.import_rom import require_rom
from kart_lightning.envs.mario_kart.menus import (
    MenuStep,
    course_select_steps,
    gp_cup_select_steps,
    power_on_to_course_select,
    power_on_to_gp50_cup_select,
)
from kart_lightning.envs.mario_kart.paths import GAME, user_game_dir
from kart_lightning.envs.mario_kart.tracks import DRIVERS_BY_NAME, START_STATES, StartState, get_start_state
from kart_lightning.errors import ConfigError

MAX_COUNTDOWN_FRAMES = 1200
"""A Time Trial loads and Lakitu counts down in ~330 frames, a GP (camera pan over the grid first)
in ~520; far more means the menu script failed."""

FRAMES_BEFORE_CLOCK = 2
"""The state is saved this many frames before the race clock starts: loading it costs one frame
(stable-retro's reset steps once), so the first observation still reads clock 0 and the agent's
first action is taken as the race starts."""


def state_path(name: str) -> Path:
    """Where the cached start state `name` lives (it may not exist yet)."""
    return user_game_dir() / f"{get_start_state(name).name}.state"


def driver_state_names(names: Sequence[str], driver: str) -> list[str]:
    """`names` with `driver` at the wheel (MarioCircuit.Act4 with Luigi: MarioCircuit.Act4.Luigi)."""
    return [get_start_state(name, driver).name for name in names]


def _make_emulator() -> stable_retro.RetroEnv:
    """A fresh power-on emulator with every button available; only one may exist per process."""
    require_rom()
    env = stable_retro.make(
        GAME,
        state=stable_retro.State.NONE,
        inttype=stable_retro.data.Integrations.ALL,
        use_restricted_actions=stable_retro.Actions.ALL,
        render_mode=None,
    )
    env.reset()
    return env


def trophy_save(trophies: bytes) -> bytes:
    """The six save bytes at SAVE_TROPHIES holding `trophies` (one byte per cup), checksum first."""
    checksum = sum(np.frombuffer(trophies, "<u2").tolist()) % 2**16
    return checksum.to_bytes(2, "little") + trophies


def _unlock_special_cup(env: stable_retro.RetroEnv) -> None:
    """Save the trophies that list the Special Cup, as if won; the game reads them in the menus."""
    for offset, value in enumerate(trophy_save(SPECIAL_CUP_TROPHIES)):
        env.data.memory.assign(SAVE_BLOCK + SAVE_TROPHIES + offset, "|u1", value)


def _play(env: stable_retro.RetroEnv, steps: Iterable[MenuStep]) -> None:
    """Press each step's buttons for its hold frames, then nothing for its wait frames."""
    released = np.zeros(env.num_buttons, np.uint8)
    for step in steps:
        pressed = released.copy()
        pressed[[env.buttons.index(button) for button in step.buttons]] = 1
        for _ in range(step.hold_frames):
            env.step(pressed)
        for _ in range(step.wait_frames):
            env.step(released)


def _ram_info(env: stable_retro.RetroEnv) -> dict[str, Any]:
    """The data.json variables as the emulator's RAM holds them now."""
    env.data.update_ram()
    return env.data.lookup_all()


def grid_problems(info: dict[str, Any], start: StartState) -> list[str]:
    """What in `info` (data.json variables) says the kart is not waiting on `start`'s grid."""
    behind_line = GP_GRID_CHECKPOINTS_BEHIND_LINE if start.grand_prix else GRID_CHECKPOINTS_BEHIND_LINE
    expected = {
        "track": start.track.course_id,
        "driver": start.driver.ram_id,
        "lap": LAP_ON_GRID,
        "clock_minutes": 0,
        "clock_seconds": 0,
        "clock_centiseconds": 0,
        # The grid is behind the line, whose checkpoint is 0.
        "checkpoint": info["checkpoint_count"] - behind_line,
        "speed": 0,
        "rank": GP_START_RANK if start.grand_prix else 0,
        "coins": GP_START_COINS if start.grand_prix else 0,
    }
    return [
        f"{key} is {info[key]}, expected {value}" for key, value in expected.items() if info[key] != value
    ]


def _menu_route(start: StartState) -> tuple[tuple[MenuStep, ...], tuple[MenuStep, ...]]:
    """`start`'s menu inputs: power-on to its mode's select screen, then that screen to the race."""
    if start.grand_prix:
        return power_on_to_gp50_cup_select(start.driver), gp_cup_select_steps(start.track.cup)
    return power_on_to_course_select(start.driver), course_select_steps(start.track.cup, start.track.course)


def _drive_to_grid(env: stable_retro.RetroEnv, select_screen: bytes, start: StartState) -> bytes:
    """The emulator state on `start`'s grid, FRAMES_BEFORE_CLOCK frames before the clock starts."""
    env.em.set_state(select_screen)
    _play(env, _menu_route(start)[1])
    released = np.zeros(env.num_buttons, np.uint8)
    recent: list[bytes] = []
    for _ in range(MAX_COUNTDOWN_FRAMES):
        recent = [*recent[-FRAMES_BEFORE_CLOCK:], env.em.get_state()]
        env.step(released)
        if _ram_info(env)["clock_centiseconds"] != 0 and len(recent) > FRAMES_BEFORE_CLOCK:
            # recent[-1] is the last frame with the clock at 0; step back from it.
            return recent[-1 - FRAMES_BEFORE_CLOCK + 1]
    raise RuntimeError(f"The menu script did not start a race for {start.name}; see menus.py.")


def _check_grid_state(env: stable_retro.RetroEnv, state: bytes, start: StartState) -> None:
    """Load `state` as stable-retro's reset would (one released frame) and check the grid RAM."""
    env.em.set_state(state)
    env.step(np.zeros(env.num_buttons, np.uint8))
    problems = grid_problems(_ram_info(env), start)
    if problems:
        raise RuntimeError(f"The state made for {start.name} is not on its grid: {'; '.join(problems)}.")


def _write_state(path: Path, state: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with gzip.open(partial, "wb") as file:  # stable-retro reads states gzipped
        file.write(state)
    # Atomic, so a concurrent trainer never loads half a state.
    partial.replace(path)


def make_states(names: Sequence[str], force: bool = False) -> dict[str, Path]:
    """Make (or reuse, unless `force`) the start states of `names`; returns name -> .state path.

    Boots one emulator, so call it before any other stable-retro env exists in this process.
    """
    starts = [get_start_state(name) for name in names]
    paths = {start.name: state_path(start.name) for start in starts}
    missing = [start for start in starts if force or not paths[start.name].is_file()]
    if not missing:
        return paths
    env = _make_emulator()
    try:
        _unlock_special_cup(env)
        power_on = env.em.get_state()
        # One select screen per mode, reached once; each of its states replays only its last inputs.
        select_screens: dict[tuple[MenuStep, ...], bytes] = {}
        for start in missing:
            to_select_screen = _menu_route(start)[0]
            if to_select_screen not in select_screens:
                env.em.set_state(power_on)
                _play(env, to_select_screen)
                select_screens[to_select_screen] = env.em.get_state()
            state = _drive_to_grid(env, select_screens[to_select_screen], start)
            _check_grid_state(env, state, start)
            _write_state(paths[start.name], state)
    finally:
        env.close()
    return paths


def contact_sheet(names: Sequence[str], columns: int = 4) -> Image.Image:
    """The first frame of each cached state `names`, tiled with its name, for a visual check."""
    env = _make_emulator()
    frames = []
    try:
        for name in names:
            with gzip.open(state_path(name), "rb") as file:
                env.em.set_state(file.read())
            env.step(np.zeros(env.num_buttons, np.uint8))
            frames.append(Image.fromarray(env.get_screen()))
    finally:
        env.close()
    width, height = frames[0].size
    rows = -(-len(frames) // columns)
    sheet = Image.new("RGB", (columns * width, rows * height))
    for index, (name, frame) in enumerate(zip(names, frames, strict=True)):
        draw = ImageDraw.Draw(frame)
        draw.rectangle((0, 0, 6 * len(name) + 8, 14), fill=(0, 0, 0))
        draw.text((4, 2), name, fill=(255, 255, 255))
        sheet.paste(frame, ((index % columns) * width, (index // columns) * height))
    return sheet


def main(argv: list[str] | None = None) -> int:
    """Make the requested start states; a user mistake ends in one sentence and exit code 2."""
    parser = argparse.ArgumentParser(
        prog="python -m kart_lightning.envs.mario_kart.states",
        description="Make the Super Mario Kart start states (Time Trial, and 50cc GP as NAME.GP50) from your imported ROM.",
    )
    parser.add_argument(
        "--tracks",
        nargs="+",
        default=[start.name for start in START_STATES],
        help="state names, e.g. MarioCircuit.Act1 MarioCircuit.Act1.GP50 (default: all)",
    )
    parser.add_argument(
        "--driver",
        help=f"make the states with this driver: {', '.join(DRIVERS_BY_NAME)} (default: Mario, or the name's)",
    )
    parser.add_argument("--force", action="store_true", help="remake states that already exist")
    parser.add_argument("--contact-sheet", type=Path, help="also save the first frames to this PNG")
    args = parser.parse_args(argv)
    try:
        names = driver_state_names(args.tracks, args.driver) if args.driver else args.tracks
        paths = make_states(names, force=args.force)
        for name, path in paths.items():
            print(f"{name}: {path}")
        if args.contact_sheet:
            contact_sheet(names).save(args.contact_sheet)
            print(f"Contact sheet: {args.contact_sheet}")
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
