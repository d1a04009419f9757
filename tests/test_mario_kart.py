"""Specification of the Super Mario Kart integration: ROM, track states, actions, view, reward.

Tests marked `needs_rom` play the real game, from the ROM in $KART_LIGHTNING_TEST_ROM_DIR (conftest.py).
"""

import gzip
import hashlib
import io
import json
import zipfile
from pathlib import Path

import gymnasium
import numpy as np
import pytest
import stable_retro
import yaml
from gymnasium.spaces import Box, Discrete, MultiBinary

from kart_lightning.envs import EnvConfig, EnvConfigError, find_family, make_env, mario_kart
from kart_lightning.envs.mario_kart import import_rom, states
from kart_lightning.envs.mario_kart.actions import (
    ACTION_SETS,
    SNES_BUTTONS,
    button_table,
    discrete_actions,
    mirrored_actions,
)
from kart_lightning.envs.mario_kart.config import MarioKartConfig
from kart_lightning.envs.mario_kart.game import AIRBORNE, DRIVER_VIEW_ROWS
from kart_lightning.envs.mario_kart.menus import (
    course_select_steps,
    gp_cup_select_steps,
    power_on_to_course_select,
)
from kart_lightning.envs.mario_kart.paths import GAME, PACKAGE_INTEGRATION_DIR, user_game_dir
from kart_lightning.envs.mario_kart.restarts import restart_checkpoint
from kart_lightning.envs.mario_kart.tracks import GP50_STARTS, TRACKS, get_start_state, get_track
from kart_lightning.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PUBLISHED_ROM_SHA1 = "fe8ca691fc951eff2dd7830fcd1e2b11ac9d6419"
"""The SHA-1 published for the USA ROM (with its copier header): it covers the whole 524,800-byte file."""

PUBLISHED_RAM_MAP = {
    "x", "y", "speed", "speed_x", "speed_y", "camera_angle", "kart_angle", "checkpoint",
    "checkpoint_count", "lap", "clock_centiseconds", "clock_seconds", "clock_minutes",
    "ground_status", "ground_type", "out_of_control", "collision", "rank", "coins", "lakitu",
}  # fmt: skip
"""The variables of the commonly published RAM map (Data Crystal), checked in NOTES.md."""


# Integration folder


def test_importing_the_package_registers_the_game_with_stable_retro() -> None:
    assert GAME in stable_retro.data.list_games(stable_retro.data.Integrations.ALL)


def test_the_env_registry_finds_the_game_family_by_its_id() -> None:
    assert find_family(GAME) is mario_kart.FAMILY
    assert find_family(GAME).envs_per_process == 1


def test_data_json_declares_every_variable_of_the_published_ram_map_and_the_track_and_driver() -> None:
    info = json.loads((PACKAGE_INTEGRATION_DIR / GAME / "data.json").read_text())["info"]
    assert set(info) == PUBLISHED_RAM_MAP | {"track", "driver"}


def test_the_package_integration_folder_ships_no_rom_and_no_state() -> None:
    shipped = {path.name for path in (PACKAGE_INTEGRATION_DIR / GAME).iterdir()}
    assert shipped == {"data.json", "scenario.json", "metadata.json", "rom.sha"}


# ROM import


def test_strip_copier_header_removes_a_512_byte_header() -> None:
    assert import_rom.strip_copier_header(b"h" * 512 + b"r" * 2048) == b"r" * 2048


def test_strip_copier_header_keeps_a_headerless_rom_whole() -> None:
    assert import_rom.strip_copier_header(b"r" * 2048) == b"r" * 2048


