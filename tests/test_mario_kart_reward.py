"""Specification of the Super Mario Kart reward and episode end, on scripted RAM readings.

Each reading holds the data.json variables RaceReward reads, as stable-retro's step info does.
"""

from typing import Any

import pytest

from kart_lightning.envs.mario_kart.config import MarioKartConfig
from kart_lightning.envs.mario_kart.reward import RaceReward

CHECKPOINTS = 30
"""Mario Circuit 1's checkpoint count: the grid reads lap 127, checkpoint 29."""

ONLY_PROGRESS: dict[str, Any] = {
    "lap_reward": 0.0, "wrong_way_penalty": 0.0, "fall_penalty": 0.0, "lakitu_penalty": 0.0,
}  # fmt: skip
"""MarioKartConfig fields that switch off every reward term but progress."""


def ram(lap: int = 127, checkpoint: int = CHECKPOINTS - 1, **changes: int) -> dict[str, int]:
    """A RAM reading on Mario Circuit 1: on the grid, on the road, clock at 0, unless changed."""
    reading = {
        "lap": lap, "checkpoint": checkpoint, "checkpoint_count": CHECKPOINTS, "track": 7,
        "ground_status": 0, "ground_type": 64, "lakitu": 0, "speed": 0, "x": 3712, "y": 2288,
        "clock_minutes": 0, "clock_seconds": 0, "clock_centiseconds": 0,
    }  # fmt: skip
    return {**reading, **changes}


def race(frames_per_step: int = 1, **config: Any) -> RaceReward:
    """A RaceReward reset on the grid."""
    reward = RaceReward(MarioKartConfig(**config), frames_per_step)
    reward.reset(ram())
    return reward


def rewards(reward: RaceReward, readings: list[dict[str, int]]) -> list[float]:
    return [reward.step(reading)[0] for reading in readings]


# Progress and laps


def test_crossing_the_start_line_is_one_checkpoint_of_progress_and_no_lap() -> None:
    reward = race()
    assert rewards(reward, [ram(128, 0)]) == [1.0]
    assert reward.info()["progress"] == 1
    assert reward.info()["laps_completed"] == 0


def test_completing_a_lap_earns_the_checkpoint_at_the_line_and_the_lap_bonus() -> None:
    reward = race(lap_reward=10.0)
    rewards(reward, [ram(128, checkpoint) for checkpoint in range(CHECKPOINTS)])
    assert rewards(reward, [ram(129, 0)]) == [11.0]
    assert reward.info()["laps_completed"] == 1


def test_driving_back_over_the_line_loses_the_checkpoint_and_recrossing_earns_no_second_bonus() -> None:
    reward = race(lap_reward=10.0)
    rewards(reward, [ram(128, checkpoint) for checkpoint in range(CHECKPOINTS)])
    assert rewards(reward, [ram(129, 0), ram(128, CHECKPOINTS - 1), ram(129, 0)]) == [11.0, -1.0, 1.0]
    assert reward.info()["laps_completed"] == 1


def test_driving_backwards_from_the_grid_is_negative_progress() -> None:
    reward = race(**ONLY_PROGRESS)
    assert rewards(reward, [ram(127, 28), ram(127, 27)]) == [-1.0, -1.0]
    assert reward.info()["progress"] == -2


def test_progress_reward_sums_to_the_net_checkpoints_gained() -> None:
    walk = [(127, 29), (128, 0), (128, 1), (128, 0), (127, 29), (127, 28), (127, 29), (128, 0), (128, 1)]
    reward = race(progress_reward=0.5, **ONLY_PROGRESS)
    assert sum(rewards(reward, [ram(lap, checkpoint) for lap, checkpoint in walk])) == 0.5 * 2


def test_furthest_progress_pays_only_checkpoints_past_the_races_best() -> None:
    walk = [(128, 0), (128, 1), (128, 2), (128, 1), (128, 0), (128, 1), (128, 2), (128, 3)]
    reward = race(progress="furthest", **ONLY_PROGRESS)
    assert rewards(reward, [ram(lap, checkpoint) for lap, checkpoint in walk]) == [1, 1, 1, 0, 0, 0, 0, 1]
    assert reward.info()["progress"] == 4


def test_furthest_progress_costs_nothing_when_the_game_puts_the_kart_back() -> None:
    forward = [ram(128, checkpoint) for checkpoint in range(11)]
    put_back = ram(128, 1)
    net, furthest = race(**ONLY_PROGRESS), race(progress="furthest", **ONLY_PROGRESS)
    assert rewards(net, [*forward, put_back]) == [1.0] * 11 + [-9.0]
    assert rewards(furthest, [*forward, put_back]) == [1.0] * 11 + [0.0]
    assert net.extra_stats()["checkpoints"] == furthest.extra_stats()["checkpoints"] == 2


def test_furthest_and_net_progress_sum_alike_once_past_the_furthest() -> None:
    walk = [(128, 0), (128, 1), (127, 29), (127, 28), (127, 29), (128, 0), (128, 1), (128, 2)]
    sums = [sum(rewards(race(progress=mode, **ONLY_PROGRESS), [ram(*at) for at in walk])) for mode in ("net", "furthest")]
    assert sums == [3.0, 3.0]


# Penalties


def test_the_wrong_way_penalty_is_per_agent_step_spread_over_its_frames() -> None:
    reward = race(frames_per_step=4, wrong_way_penalty=0.1)
    assert sum(rewards(reward, [ram(lakitu=16)] * 4)) == pytest.approx(-0.1)
    assert reward.info()["wrong_way"]


