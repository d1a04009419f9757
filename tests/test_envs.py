"""Specification of kart_lightning.envs: what every env from the factory looks like and does."""

import dataclasses
import gzip
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gymnasium
import numpy as np
import pytest
from gymnasium.spaces import Discrete

from kart_lightning.envs import (
    EnvConfig,
    EnvConfigError,
    UnknownEnvError,
    env_frames_per_step,
    find_family,
    make_env,
)


@contextmanager
def built(config: EnvConfig, seed: int = 0) -> Iterator[gymnasium.Env]:
    """An env that is closed afterwards: stable-retro allows one emulator per process."""
    env = make_env(config, seed)
    try:
        yield env
    finally:
        env.close()


def test_cartpole_gives_float32_vector_observations():
    with built(EnvConfig(id="CartPole-v1")) as env:
        obs, _ = env.reset()
        next_obs, *_ = env.step(env.action_space.sample())
    assert obs.dtype == next_obs.dtype == np.float32
    assert obs.shape == next_obs.shape == env.observation_space.shape == (4,)
    assert env_frames_per_step(EnvConfig(id="CartPole-v1")) == 1


def test_pong_gives_stacked_84x84_gray_frames_and_six_actions():
    config = EnvConfig(id="ALE/Pong-v5")
    with built(config) as env:
        obs, _ = env.reset()
        next_obs, *_ = env.step(env.action_space.sample())
    assert obs.dtype == next_obs.dtype == np.uint8
    assert obs.shape == next_obs.shape == env.observation_space.shape == (4, 84, 84)
    assert env.action_space == Discrete(6)
    assert env_frames_per_step(config) == 4


def test_color_frames_stack_three_channels_per_frame():
    with built(EnvConfig(id="ALE/Pong-v5", grayscale=False, frame_stack=2)) as env:
        obs, _ = env.reset()
    assert obs.shape == (6, 84, 84)
    # After reset the stack is padded with the first frame: both RGB triples are equal.
    np.testing.assert_array_equal(obs[:3], obs[3:])


def test_airstriker_steps_random_actions_with_stacked_frames():
    with built(EnvConfig(id="Airstriker-Genesis-v0")) as env:
        assert isinstance(env.action_space, Discrete)
        obs, _ = env.reset()
        assert obs.dtype == np.uint8 and obs.shape == (4, 84, 84)
        for _ in range(300):
            obs, _, terminated, truncated, _ = env.step(env.action_space.sample())
            assert obs.dtype == np.uint8 and obs.shape == (4, 84, 84)
            if terminated or truncated:
                obs, _ = env.reset()


@pytest.mark.parametrize("env_id", ["CartPole-v1", "ALE/Pong-v5"])
def test_time_limit_truncates_rather_than_terminates(env_id: str):
    with built(EnvConfig(id=env_id, max_episode_steps=3)) as env:
        env.reset()
        ends = [env.step(0)[2:4] for _ in range(3)]
    assert ends == [(False, False), (False, False), (False, True)]


def frames_played(seed: int, steps: int = 30) -> np.ndarray:
    """`[steps + 1, 4, 84, 84] uint8`: Pong from `make_env(seed)` and a plain reset, under actions
    sampled from its action space. Pong's first frame is the same whatever the seed; the frames
    after it depend on the sampled actions and on the seeded number of no-ops at reset."""
    with built(EnvConfig(id="ALE/Pong-v5"), seed=seed) as env:
        frames = [env.reset()[0]]
        frames += [env.step(env.action_space.sample())[0] for _ in range(steps)]
    return np.stack(frames)


def test_a_pong_point_is_paid_in_the_step_whose_frame_shows_it_or_the_step_before():
    """The reward and the frame of a step line up: the score at the top of the newest frame
    changes in the step that pays the point or, as the screen draws the score a frame after the
    game counts it, in the step after; never before it, and never without a point."""
    with built(EnvConfig(id="ALE/Pong-v5")) as env:
        env.reset()
        obs = env.step(0)[0]  # the reset frame shows no score yet: compare from the first step on
        steps = []  # (reward, whether the score rows of the newest frame changed)
        for _ in range(600):
            new, reward, terminated, truncated, _ = env.step(env.action_space.sample())
            steps.append((reward, not np.array_equal(new[-1, :9], obs[-1, :9])))
            obs = new
            assert not (terminated or truncated), "a Pong game outlasts 600 steps of random play"
    paid = [t for t, (reward, _) in enumerate(steps) if reward != 0]
    assert len(paid) >= 10
    for t, (reward, changed) in enumerate(steps):
        if changed:
            assert t in paid or t - 1 in paid, f"the score changed at step {t} with no point paid then or just before"
    for t in paid:
        assert steps[t][1] or steps[t + 1][1], f"the point paid at step {t} shows on neither that frame nor the next"


def test_the_same_seed_plays_the_same_frames():
    np.testing.assert_array_equal(frames_played(seed=7), frames_played(seed=7))


def test_another_seed_plays_other_frames():
    assert not np.array_equal(frames_played(seed=7), frames_played(seed=8))


