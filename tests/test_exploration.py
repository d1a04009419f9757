"""εz-greedy in the actors: held random actions, and behaviour logits that are the distribution
the actions were drawn from (HeldActions alone, then in real actor processes on CartPole)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kart_lightning.data import ActorPool, ImpalaDataModule
from kart_lightning.data.exploration import ExplorationConfig, HeldActions
from kart_lightning.envs import EnvConfig
from kart_lightning.errors import ConfigError
from kart_lightning.models import ActorCritic

NUM_ACTIONS = 4


def policy_step(num_envs: int) -> tuple[torch.Tensor, torch.Tensor]:
    logits = torch.tensor([2.0, 0.0, -1.0, 0.5]).expand(num_envs, NUM_ACTIONS)
    return torch.multinomial(torch.softmax(logits, -1), 1).flatten(), logits


def no_done(num_envs: int) -> torch.Tensor:
    return torch.zeros(num_envs, dtype=torch.bool)


def test_epsilon_zero_hands_the_policys_actions_and_logits_through_untouched():
    holds = HeldActions(ExplorationConfig(epsilon=0.0), num_envs=3)
    action, logits = policy_step(3)
    taken, behaviour = holds(action, logits, no_done(3))
    assert taken is action and behaviour is logits


def test_outside_a_hold_actions_follow_the_mixture_the_behaviour_logits_give():
    torch.manual_seed(0)
    epsilon, num_envs = 0.3, 200_000
    # One step of many fresh envs: none is holding yet, so every one draws from the mixture.
    holds = HeldActions(ExplorationConfig(epsilon=epsilon), num_envs)
    action, logits = policy_step(num_envs)
    taken, behaviour = holds(action, logits, no_done(num_envs))
    expected = (1 - epsilon) * torch.softmax(logits[0], -1) + epsilon / NUM_ACTIONS
    torch.testing.assert_close(torch.softmax(behaviour, -1), expected.expand(num_envs, -1))
    frequencies = torch.bincount(taken, minlength=NUM_ACTIONS).double() / num_envs
    torch.testing.assert_close(frequencies, expected.double(), atol=4e-3, rtol=0)


def test_a_hold_keeps_its_action_for_its_drawn_length_with_probability_one():
    for seed in range(100):  # the first seed whose hold lasts more than its first step
        torch.manual_seed(seed)
        holds = HeldActions(ExplorationConfig(epsilon=1.0, max_steps=6), num_envs=1)
        taken, behaviour = holds(*policy_step(1), no_done(1))
        if holds.remaining[0] > 0:
            break
    more = int(holds.remaining[0])
    assert more > 0
    assert torch.softmax(behaviour, -1)[0, taken[0]] == pytest.approx(0.25), "a hold's first step is a uniform draw"
    for _ in range(more):
        again, behaviour = holds(*policy_step(1), no_done(1))
        assert again[0] == taken[0]
        assert torch.softmax(behaviour, -1)[0, taken[0]] == pytest.approx(1.0, abs=1e-9)
    assert holds.remaining[0] == 0
    holds.epsilon = 1e-12  # no new hold may start: the step after the hold is the policy's own
    action, logits = policy_step(1)
    after, behaviour = holds(action, logits, no_done(1))
    assert after[0] == action[0]
    torch.testing.assert_close(torch.softmax(behaviour, -1), torch.softmax(logits, -1))


def test_holds_last_from_one_to_max_steps_mostly_short():
    torch.manual_seed(2)
    holds = HeldActions(ExplorationConfig(epsilon=1.0, max_steps=10), num_envs=100_000)
    holds(*policy_step(100_000), no_done(100_000))
    lengths = holds.remaining + 1
    assert lengths.min() == 1 and lengths.max() == 10
    zeta = torch.arange(1, 11, dtype=torch.float64).pow(-2.0)
    share_of_one = float((lengths == 1).double().mean())
    assert share_of_one == pytest.approx(float(zeta[0] / zeta.sum()), abs=0.01)


def test_a_hold_ends_with_its_episode():
    torch.manual_seed(3)
    holds = HeldActions(ExplorationConfig(epsilon=1.0, max_steps=1000, exponent=0.5), num_envs=1)
    holds(*policy_step(1), no_done(1))
    assert holds.remaining[0] > 0
    holds.epsilon = 1e-12  # no new hold may start: the next step is the policy's own
    action, logits = policy_step(1)
    taken, behaviour = holds(action, logits, torch.ones(1, dtype=torch.bool))
    assert taken[0] == action[0]
    torch.testing.assert_close(torch.softmax(behaviour, -1), torch.softmax(logits, -1))


@pytest.mark.parametrize("setting", [{"epsilon": 1.5}, {"epsilon": -0.1}, {"max_steps": 0}, {"exponent": -1.0}])
def test_bad_exploration_settings_are_refused_in_one_sentence(setting):
    with pytest.raises(ConfigError, match="data.exploration"):
        ImpalaDataModule(env=EnvConfig(id="CartPole-v1"), exploration=ExplorationConfig(**setting))


@pytest.mark.slow
@pytest.mark.parametrize("inference", ["actor", "learner"])
def test_actors_write_held_actions_with_the_logits_they_were_drawn_from(inference):
    torch.manual_seed(0)
    policy = torch.jit.script(ActorCritic([4], 2, torso="mlp", hidden_size=16))
    pool = ActorPool(
        policy=policy, env=EnvConfig(id="CartPole-v1"), obs_shape=[4], obs_dtype=torch.float32, num_actions=2,
        num_actors=1, envs_per_actor=2, unroll_length=40, batch_size=2, seed=0, start_method="spawn",
        inference=inference, exploration=ExplorationConfig(epsilon=0.5, max_steps=8),
    )
    try:
        batch = pool.take_batch(timeout_s=120)
    finally:
        pool.close()
    # Rows 0..T-1 are the steps the unrolls took (row T is the next unroll's row 0).
    probs = torch.softmax(batch["behaviour_logits"][:-1], -1)
    actions = batch["action"][:-1]
    taken = probs.gather(-1, actions[..., None])[..., 0]
    held = taken > 1 - 1e-6  # float32: a hold's probability of 1 - 1e-13 reads 1
    assert held.any(), "some steps are inside a hold"
    assert (~held).any(), "and some are not"
    # Outside a hold, every action has at least epsilon / A = 0.25 under the mixture.
    assert (probs[~held] >= 0.25 - 1e-6).all()
    # Inside one, the action is the one taken the step before (in the same episode).
    previous = actions[:-1][held[1:]]
    assert torch.equal(actions[1:][held[1:]], previous)


def test_held_actions_with_a_trust_region_are_refused_in_one_sentence():
    fit = subprocess.run(
        [sys.executable, "-m", "kart_lightning", "fit", "--config", "configs/cartpole.yaml",
         "--model.trust_region_kl", "0.5", "--data.exploration.epsilon", "0.1"],
        cwd=Path(__file__).resolve().parents[1], check=False, capture_output=True, text=True, timeout=120,
    )
    assert fit.returncode == 2
    assert "Traceback" not in fit.stderr
    assert "--model.trust_region_kl null or --data.exploration.epsilon 0" in fit.stderr
