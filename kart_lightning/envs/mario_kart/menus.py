"""Scripted controller inputs that drive Super Mario Kart's menus from power-on to a Time Trial or a 50cc GP.

Source: found by playing the USA ROM in stable-retro 1.0.1 from power-on (see NOTES.md); the
emulation is deterministic, so fixed frame counts replay exactly.
"""

from dataclasses import dataclass

from kart_lightning.envs.mario_kart.tracks import DEFAULT_DRIVER, Driver


@dataclass(frozen=True)
class MenuStep:
    """Hold `buttons` for `hold_frames`, then release all buttons for `wait_frames`."""

    buttons: tuple[str, ...]
    hold_frames: int
    wait_frames: int
    why: str


def _tap(button: str, wait_frames: int, why: str) -> MenuStep:
    # Two frames held: one is enough for the game's edge detection; two survives a lag frame.
    return MenuStep((button,), 2, wait_frames, why)


_POWER_ON_TO_1P_MODE_SELECT: tuple[MenuStep, ...] = (
    MenuStep((), 0, 400, "Nintendo logo and intro; the title screen accepts START after it"),
    _tap("START", 60, "title screen -> '1P GAME / 2P GAME'"),
    _tap("B", 60, "1P GAME -> 'MARIOKART GP / TIME TRIAL' with the cursor on MARIOKART GP"),
)

def _choose_driver(driver: Driver) -> tuple[MenuStep, ...]:
    """On the driver select (cursor on Mario, top left of two rows of four) to the course or cup select."""
    return (
        *(_tap("DOWN", 30, "cursor to the bottom row") for _ in range(driver.row)),
        *(_tap("RIGHT", 30, "cursor one driver right") for _ in range(driver.column)),
        _tap("B", 60, f"{driver.name} -> '1P OK?'"),
    )


def power_on_to_course_select(driver: Driver = DEFAULT_DRIVER) -> tuple[MenuStep, ...]:
    """Power-on to the Time Trial course select with `driver`, cursor on the Mushroom Cup's first course."""
    return (
        *_POWER_ON_TO_1P_MODE_SELECT,
        _tap("DOWN", 20, "cursor to TIME TRIAL"),
        _tap("B", 60, "TIME TRIAL -> 'IS THIS OK?' with the cursor on YES"),
        _tap("B", 150, "YES -> driver select, cursor on Mario; the screen fades in"),
        *_choose_driver(driver),
        _tap("B", 250, "OK -> course select; it ignores input until fully faded in"),
    )


def course_select_steps(cup: int, course: int) -> tuple[MenuStep, ...]:
    """From the course select to the race loading: cup 0-3 (Mushroom, Flower, Star, Special), course 0-4.

    The cursor starts in the course column; LEFT moves it to the cup column, where DOWN picks the
    cup and B returns to that cup's course column.
    """
    return (
        _tap("LEFT", 40, "course column -> cup column (Mushroom Cup)"),
        *(_tap("DOWN", 40, "next cup") for _ in range(cup)),
        _tap("B", 40, "cup chosen -> its course column, cursor on the first course"),
        *(_tap("DOWN", 40, "next course") for _ in range(course)),
        _tap("B", 60, "course chosen -> 'IS THIS OK?' with the cursor on YES"),
        _tap("B", 60, "YES -> the course's best times, 'IS THIS OK?' with the cursor on YES"),
        _tap("B", 0, "YES -> the race loads; Lakitu's countdown follows"),
    )


def power_on_to_gp50_cup_select(driver: Driver = DEFAULT_DRIVER) -> tuple[MenuStep, ...]:
    """Power-on to the 1P Mario GP cup select of the 50cc class with `driver` (three cups: no
    Special Cup at 50cc)."""
    return (
        *_POWER_ON_TO_1P_MODE_SELECT,
        _tap("B", 60, "MARIOKART GP -> '50cc CLASS / 100cc CLASS' with the cursor on 50cc"),
        _tap("B", 60, "50cc -> 'IS THIS OK?' with the cursor on YES"),
        _tap("B", 150, "YES -> driver select, cursor on Mario; the screen fades in"),
        *_choose_driver(driver),
        _tap("B", 250, "OK -> the 50cc cup select, cursor on the Mushroom Cup; it ignores input while fading in"),
    )


def gp_cup_select_steps(cup: int) -> tuple[MenuStep, ...]:
    """From the GP cup select to the cup's first race loading: cup 0-2 (Mushroom, Flower, Star).

    There is no confirmation: B on a cup loads its first course, with the seven CPU drivers.
    """
    return (
        *(_tap("DOWN", 40, "next cup") for _ in range(cup)),
        _tap("B", 0, "cup chosen -> its first race loads; a camera pan over the grid, then the countdown"),
    )