def test_unknown_env_id_raises_error_naming_the_fix():
    with pytest.raises(UnknownEnvError, match=r"Unknown env id 'Foo-v9': use a gymnasium id"):
        find_family("Foo-v9")
    with pytest.raises(UnknownEnvError, match=r"did you mean 'ALE/Pong-v5'"):
        make_env(EnvConfig(id="ALE/Pongg-v5"))


def test_retro_game_without_imported_rom_raises_error_naming_the_import():
    with pytest.raises(EnvConfigError, match=r"python -m stable_retro.import"):
        make_env(EnvConfig(id="SuperMarioBros-Nes-v0"))


def test_unknown_retro_state_raises_error_listing_the_states():
    with pytest.raises(EnvConfigError, match=r"Unknown state 'Level9'.*\['Level1'\]"):
        make_env(EnvConfig(id="Airstriker-Genesis-v0", retro_state="Level9"))


AIRSTRIKER = EnvConfig(id="Airstriker-Genesis-v0", noop_max=0)


@pytest.fixture(scope="module")
def later_state(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A second Airstriker state, 100 steps into Level1, and Level1's own first observation."""
    env = make_env(AIRSTRIKER)
    try:
        level1_start = env.reset(seed=0)[0]
        for _ in range(100):
            env.step(1)
        later = tmp_path_factory.mktemp("states") / "later.state"
        with gzip.open(later, "wb") as file:
            file.write(env.unwrapped.em.get_state())
    finally:
        env.close()
    return later, level1_start


def test_several_retro_states_are_played_in_turn_episode_after_episode(later_state):
    later, level1_start = later_state
    env = make_env(dataclasses.replace(AIRSTRIKER, retro_state=["Level1", str(later)]), env_index=1)
    try:
        starts, state_indices = [], []
        for _ in range(4):
            starts.append(env.reset(seed=0)[0])
            state_indices.append(env.step(0)[4]["state_index"])
        fifth = env.reset(seed=0)[0]
        assert np.array_equal(env.reset(seed=0)[0], fifth), "a reset with no step since is no new episode"
    finally:
        env.close()
    assert state_indices == [1, 0, 1, 0], "each step says which state its episode started from"
    assert not np.array_equal(starts[0], level1_start), "env 1 starts from the list's second state"
    assert np.array_equal(starts[1], level1_start) and np.array_equal(starts[3], level1_start)
    assert np.array_equal(starts[0], starts[2]) and np.array_equal(starts[0], fifth)


def test_env_i_starts_from_state_i_modulo_the_length_of_the_list(later_state):
    later, level1_start = later_state
    config = dataclasses.replace(AIRSTRIKER, retro_state=[str(later), "Level1", "Level1"])
    starts_on_level1 = []
    for env_index in range(5):
        env = make_env(config, env_index=env_index)
        try:
            starts_on_level1.append(bool(np.array_equal(env.reset(seed=0)[0], level1_start)))
        finally:
            env.close()
    assert starts_on_level1 == [False, True, True, False, True]


@pytest.mark.parametrize(("balance", "expected"), [("episodes", [0, 1, 0, 1, 0]), ("frames", [0, 1, 1, 1, 0])])
def test_each_episode_starts_from_the_next_state_or_from_the_least_played(later_state, balance, expected):
    later, _ = later_state
    config = dataclasses.replace(AIRSTRIKER, retro_state=["Level1", str(later)], retro_state_balance=balance)
    env = make_env(config)
    try:
        state_indices = []
        env.reset(seed=0)
        for _ in expected:
            state_index = env.step(0)[4]["state_index"]
            state_indices.append(state_index)
            # Episodes cut by hand: 30 agent steps on the first state, 10 on the second.
            for _ in range(29 if state_index == 0 else 9):
                env.step(0)
            env.reset(seed=0)
    finally:
        env.close()
    # frames: after 30 steps on state 0, state 1 is played until its 3 x 10 steps catch up.
    assert state_indices == expected


def test_an_unknown_state_balance_is_a_config_error():
    with pytest.raises(EnvConfigError, match="use episodes .* or frames"):
        make_env(dataclasses.replace(AIRSTRIKER, retro_state_balance="steps"))


def test_an_empty_list_of_states_is_a_config_error():
    with pytest.raises(EnvConfigError, match="name at least one state"):
        make_env(dataclasses.replace(AIRSTRIKER, retro_state=[]))


def test_non_discrete_action_space_raises_error_naming_the_fix():
    with pytest.raises(EnvConfigError, match=r"choose an env with Discrete actions"):
        make_env(EnvConfig(id="Pendulum-v1"))


def test_episodic_life_ends_episode_on_life_loss_without_resetting_the_game():
    with built(EnvConfig(id="ALE/Breakout-v5", episodic_life=True)) as env:
        ale = env.unwrapped.ale
        env.reset()
        lives_at_start = ale.lives()
        terminated = False
        while not terminated:
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            assert not truncated
        assert 0 < ale.lives() == lives_at_start - 1
        env.reset()
        assert ale.lives() == lives_at_start - 1