def test_find_rom_finds_a_headered_rom_inside_a_zip(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rom = bytes(range(256)) * 8
    monkeypatch.setattr(import_rom, "known_sha1s", lambda: frozenset({hashlib.sha1(rom).hexdigest()}))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("game.smc", b"\0" * 512 + rom)
    (tmp_path / "roms.zip").write_bytes(buffer.getvalue())
    assert import_rom.find_rom([tmp_path]) == rom


def test_find_rom_returns_none_when_no_file_matches(tmp_path: Path) -> None:
    (tmp_path / "other.sfc").write_bytes(b"x" * 4096)
    assert import_rom.find_rom([tmp_path]) is None


def test_import_rom_exits_with_code_2_when_no_file_matches(tmp_path: Path, empty_cache: Path) -> None:
    assert import_rom.main([str(tmp_path)]) == 2


def test_require_rom_names_the_import_command_when_the_rom_is_missing(empty_cache: Path) -> None:
    with pytest.raises(ConfigError, match="python -m kart_lightning.envs.mario_kart.import_rom"):
        import_rom.require_rom()


def test_require_rom_rejects_a_file_that_is_not_the_usa_rom(empty_cache: Path) -> None:
    user_game_dir().mkdir(parents=True)
    (user_game_dir() / "rom.sfc").write_bytes(b"x" * 4096)
    with pytest.raises(ConfigError, match="is not the Super Mario Kart"):
        import_rom.require_rom()


@pytest.mark.needs_rom
def test_the_published_sha1_is_of_the_headered_file_and_rom_sha_of_the_headerless_one(rom_dir: Path) -> None:
    published = [
        data for path in sorted(rom_dir.iterdir()) if path.is_file()
        if hashlib.sha1(data := path.read_bytes()).hexdigest() == PUBLISHED_ROM_SHA1
    ]  # fmt: skip
    if not published:
        pytest.skip(f"the ROM in {rom_dir} is not the copy whose SHA-1 is published")
    assert len(published[0]) == 512 * 1024 + import_rom.COPIER_HEADER_BYTES
    assert hashlib.sha1(import_rom.strip_copier_header(published[0])).hexdigest() in import_rom.known_sha1s()


@pytest.mark.needs_rom
def test_an_imported_rom_is_installed_headerless_in_the_user_cache(in_rom_cache: Path) -> None:
    installed = import_rom.require_rom()
    assert installed.is_relative_to(in_rom_cache)
    assert installed.stat().st_size == 512 * 1024


@pytest.mark.needs_rom
def test_stable_retro_finds_the_imported_rom(in_rom_cache: Path) -> None:
    rom = stable_retro.data.get_romfile_path(GAME, stable_retro.data.Integrations.ALL)
    assert Path(rom).is_relative_to(in_rom_cache)


# Tracks and menus


def test_the_tracks_are_the_twenty_courses_of_the_four_cups() -> None:
    places = sorted((track.cup, track.course) for track in TRACKS)
    assert places == [(cup, course) for cup in range(4) for course in range(5)]


def test_every_track_has_its_own_course_id_and_course_select_place() -> None:
    assert len({track.course_id for track in TRACKS}) == len(TRACKS)
    assert len({(track.cup, track.course) for track in TRACKS}) == len(TRACKS)


@pytest.mark.parametrize("config_file", ["impala.yaml", "impala_all_tracks.yaml"])
def test_the_mario_kart_configs_name_known_tracks_and_hold_out_mario_circuit_4(config_file: str) -> None:
    config = yaml.safe_load((REPO / "configs" / config_file).read_text())
    trained, evaluated = config["data"]["env"]["retro_state"], config["data"]["eval_env"]["retro_state"]
    evaluated = [evaluated] if isinstance(evaluated, str) else evaluated
    for name in [*trained, *evaluated]:
        assert get_track(name).name == name
    held_out = "MarioCircuit.Act4"
    assert held_out in evaluated and not set(evaluated) & set(trained)
    # impala.yaml chooses best.ckpt on its validation course alone, never on the held-out track
    # (impala_all_tracks.yaml trains on every other course: none is left to validate on).
    monitored = config["evaluation"]["monitor"].split("/")
    if config_file == "impala.yaml":
        assert len(monitored) == 3 and monitored[1] in evaluated and monitored[1] != held_out
    if config_file == "impala_all_tracks.yaml":  # every other course
        assert sorted(trained) == sorted(track.name for track in TRACKS if track.name != held_out)


def test_an_unknown_track_is_a_config_error_listing_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="MarioCircuit.Act1"):
        get_track("MarioCircuit.Act9")


def test_course_select_presses_down_once_per_cup_and_once_per_course() -> None:
    buttons = [step.buttons for step in course_select_steps(cup=2, course=4)]
    assert buttons == [("LEFT",), *[("DOWN",)] * 2, ("B",), *[("DOWN",)] * 4, ("B",), ("B",), ("B",)]


