"""The Super Mario Kart courses and the start states we make on them: Time Trial and 50cc GP.

Source: the course and cup selects of the USA ROM and the course id it writes to RAM 7E0124 (see NOTES.md).
"""

from dataclasses import dataclass

from kart_lightning.errors import ConfigError

CUPS = ("Mushroom Cup", "Flower Cup", "Star Cup", "Special Cup")
"""The cups of the course select; the Special Cup is listed once the save holds the 100cc golds of
the other three (the state maker writes them: see game.SPECIAL_CUP_TROPHIES)."""


@dataclass(frozen=True)
class Track:
    """One course: its state name, where the course select lists it, and its RAM course id."""

    name: str
    cup: int
    course: int
    course_id: int


TRACKS: tuple[Track, ...] = (
    Track("MarioCircuit.Act1", cup=0, course=0, course_id=7),
    Track("DonutPlains.Act1", cup=0, course=1, course_id=19),
    Track("GhostValley.Act1", cup=0, course=2, course_id=16),
    Track("BowserCastle.Act1", cup=0, course=3, course_id=17),
    Track("MarioCircuit.Act2", cup=0, course=4, course_id=15),
    Track("ChocoIsland.Act1", cup=1, course=0, course_id=18),
    Track("GhostValley.Act2", cup=1, course=1, course_id=1),
    Track("DonutPlains.Act2", cup=1, course=2, course_id=2),
    Track("BowserCastle.Act2", cup=1, course=3, course_id=3),
    Track("MarioCircuit.Act3", cup=1, course=4, course_id=0),
    Track("KoopaBeach.Act1", cup=2, course=0, course_id=13),
    Track("ChocoIsland.Act2", cup=2, course=1, course_id=10),
    Track("VanillaLake.Act1", cup=2, course=2, course_id=12),
    Track("BowserCastle.Act3", cup=2, course=3, course_id=9),
    Track("MarioCircuit.Act4", cup=2, course=4, course_id=14),
    Track("DonutPlains.Act3", cup=3, course=0, course_id=11),
    Track("KoopaBeach.Act2", cup=3, course=1, course_id=6),
    Track("GhostValley.Act3", cup=3, course=2, course_id=8),
    Track("VanillaLake.Act2", cup=3, course=3, course_id=4),
    Track("RainbowRoad", cup=3, course=4, course_id=5),
)
TRACKS_BY_NAME = {track.name: track for track in TRACKS}



GP50_SUFFIX = ".GP50"
"""Appended to a track's name for its 50cc Mario GP start (e.g. MarioCircuit.Act1.GP50)."""

GP50_CUPS = 3
"""The 50cc cup select lists the first three cups only: no Special Cup, whatever the save holds
(checked with 50cc golds, and 50cc and 100cc golds, saved in the other three cups)."""


@dataclass(frozen=True)
class Driver:
    """One of the eight drivers: where the driver select shows it, and its RAM id (7E1012)."""

    name: str
    row: int
    column: int
    ram_id: int


DRIVERS: tuple[Driver, ...] = (
    Driver("Mario", row=0, column=0, ram_id=0),
    Driver("Princess", row=0, column=1, ram_id=6),
    Driver("Bowser", row=0, column=2, ram_id=4),
    Driver("Koopa", row=0, column=3, ram_id=10),
    Driver("Luigi", row=1, column=0, ram_id=2),
    Driver("Yoshi", row=1, column=1, ram_id=14),
    Driver("DonkeyKongJr", row=1, column=2, ram_id=8),
    Driver("Toad", row=1, column=3, ram_id=12),
)
"""The driver select's two rows of four, as the USA ROM shows them (see NOTES.md)."""
DRIVERS_BY_NAME = {driver.name: driver for driver in DRIVERS}
DEFAULT_DRIVER = DRIVERS[0]
"""Mario: a state name without a driver suffix is his (MarioCircuit.Act1); others append theirs
(MarioCircuit.Act1.Luigi, MarioCircuit.Act1.GP50.Toad)."""


@dataclass(frozen=True)
class StartState:
    """A state the maker makes: `track`'s grid in a Time Trial, or in a 1P 50cc Mario GP, with `driver`."""

    track: Track
    grand_prix: bool = False
    driver: Driver = DEFAULT_DRIVER

    @property
    def name(self) -> str:
        suffix = "" if self.driver == DEFAULT_DRIVER else f".{self.driver.name}"
        return self.track.name + (GP50_SUFFIX if self.grand_prix else "") + suffix


GP50_STARTS: tuple[StartState, ...] = tuple(
    StartState(track, grand_prix=True) for track in TRACKS if track.cup < GP50_CUPS and track.course == 0
)
"""The cup openers: a GP races its cup's courses in course-select order, and the menus only start a
cup, so a later race is reached by finishing the one before it, never by menus alone."""

START_STATES: tuple[StartState, ...] = (*(StartState(track) for track in TRACKS), *GP50_STARTS)
"""Mario's 23 start states; each also exists for the other seven drivers (see DRIVERS)."""
START_STATES_BY_NAME = {start.name: start for start in START_STATES}


def get_start_state(name: str, driver: str | None = None) -> StartState:
    """The start state called `name` (e.g. MarioCircuit.Act1, MarioCircuit.Act1.GP50,
    MarioCircuit.Act4.Luigi), or with `driver` instead of the name's; ConfigError if unknown."""
    base, _, suffix = name.removesuffix(".state").rpartition(".")
    if suffix in DRIVERS_BY_NAME and suffix != DEFAULT_DRIVER.name:
        start, driver = START_STATES_BY_NAME.get(base), driver or suffix
    else:
        start = START_STATES_BY_NAME.get(name.removesuffix(".state"))
    if start is None:
        raise ConfigError(
            f"Unknown Super Mario Kart state '{name}': use one of {', '.join(START_STATES_BY_NAME)}, "
            f"with a driver appended if not Mario (e.g. MarioCircuit.Act4.Luigi)."
        )
    if driver is None:
        return start
    if driver not in DRIVERS_BY_NAME:
        raise ConfigError(
            f"Unknown Super Mario Kart driver '{driver}': use one of {', '.join(DRIVERS_BY_NAME)}."
        )
    return StartState(start.track, start.grand_prix, DRIVERS_BY_NAME[driver])


def get_track(name: str) -> Track:
    """The track called `name` (a state name such as MarioCircuit.Act1); ConfigError if unknown."""
    try:
        return TRACKS_BY_NAME[name.removesuffix(".state")]
    except KeyError:
        raise ConfigError(
            f"Unknown Super Mario Kart track '{name}': use one of {', '.join(TRACKS_BY_NAME)}."
        ) from None
