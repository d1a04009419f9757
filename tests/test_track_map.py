"""Specification of the track map: the course read from the emulator's Mode 7 plane, RAM positions on
it, and the trajectory plot. Tests marked `needs_rom` play the real game (ROM: see conftest.py)."""

from collections.abc import Iterator
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import stable_retro
from PIL import Image

from kart_lightning.envs.factory import EnvConfig, make_env
from kart_lightning.envs.mario_kart.actions import DRIVE
from kart_lightning.envs.mario_kart.game import LAP_ON_GRID
from kart_lightning.envs.mario_kart.paths import GAME
from kart_lightning.envs.mario_kart.track_map import (
    PLANE_PIXELS,
    NotOnACourseError,
    map_pixels,
    plot_trajectory,
    track_map,
)

ROAD = 64
"""RAM `ground_type` on Mario Circuit's road (NOTES.md); its asphalt and markings are grey."""

ACCELERATE = list(DRIVE).index("accelerate")
ACCELERATE_LEFT = list(DRIVE).index("accelerate_left")

CHEQUER = {(0, 0, 0), (248, 248, 248)}
"""The start line's two colours on the Mario Circuits."""

ROAD_AHEAD_ROWS = slice(51, 67)
"""Screen rows of the driver's view on Mario Circuit 1's grid showing only the Mode 7 plane: below
the horizon, above the kart, beside Lakitu."""


@pytest.fixture
def kart_env(in_rom_cache: Path) -> Iterator[gymnasium.Env]:
    """Mario Circuit 1 from the env factory, on the grid, one emulator frame per step."""
    env = make_env(EnvConfig(id=GAME, retro_state="MarioCircuit.Act1", frame_skip=1))
    yield env
    env.close()


def _ram(env: gymnasium.Env) -> dict[str, int]:
    return env.unwrapped.data.lookup_all()


def _drive(env: gymnasium.Env, actions: list[int]) -> list[dict[str, int]]:
    """RAM after each of `actions`, one per frame."""
    readings = []
    for action in actions:
        env.step(action)
        readings.append(_ram(env))
    return readings


def _pixels_under(map_image: np.ndarray, readings: list[dict[str, int]]) -> np.ndarray:
    """`[N, 3] uint8`: the map's colour under the kart at each RAM reading."""
    columns, rows = map_pixels([ram["x"] for ram in readings], [ram["y"] for ram in readings])
    return map_image[rows.astype(int), columns.astype(int)]


def _is_grey(colours: np.ndarray) -> np.ndarray:
    return (colours[..., 0] == colours[..., 1]) & (colours[..., 1] == colours[..., 2])


# The map


@pytest.mark.needs_rom
def test_the_map_is_the_whole_course_in_many_colours(kart_env: gymnasium.Env) -> None:
    map_image = track_map(kart_env)
    assert map_image.shape == (PLANE_PIXELS, PLANE_PIXELS, 3) and map_image.dtype == np.uint8
    assert len(np.unique(map_image.reshape(-1, 3), axis=0)) >= 16


@pytest.mark.needs_rom
def test_the_map_has_the_colours_of_the_road_ahead_on_screen(kart_env: gymnasium.Env) -> None:
    # The palette read from CGRAM is the one the screen is drawn with.
    map_colours = {tuple(colour) for colour in track_map(kart_env).reshape(-1, 3)}
    screen = kart_env.unwrapped.em.get_screen()[ROAD_AHEAD_ROWS]
    assert {tuple(colour) for colour in screen.reshape(-1, 3)} <= map_colours


@pytest.mark.needs_rom
def test_the_map_is_refused_outside_a_race(in_rom_cache: Path) -> None:
    env = stable_retro.make(
        GAME, state=stable_retro.State.NONE, inttype=stable_retro.data.Integrations.ALL, render_mode=None
    )
    try:
        env.reset()
        with pytest.raises(NotOnACourseError, match="Mode 7"):
            track_map(env)
    finally:
        env.close()


# RAM positions on the map


def test_ram_positions_are_quarter_pixels_read_as_signed_words() -> None:
    columns, rows = map_pixels([3712, 4], [2288, 65534])
    np.testing.assert_allclose(columns, [928, 1])
    np.testing.assert_allclose(rows, [572, -0.5])
    np.testing.assert_allclose(map_pixels([3712], [2288], map_size=512), [[464], [286]])


@pytest.mark.needs_rom
def test_the_grid_position_is_on_the_road_of_the_map(kart_env: gymnasium.Env) -> None:
    grid = _pixels_under(track_map(kart_env), [_ram(kart_env)])
    assert _ram(kart_env)["ground_type"] == ROAD
    assert _is_grey(grid).all()


@pytest.mark.needs_rom
def test_the_lap_counter_steps_where_the_kart_meets_the_chequered_line(kart_env: gymnasium.Env) -> None:
    map_image = track_map(kart_env)
    readings = _drive(kart_env, [ACCELERATE] * 120)
    crossing = next(ram for ram in readings if ram["lap"] == LAP_ON_GRID + 1)
    column, row = (int(pixel) for pixel in map_pixels(crossing["x"], crossing["y"]))
    assert tuple(map_image[row, column]) in CHEQUER
    assert {tuple(colour) for colour in map_image[row - 2 : row + 3, column]} >= CHEQUER


@pytest.mark.needs_rom
def test_a_driven_path_is_grey_on_the_map_exactly_where_the_game_reads_road(kart_env: gymnasium.Env) -> None:
    map_image = track_map(kart_env)
    # Up the start straight, then a hard left off the road onto the sand beside it.
    readings = _drive(kart_env, [ACCELERATE] * 60 + [ACCELERATE_LEFT] * 90)
    on_road = np.array([ram["ground_type"] == ROAD for ram in readings])
    assert on_road.any() and not on_road.all()
    # The game samples the surface on its own frame: a frame either side of the road's edge may differ.
    agreement = np.mean(_is_grey(_pixels_under(map_image, readings)) == on_road)
    assert agreement >= 0.95


# The plot


def test_the_plot_is_an_rgb_image_of_the_requested_size_saved_as_png(tmp_path: Path) -> None:
    map_image = np.full((512, 512, 3), 96, np.uint8)
    xs, ys = np.linspace(400, 3600, 50), np.linspace(3600, 400, 50)
    path = tmp_path / "trajectory.png"
    image = plot_trajectory(map_image, xs, ys, np.linspace(0, 740, 50), path=path, size_px=(640, 480))
    assert image.shape == (480, 640, 3) and image.dtype == np.uint8
    with Image.open(path) as saved:
        assert saved.size == (640, 480)
        np.testing.assert_array_equal(np.asarray(saved.convert("RGB")), image)