def test_grid_problems_name_each_variable_that_is_off_the_grid() -> None:
    on_grid = {
        "track": 7, "driver": 0, "lap": 127, "clock_minutes": 0, "clock_seconds": 0, "clock_centiseconds": 0,
        "checkpoint": 29, "checkpoint_count": 30, "speed": 0, "rank": 0, "coins": 0,
    }  # fmt: skip
    assert states.grid_problems(on_grid, get_start_state("MarioCircuit.Act1")) == []
    moved = {**on_grid, "lap": 128, "checkpoint": 0}
    assert states.grid_problems(moved, get_start_state("MarioCircuit.Act1")) == [
        "lap is 128, expected 127",
        "checkpoint is 0, expected 29",
    ]


def test_a_gp50_grid_is_three_checkpoints_behind_the_line_in_8th_place_with_5_coins() -> None:
    gp_grid = {
        "track": 7, "driver": 0, "lap": 127, "clock_minutes": 0, "clock_seconds": 0, "clock_centiseconds": 0,
        "checkpoint": 27, "checkpoint_count": 30, "speed": 0, "rank": 14, "coins": 5,
    }  # fmt: skip
    assert states.grid_problems(gp_grid, get_start_state("MarioCircuit.Act1.GP50")) == []
    assert states.grid_problems(gp_grid, get_start_state("MarioCircuit.Act1")) == [
        "checkpoint is 27, expected 29",
        "rank is 14, expected 0",
        "coins is 5, expected 0",
    ]


def test_the_gp50_starts_are_the_first_course_of_each_of_the_three_50cc_cups() -> None:
    assert [start.name for start in GP50_STARTS] == [
        "MarioCircuit.Act1.GP50",
        "ChocoIsland.Act1.GP50",
        "KoopaBeach.Act1.GP50",
    ]


def test_a_gp50_start_off_a_cup_opener_is_a_config_error() -> None:
    # Later races are reached only by finishing the ones before; 50cc has no Special Cup.
    for name in ("DonutPlains.Act1.GP50", "DonutPlains.Act3.GP50"):
        with pytest.raises(ConfigError, match="MarioCircuit.Act1.GP50"):
            get_start_state(name)


def test_a_driver_is_named_after_the_track_and_mario_is_the_default() -> None:
    assert get_start_state("MarioCircuit.Act4").driver.name == "Mario"
    luigi = get_start_state("MarioCircuit.Act4.Luigi")
    assert (luigi.track.name, luigi.driver.name, luigi.driver.ram_id) == ("MarioCircuit.Act4", "Luigi", 2)
    toad = get_start_state("ChocoIsland.Act1.GP50", driver="Toad")
    assert toad.name == "ChocoIsland.Act1.GP50.Toad" and toad.grand_prix
    assert get_start_state(toad.name) == toad
    assert states.driver_state_names(["RainbowRoad", "MarioCircuit.Act1.Yoshi"], "Mario") == [
        "RainbowRoad", "MarioCircuit.Act1",
    ]  # fmt: skip


def test_an_unknown_driver_is_a_config_error_listing_the_drivers() -> None:
    with pytest.raises(ConfigError, match="Luigi"):
        get_start_state("MarioCircuit.Act1", driver="Wario")
    with pytest.raises(ConfigError, match="Unknown Super Mario Kart state 'MarioCircuit.Act1.Wario'"):
        get_start_state("MarioCircuit.Act1.Wario")


def test_the_driver_select_moves_down_a_row_and_right_along_it_before_b() -> None:
    route = power_on_to_course_select(get_start_state("MarioCircuit.Act1.Toad").driver)
    mario = power_on_to_course_select()
    toad_steps = [step.buttons for step in route if step not in mario]
    assert toad_steps == [("DOWN",), ("RIGHT",), ("RIGHT",), ("RIGHT",), ("B",)]


def test_a_grid_with_another_driver_is_off_the_states_grid() -> None:
    luigi_grid = {
        "track": 14, "driver": 2, "lap": 127, "clock_minutes": 0, "clock_seconds": 0, "clock_centiseconds": 0,
        "checkpoint": 40, "checkpoint_count": 41, "speed": 0, "rank": 0, "coins": 0,
    }  # fmt: skip
    assert states.grid_problems(luigi_grid, get_start_state("MarioCircuit.Act4.Luigi")) == []
    assert states.grid_problems(luigi_grid, get_start_state("MarioCircuit.Act4")) == ["driver is 2, expected 0"]


