"""The env registry: a game family registered by a program of its own is built, acted in, logged
and summed up by the generic core, its episode extra stats included."""

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import gymnasium
import pytest
import torch

from kart_lightning.data import ActorPool
from kart_lightning.envs import (
    EnvConfig,
    EnvConfigError,
    EnvFamily,
    family_options,
    find_family,
    make_env,
    register_env_family,
)
from kart_lightning.evaluation import format_table, play_tracks, scalar_metrics, summarize
from kart_lightning.models import ActorCritic

REPO = Path(__file__).resolve().parents[1]


@dataclass
class TiltOptions:
    bonus: float = 0.0


class Tilt(gymnasium.Wrapper):
    """CartPole that reports its largest pole angle and whether it stood to the time limit."""

    def __init__(self, env, options: TiltOptions):
        super().__init__(env)
        self.options, self.max_angle = options, 0.0

    def reset(self, **kwargs):
        self.max_angle = 0.0
        return self.env.reset(**kwargs)

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        self.max_angle = max(self.max_angle, abs(float(obs[2])))
        info["episode_extra_stats"] = {"max_angle": self.max_angle, "stood": truncated and not terminated}
        return obs, reward + self.options.bonus, terminated, truncated, info


def make_tilt(config: EnvConfig, env_index: int) -> gymnasium.Env:
    env = gymnasium.make("CartPole-v1", max_episode_steps=config.max_episode_steps or 30)
    return gymnasium.wrappers.RecordEpisodeStatistics(Tilt(env, family_options(TILT, config.options)))


TILT = EnvFamily(
    name="tilt", matches=lambda env_id: env_id == "Tilt-v0", make=make_tilt, options=TiltOptions,
    frames_per_step=lambda config: 1, extra_stats={"max_angle": "max", "stood": "sum"},
    known_ids=lambda: ["Tilt-v0"],
)
register_env_family(TILT)


def test_a_registered_family_is_found_by_its_id_before_the_generic_ones():
    assert find_family("Tilt-v0") is TILT
    assert find_family("CartPole-v1").name == "gymnasium"


def test_its_options_reach_its_maker_and_an_unknown_one_is_refused_naming_the_known():
    env = make_env(EnvConfig(id="Tilt-v0", options={"bonus": 1.5}))
    assert env.step(0)[1] == 2.5
    with pytest.raises(EnvConfigError, match="no setting 'bouns' for tilt envs: use one of bonus"):
        make_env(EnvConfig(id="Tilt-v0", options={"bouns": 1.0}))


def test_actors_write_its_extra_stats_where_episodes_end():
    torch.manual_seed(0)
    policy = torch.jit.script(ActorCritic([4], 2, torso="mlp", hidden_size=16))
    pool = ActorPool(
        policy=policy, env=EnvConfig(id="Tilt-v0"), obs_shape=[4], obs_dtype=torch.float32, num_actions=2,
        num_actors=1, envs_per_actor=2, unroll_length=40, batch_size=1, seed=0, start_method="fork",
        extra_stats=tuple(TILT.extra_stats),
    )
    try:
        batch = pool.take_batch(timeout_s=120)
    finally:
        pool.close()
    ended = ~torch.isnan(batch["episode_return"])
    assert bool(ended[1:].any()), "a 30-step limit ends an episode within 40 steps"
    assert bool((batch["episode_max_angle"][ended] > 0).all())
    assert torch.isnan(batch["episode_max_angle"][~ended]).all()
    stood = batch["episode_stood"][ended]
    assert torch.equal(stood == 1, batch["episode_length"][ended] == 30)


def test_test_sums_it_up_as_the_family_says_and_tables_and_metrics_carry_it():
    torch.manual_seed(0)
    policy = torch.jit.script(ActorCritic([4], 2, torso="mlp", hidden_size=16))
    results = list(play_tracks(policy, EnvConfig(id="Tilt-v0"), episodes=6, seed=100, greedy=False))
    (row,) = summarize(results).values()
    assert row["max_angle_max"] == max(result["max_angle"] for result in results)
    assert row["stood_sum"] == sum(result["stood"] for result in results)
    assert re.search(r"max angle\s+stood", format_table(summarize(results)).splitlines()[0])
    metrics = scalar_metrics("test", summarize(results))
    assert metrics["test/Tilt-v0/stood_sum"] == row["stood_sum"]


def test_no_file_outside_the_game_folder_names_the_game():
    found = subprocess.run(
        ["grep", "-rilE", r"mario|lakitu|\blaps?\b", "kart_lightning", "--include=*.py"],
        cwd=REPO, capture_output=True, text=True, check=False,
    ).stdout.split()
    assert [path for path in found if not path.startswith("kart_lightning/envs/mario_kart/")] == []


README_FAMILY_CHECK = r"""
import re, sys
readme = open("README.md").read()
section = readme[readme.index("### A new game family"):]
exec(re.search(r"```python\n(.*?)```", section, re.S).group(1), {"__name__": "mario_bros"})
from kart_lightning.envs import EnvConfig, EnvConfigError, find_family, make_env
family = find_family("SuperMarioBros-Nes-v0")
assert family.name == "Super Mario Bros." and list(family.extra_stats) == ["distance"], family
try:
    make_env(EnvConfig(id="SuperMarioBros-Nes-v0", options={"distance_reward": 0.02}))
except EnvConfigError as error:
    print(error)
"""


def test_the_readmes_new_game_family_registers_and_asks_for_its_rom():
    result = subprocess.run([sys.executable, "-c", README_FAMILY_CHECK], cwd=REPO, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "The ROM for 'SuperMarioBros-Nes-v0' is not imported" in result.stdout