def test_the_wrong_way_sign_is_a_bit_of_lakitu_and_also_shows_during_a_rescue() -> None:
    reward = race(wrong_way_penalty=0.1)
    assert rewards(reward, [ram(lakitu=20), ram(lakitu=4), ram(lakitu=64)]) == [-0.1, 0.0, 0.0]


def test_a_fall_costs_its_penalty_once_however_long_it_lasts() -> None:
    # Into deep water at Koopa Beach: air, deep water, 6, then Lakitu (NOTES.md).
    statuses = [2] + [8] * 50 + [6] * 10 + [12] * 30 + [14] * 20 + [0]
    reward = race(fall_penalty=5.0, lakitu_penalty=0.0)
    assert sum(rewards(reward, [ram(ground_status=status) for status in statuses])) == -5.0


def test_a_lakitu_rescue_costs_its_penalty_once() -> None:
    statuses = [4] * 60 + [12] * 80 + [14] * 90 + [0]
    reward = race(fall_penalty=0.0, lakitu_penalty=3.0)
    assert sum(rewards(reward, [ram(ground_status=status) for status in statuses])) == -3.0


def test_a_second_fall_is_penalised_again() -> None:
    statuses = [4, 12, 14, 0, 4, 12, 14, 0]
    reward = race(fall_penalty=5.0, lakitu_penalty=1.0)
    assert sum(rewards(reward, [ram(ground_status=status) for status in statuses])) == -12.0


def test_the_offroad_penalty_applies_on_ground_other_than_the_grids_and_not_in_the_air() -> None:
    reward = race(offroad_penalty=0.2)
    readings = [ram(ground_type=64), ram(ground_type=84), ram(ground_type=84, ground_status=2)]
    assert rewards(reward, readings) == [0.0, -0.2, 0.0]


def test_offroad_ground_costs_nothing_by_default() -> None:
    assert rewards(race(), [ram(ground_type=84)]) == [0.0]


def test_the_speed_reward_is_per_agent_step_at_full_speed_in_proportion_to_speed() -> None:
    reward = race(frames_per_step=4, speed_reward=0.1)
    assert sum(rewards(reward, [ram(speed=737)] * 4)) == pytest.approx(0.1)
    assert sum(rewards(reward, [ram(speed=368)] * 4)) == pytest.approx(0.1 * 368 / 737)


def test_the_speed_reward_is_not_paid_going_the_wrong_way_or_while_lost() -> None:
    reward = race(speed_reward=0.1, wrong_way_penalty=0.0, fall_penalty=0.0)
    readings = [ram(speed=737, lakitu=16), ram(speed=737, ground_status=4), ram(speed=737, ground_status=12)]
    assert rewards(reward, readings) == [0.0, 0.0, 0.0]
    assert rewards(reward, [ram(speed=737, ground_status=2)]) == [pytest.approx(0.1)]


def test_speed_earns_nothing_by_default() -> None:
    assert rewards(race(), [ram(speed=737)]) == [0.0]


# Episode end


def test_a_stalled_race_is_truncated_after_stall_steps_agent_steps() -> None:
    reward = race(frames_per_step=4, stall_steps=3)
    ends = [reward.step(ram())[1:] for _ in range(12)]
    assert ends == [(False, False)] * 11 + [(False, True)]


def test_a_new_checkpoint_restarts_the_stall_count() -> None:
    reward = race(stall_steps=3)
    readings = [ram(), ram(), ram(128, 0), ram(128, 0), ram(128, 0)]
    assert [reward.step(reading)[2] for reading in readings] == [False, False, False, False, False]
    assert reward.step(ram(128, 0))[2]


def test_rocking_over_one_checkpoint_does_not_restart_the_stall_count() -> None:
    reward = race(stall_steps=4)
    readings = [ram(128, 0), ram(127, 29), ram(128, 0), ram(127, 29), ram(128, 0)]
    assert [reward.step(reading)[2] for reading in readings] == [False, False, False, False, True]


def test_stall_steps_none_never_truncates() -> None:
    reward = race(stall_steps=None)
    assert not any(reward.step(ram())[2] for _ in range(10_000))


def test_the_race_terminates_when_the_lap_counter_passes_the_last_lap() -> None:
    reward = race()
    laps = [ram(lap, checkpoint) for lap in range(128, 133) for checkpoint in range(CHECKPOINTS)]
    assert not any(reward.step(reading)[1] for reading in laps)
    assert reward.step(ram(133, 0))[1:] == (True, False)
    assert reward.info()["finished"] and reward.info()["laps_completed"] == 5


def test_laps_ends_the_episode_after_that_many_laps() -> None:
    reward = race(laps=1)
    assert not any(reward.step(ram(128, checkpoint))[1] for checkpoint in range(CHECKPOINTS))
    assert reward.step(ram(129, 0))[1]


# Race info


def test_lap_times_are_read_from_the_race_clock_at_each_line_crossing() -> None:
    reward = race()
    reward.step(ram(128, 0, clock_centiseconds=91))
    reward.step(ram(129, 0, clock_seconds=14, clock_centiseconds=50))
    reward.step(ram(130, 0, clock_seconds=27, clock_centiseconds=25))
    assert reward.info()["lap_times_s"] == pytest.approx((14.5, 12.75))
    assert reward.info()["race_time_s"] == pytest.approx(27.25)


def test_info_names_the_track_and_reports_checkpoint_speed_and_position() -> None:
    reward = race()
    reward.step(ram(128, 1, speed=658, x=3712, y=1851, clock_minutes=1, clock_seconds=2))
    assert reward.info() == {
        "track": "MarioCircuit.Act1", "laps_completed": 0, "checkpoint": 1, "progress": 2,
        "race_time_s": 62.0, "lap_times_s": (), "speed": 658, "x": 3712, "y": 1851,
        "wrong_way": False, "finished": False,
    }  # fmt: skip