def test_gp_cup_select_presses_down_once_per_cup_then_b() -> None:
    assert [step.buttons for step in gp_cup_select_steps(cup=2)] == [("DOWN",), ("DOWN",), ("B",)]


# Track states


def test_the_trophy_save_starts_with_the_sum_of_its_two_words() -> None:
    assert states.trophy_save(bytes((1, 1, 1, 0))) == bytes((2, 1, 1, 1, 1, 0))
    assert states.trophy_save(bytes((255, 255, 255, 255))) == bytes((254, 255, 255, 255, 255, 255))


@pytest.mark.needs_rom
def test_a_made_state_is_cached_outside_the_repository(in_rom_cache: Path) -> None:
    path = states.state_path("MarioCircuit.Act1")
    assert path.is_file() and path.is_relative_to(in_rom_cache)


@pytest.mark.needs_rom
def test_an_existing_state_is_reused_not_remade(in_rom_cache: Path) -> None:
    before = states.state_path("MarioCircuit.Act1").stat().st_mtime_ns
    states.make_states(["MarioCircuit.Act1"])
    assert states.state_path("MarioCircuit.Act1").stat().st_mtime_ns == before


@pytest.mark.needs_rom
def test_the_env_factory_starts_a_state_by_name_on_the_grid_of_its_track(in_rom_cache: Path) -> None:
    env = make_env(EnvConfig(id=GAME, retro_state="MarioCircuit.Act1"))
    try:
        info = env.unwrapped.data.lookup_all()
    finally:
        env.close()
    assert states.grid_problems(info, get_start_state("MarioCircuit.Act1")) == []


@pytest.mark.slow
@pytest.mark.needs_rom
def test_every_track_special_cup_included_gets_a_state_on_its_grid(in_rom_cache: Path) -> None:
    names = [track.name for track in TRACKS]
    states.make_states(names)
    for name in names:
        env = make_env(EnvConfig(id=GAME, retro_state=name))
        try:
            info = env.unwrapped.data.lookup_all()
        finally:
            env.close()
        assert states.grid_problems(info, get_start_state(name)) == [], name


@pytest.mark.slow
@pytest.mark.needs_rom
def test_every_gp50_start_gets_a_state_on_its_grid_behind_the_cpu_drivers(in_rom_cache: Path) -> None:
    names = [start.name for start in GP50_STARTS]
    paths = states.make_states(names)
    for name in names:
        assert paths[name].name == f"{name}.state"
        env = make_env(EnvConfig(id=GAME, retro_state=name))
        try:
            info = env.unwrapped.data.lookup_all()
        finally:
            env.close()
        # grid_problems checks 8th place (RAM rank 14): seven CPU drivers start ahead.
        assert states.grid_problems(info, get_start_state(name)) == [], name


@pytest.mark.slow
@pytest.mark.needs_rom
def test_another_driver_gets_its_own_states_in_time_trial_and_gp(in_rom_cache: Path) -> None:
    assert states.main(["--tracks", "MarioCircuit.Act4", "MarioCircuit.Act1.GP50", "--driver", "Luigi"]) == 0
    assert states.main(["--tracks", "ChocoIsland.Act1.GP50.Toad"]) == 0
    made = {"MarioCircuit.Act4.Luigi": 2, "MarioCircuit.Act1.GP50.Luigi": 2, "ChocoIsland.Act1.GP50.Toad": 12}
    for name, driver_id in made.items():
        env = make_env(EnvConfig(id=GAME, retro_state=name))
        try:
            info = env.unwrapped.data.lookup_all()
        finally:
            env.close()
        assert info["driver"] == driver_id, name
        assert states.grid_problems(info, get_start_state(name)) == [], name


@pytest.mark.needs_rom
def test_a_state_file_is_a_gzipped_snes9x_savestate(in_rom_cache: Path) -> None:
    with gzip.open(states.state_path("MarioCircuit.Act1"), "rb") as file:
        assert file.read(14) == b"#!s9xsnp:0009\n"


@pytest.mark.needs_rom
def test_the_contact_sheet_tiles_one_256x224_frame_per_state_columns_wide(in_rom_cache: Path) -> None:
    sheet = np.asarray(states.contact_sheet(["MarioCircuit.Act1"] * 3, columns=2))
    assert sheet.shape == (2 * 224, 2 * 256, 3)
    tiles = [sheet[row : row + 224, column : column + 256] for row in (0, 224) for column in (0, 256)]
    np.testing.assert_array_equal(tiles[1], tiles[0])
    np.testing.assert_array_equal(tiles[2], tiles[0])
    assert tiles[0].any() and not tiles[3].any(), "three frames, then the empty fourth place"


def test_the_states_command_exits_with_code_2_for_an_unknown_track() -> None:
    assert states.main(["--tracks", "RainbowRoad.Act9"]) == 2


# Actions


class _ButtonRecorder(gymnasium.Env):
    """A stand-in SNES env that keeps the button array of its last step."""

    def __init__(self) -> None:
        self.buttons = list(SNES_BUTTONS)
        self.action_space = MultiBinary(len(SNES_BUTTONS))
        self.observation_space = Box(0, 255, (224, 256, 3), np.uint8)
        self.pressed: set[str] = set()

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.pressed = {button for button, down in zip(self.buttons, action, strict=True) if down}
        return np.zeros((224, 256, 3), np.uint8), 0.0, False, False, {}


def test_the_drive_actions_press_the_smk_controls() -> None:
    env = discrete_actions(_ButtonRecorder(), "drive")
    pressed = {}
    for action, name in enumerate(ACTION_SETS["drive"]):
        env.step(action)
        pressed[name] = env.unwrapped.pressed
    assert env.action_space == Discrete(7)
    assert pressed == {
        "noop": set(),
        "accelerate": {"B"},
        "accelerate_left": {"B", "LEFT"},
        "accelerate_right": {"B", "RIGHT"},
        "slide_left": {"B", "R", "LEFT"},
        "slide_right": {"B", "R", "RIGHT"},
        "brake": {"Y"},
    }


def test_drive_item_adds_accelerating_while_using_the_item_with_a() -> None:
    table = button_table("drive_item")
    assert len(table) == len(ACTION_SETS["drive"]) + 1
    assert {SNES_BUTTONS[i] for i in np.flatnonzero(table[-1])} == {"B", "A"}


def test_race_keeps_the_drive_actions_that_accelerate() -> None:
    assert list(ACTION_SETS["race"]) == ["accelerate", "accelerate_left", "accelerate_right", "slide_left", "slide_right"]
    assert all(SNES_BUTTONS.index("B") in np.flatnonzero(row) for row in button_table("race"))


@pytest.mark.parametrize("action_set", list(ACTION_SETS))
def test_each_action_mirrored_is_the_one_that_turns_the_other_way(action_set: str) -> None:
    names = list(ACTION_SETS[action_set])
    swapped = {"left": "right", "right": "left"}
    mirrored = [names[image] for image in mirrored_actions(action_set)]
    assert mirrored == ["_".join(swapped.get(word, word) for word in name.split("_")) for name in names]


def test_an_unknown_action_set_is_a_config_error_naming_the_sets() -> None:
    with pytest.raises(EnvConfigError, match="use one of drive, race, drive_item"):
        make_env(EnvConfig(id=GAME, options=MarioKartConfig(actions="fly")))


def test_laps_beyond_the_race_are_a_config_error() -> None:
    with pytest.raises(EnvConfigError, match="set it to 1 to 5"):
        make_env(EnvConfig(id=GAME, options=MarioKartConfig(laps=6)))


def test_a_restart_share_of_one_or_more_is_a_config_error() -> None:
    with pytest.raises(EnvConfigError, match="set it from 0"):
        make_env(EnvConfig(id=GAME, options=MarioKartConfig(restart_share=1.0)))


def test_an_unknown_restart_from_is_a_config_error_naming_both() -> None:
    with pytest.raises(EnvConfigError, match="use anywhere .* or race_ends"):
        make_env(EnvConfig(id=GAME, options=MarioKartConfig(restart_share=0.5, restart_from="finish")))


def test_an_unknown_progress_is_a_config_error_naming_both() -> None:
    with pytest.raises(EnvConfigError, match="use net .* or furthest"):
        make_env(EnvConfig(id=GAME, options=MarioKartConfig(progress="best")))


def test_anywhere_restarts_draw_every_kept_checkpoint_alike() -> None:
    rng = np.random.default_rng(0)
    starts = [restart_checkpoint([0, 5, 9], [9, None], "anywhere", rng) for _ in range(3000)]
    assert {start: starts.count(start) for start in set(starts)} == pytest.approx({0: 1000, 5: 1000, 9: 1000}, abs=100)


def test_race_end_restarts_start_up_to_three_checkpoints_before_where_races_ended() -> None:
    rng = np.random.default_rng(0)
    kept = list(range(31))
    # Of the last four races two stopped at checkpoint 30, one at 12, one got past its first lap.
    starts = [restart_checkpoint(kept, [30, 12, None, 30], "race_ends", rng) for _ in range(4000)]
    counts = {start: starts.count(start) for start in set(starts)}
    assert set(counts) == {27, 28, 29, 30, 9, 10, 11, 12, None}
    assert sum(counts[c] for c in (27, 28, 29, 30)) == pytest.approx(2000, abs=150)
    assert sum(counts[c] for c in (9, 10, 11, 12)) == pytest.approx(1000, abs=120)
    assert counts[None] == pytest.approx(1000, abs=120), "a race that got round: the grid"


def test_race_end_restarts_start_on_the_grid_with_nothing_kept_near_an_end() -> None:
    rng = np.random.default_rng(0)
    assert restart_checkpoint([20, 21], [5], "race_ends", rng) is None  # kept only past it
    assert restart_checkpoint([20, 21], [], "race_ends", rng) is None  # no race ended yet
    assert restart_checkpoint([], [21], "race_ends", rng) is None
    assert restart_checkpoint([18, 21, 25], [22], "race_ends", rng) == 21


# Several tracks (how a list is dealt to envs is specified for every stable-retro game in test_envs.py)


@pytest.mark.slow
@pytest.mark.needs_rom
def test_an_env_with_a_list_of_tracks_drives_each_in_turn_from_its_own(in_rom_cache: Path) -> None:
    tracks = ["MarioCircuit.Act1", "MarioCircuit.Act2", "MarioCircuit.Act3"]
    env = make_env(EnvConfig(id=GAME, retro_state=tracks), env_index=1)
    try:
        played = []
        for _ in range(4):
            played.append(env.reset(seed=0)[1]["race"]["track"])
            env.step(0)
    finally:
        env.close()
    assert played == ["MarioCircuit.Act2", "MarioCircuit.Act3", "MarioCircuit.Act1", "MarioCircuit.Act2"]


# On the real game


def _kart_env(**kart: object) -> gymnasium.Env:
    return make_env(EnvConfig(id=GAME, retro_state="MarioCircuit.Act1", options=MarioKartConfig(**kart)))


def _drive(env: gymnasium.Env, script: list[tuple[str, int]]) -> tuple[list[float], list[dict]]:
    """Take each (action name, agent steps) of `script`; the rewards and infos of every step."""
    names = list(ACTION_SETS["drive"])
    rewards, infos = [], []
    for name, steps in script:
        for _ in range(steps):
            _, reward, terminated, truncated, info = env.step(names.index(name))
            assert not (terminated or truncated)
            rewards.append(reward)
            infos.append(info)
    return rewards, infos


TURN_AROUND = [("accelerate", 25), ("accelerate_left", 24), ("accelerate", 60)]
"""From Mario Circuit 1's grid: over the line, a left turn held until the kart faces back, then
back the way it came (checked frame by frame: Lakitu's sign shows, checkpoints count down)."""


@pytest.mark.needs_rom
def test_stable_retro_orders_the_snes_buttons_as_the_action_table_assumes(in_rom_cache: Path) -> None:
    env = _kart_env()
    try:
        assert tuple(env.unwrapped.buttons) == SNES_BUTTONS
        assert env.action_space == Discrete(7)
        assert env.observation_space.shape == (4, 84, 84)
    finally:
        env.close()


@pytest.mark.needs_rom
def test_accelerating_from_the_grid_earns_progress_reward(in_rom_cache: Path) -> None:
    env = _kart_env()
    try:
        rewards, infos = _drive(env, [("accelerate", 25)])
    finally:
        env.close()
    # 100 frames with B held: over the line (checkpoint 29 -> 0) and on to checkpoint 1.
    assert sum(rewards) == 2.0
    assert infos[-1]["race"]["progress"] == 2 and infos[-1]["race"]["speed"] > 600


@pytest.mark.slow
@pytest.mark.needs_rom
def test_accelerating_from_a_gp50_grid_crosses_the_line_and_earns_progress_reward(in_rom_cache: Path) -> None:
    env = make_env(
        EnvConfig(
            id=GAME, retro_state="MarioCircuit.Act1.GP50", options=MarioKartConfig(actions="drive_item")
        )
    )
    try:
        rewards, infos = _drive(env, [("accelerate", 45)])
    finally:
        env.close()
    # 180 frames with B held past the CPU drivers' slots: checkpoints 27, 28, 29, over the line to 0
    # and on to 1, with no lap reward for the start (lap 127 -> 128).
    assert sum(rewards) == 4.0
    assert infos[-1]["race"]["progress"] == 4 and infos[-1]["lap"] == 128


@pytest.mark.needs_rom
def test_the_slide_action_hops(in_rom_cache: Path) -> None:
    env = _kart_env()
    try:
        _, infos = _drive(env, [("accelerate", 15), ("slide_left", 1)])
    finally:
        env.close()
    assert infos[-1]["ground_status"] == AIRBORNE


@pytest.mark.needs_rom
def test_the_brake_action_stops_the_kart(in_rom_cache: Path) -> None:
    env = _kart_env()
    try:
        _, infos = _drive(env, [("accelerate", 25), ("brake", 45)])
    finally:
        env.close()
    assert infos[-1]["race"]["speed"] == 0


@pytest.mark.needs_rom
def test_driving_backwards_fires_the_wrong_way_penalty(in_rom_cache: Path) -> None:
    env = _kart_env(progress_reward=0.0, lap_reward=0.0, wrong_way_penalty=1.0)
    try:
        rewards, infos = _drive(env, TURN_AROUND)
    finally:
        env.close()
    wrong_way = [info["race"]["wrong_way"] for info in infos]
    assert any(wrong_way) and not any(wrong_way[:25])
    assert rewards[wrong_way.index(True) + 1] == -1.0


@pytest.mark.needs_rom
def test_driving_backwards_loses_progress(in_rom_cache: Path) -> None:
    env = _kart_env(wrong_way_penalty=0.0)
    try:
        rewards, infos = _drive(env, TURN_AROUND)
    finally:
        env.close()
    progress = [info["race"]["progress"] for info in infos]
    assert progress[-1] < max(progress)
    assert sum(rewards[progress.index(max(progress)) + 1 :]) < 0


@pytest.mark.needs_rom
def test_the_race_terminates_when_the_lap_counter_passes_the_last_lap(in_rom_cache: Path) -> None:
    env = _kart_env()
    try:
        # Lap 5 on the grid: crossing the line is the finish (the game then waves the flag).
        env.unwrapped.data.set_value("lap", 132)
        for step in range(1, 31):
            _, _, terminated, truncated, info = env.step(1)
            if terminated or truncated:
                break
    finally:
        env.close()
    assert terminated and not truncated and step < 15
    assert info["race"]["finished"] and info["lap"] == 133


@pytest.mark.needs_rom
def test_a_restarted_race_starts_at_speed_where_an_earlier_race_passed_a_checkpoint(in_rom_cache: Path) -> None:
    env = _kart_env(restart_share=0.99)
    try:
        _, first = _drive(env, [("accelerate", 25)])  # over the line (lap 128) to checkpoint 1
        _, start = env.reset()
        lap = env.unwrapped.data.lookup_all()["lap"]
        rewards, infos = _drive(env, [("accelerate", 15)])
    finally:
        env.close()
    assert not any("restart" in info for info in first)
    assert start["restart"] and all(info["restart"] for info in infos)
    assert lap == 128 and start["race"]["checkpoint"] in (0, 1) and start["race"]["speed"] > 300
    # Checkpoints lie about 12 steps apart at full speed here.
    assert start["race"]["progress"] == 0 and sum(rewards) >= 1, "it races on from there, rewarded as ever"


@pytest.mark.needs_rom
def test_a_race_end_restart_starts_just_before_where_the_race_before_it_ended(in_rom_cache: Path) -> None:
    env = _kart_env(restart_share=0.99, restart_from="race_ends")
    try:
        # Over the line, round the first bend and on to about checkpoint 8, then cut there.
        _, first = _drive(env, [("accelerate", 40), ("accelerate_left", 12), ("accelerate", 48)])
        _, start = env.reset()
        ends = list(env.get_wrapper_attr("ends")[0])
        rewards, _ = _drive(env, [("accelerate", 15)])
    finally:
        env.close()
    end = first[-1]["race"]["checkpoint"]
    assert first[-1]["lap"] == 128 and end >= 6 and ends == [end]
    assert start["restart"] and end - 3 <= start["race"]["checkpoint"] <= end
    assert sum(rewards) >= 1, "it races on from there"


@pytest.mark.slow
@pytest.mark.needs_rom
def test_after_a_race_that_got_round_its_first_lap_a_race_end_restart_starts_on_the_grid(in_rom_cache: Path) -> None:
    env = _kart_env(restart_share=0.99, restart_from="race_ends")
    try:
        _drive(env, [("accelerate", 25)])  # over the line: states kept
        env.unwrapped.data.set_value("lap", 129)  # and on into its second lap
        _, infos = _drive(env, [("accelerate", 1)])
        _, start = env.reset()
        lap = env.unwrapped.data.lookup_all()["lap"]
    finally:
        env.close()
    assert infos[-1]["lap"] == 129
    assert "restart" not in start and lap == 127


@pytest.mark.slow
@pytest.mark.needs_rom
def test_a_race_restarts_only_where_an_earlier_race_on_its_own_track_passed(in_rom_cache: Path) -> None:
    env = make_env(EnvConfig(id=GAME, retro_state=["MarioCircuit.Act1", "MarioCircuit.Act2"],
                             options=MarioKartConfig(restart_share=0.99)))
    try:
        _drive(env, [("accelerate", 25)])  # Mario Circuit 1, over the line
        _, second = env.reset()  # Mario Circuit 2: nothing kept for it yet, so the grid
        second_lap = env.unwrapped.data.lookup_all()["lap"]
        env.step(0)
        _, third = env.reset()  # Mario Circuit 1 again
    finally:
        env.close()
    assert second["race"]["track"] == "MarioCircuit.Act2" and "restart" not in second and second_lap == 127
    assert third["race"]["track"] == "MarioCircuit.Act1" and third["restart"] and third["race"]["speed"] > 300


@pytest.mark.needs_rom
def test_without_a_restart_share_every_race_starts_on_the_grid(in_rom_cache: Path) -> None:
    env = _kart_env()
    try:
        _drive(env, [("accelerate", 25)])
        _, start = env.reset()
        lap = env.unwrapped.data.lookup_all()["lap"]
    finally:
        env.close()
    assert "restart" not in start and lap == 127 and start["race"]["speed"] == 0


@pytest.mark.slow
@pytest.mark.needs_rom
def test_a_race_is_truncated_at_5_minutes_of_frames_by_default(in_rom_cache: Path) -> None:
    # Standing on the grid (no stall limit): nothing but the time limit ends the race.
    env = _kart_env(stall_steps=None)
    try:
        for step in range(1, 18_000 // 4 + 10):
            _, _, terminated, truncated, _ = env.step(0)
            if terminated or truncated:
                break
    finally:
        env.close()
    assert truncated and not terminated
    assert step == 18_000 // 4, "5 minutes of 60 frames/s at 4 frames per agent step"


@pytest.mark.needs_rom
@pytest.mark.parametrize("view", ["driver", "full"])
def test_both_views_give_stacked_84x84_frames(in_rom_cache: Path, view: str) -> None:
    env = _kart_env(view=view)
    try:
        obs, *_ = env.step(1)
    finally:
        env.close()
    assert obs.shape == (4, 84, 84) and obs.dtype == np.uint8


@pytest.mark.needs_rom
def test_the_driver_view_rows_are_bounded_by_black_rows_above_and_below(in_rom_cache: Path) -> None:
    env = _kart_env()
    try:
        _drive(env, [("accelerate", 25)])
        screen = env.unwrapped.get_screen()
    finally:
        env.close()
    start, stop = DRIVER_VIEW_ROWS
    row_is_black = screen.max(axis=(1, 2)) == 0
    assert row_is_black[:start].all() and row_is_black[stop : stop + 8].all()
    assert not row_is_black[start] and not row_is_black[stop - 1]
