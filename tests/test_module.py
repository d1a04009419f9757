"""ImpalaModule: the V-trace loss on [T+1, B] batches, reward clipping, frame budget, lr decay and
the per-state frame shares it logs."""

from datetime import timedelta
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import Timer

from kart_lightning.errors import ConfigError
from kart_lightning.module import ImpalaModule, clip_rewards, time_share

T, B = 8, 4


def behaviour_batch(module: ImpalaModule, seed: int = 0) -> dict:
    """A [T+1, B] batch whose behaviour logits and actions come from the module's own policy."""
    generator = torch.Generator().manual_seed(seed)
    obs = torch.randn(T + 1, B, 4, generator=generator)
    done = torch.rand(T + 1, B, generator=generator) < 0.1
    prev_action = torch.randint(0, 2, (T + 1, B), generator=generator)
    reward = torch.randn(T + 1, B, generator=generator)
    core_state = module.policy.initial_state(B)
    with torch.no_grad():
        logits, _, _ = module.policy(obs, prev_action, reward, done, core_state)
    action = torch.multinomial(logits.softmax(-1).reshape(-1, 2), 1, generator=generator).reshape(T + 1, B)
    return {
        "obs": obs, "done": done, "prev_action": prev_action, "reward": reward,
        "truncation_value": torch.zeros(T + 1, B), "action": action, "behaviour_logits": logits,
        "core_h": core_state[0], "core_c": core_state[1], "policy_version": torch.zeros(B, dtype=torch.int64),
        "episode_return": torch.full((T + 1, B), float("nan")),
        "episode_length": torch.full((T + 1, B), float("nan")),
        "env_frames": T * B,
    }


def make_module(**overrides) -> ImpalaModule:
    torch.manual_seed(0)
    options = {"obs_shape": [4], "num_actions": 2, "torso": "mlp", "hidden_size": 32, "use_lstm": True, "lstm_size": 16}
    options.update(overrides)
    return ImpalaModule(**options)


def test_loss_decreases_on_a_fixed_batch():
    module = make_module()
    batch = behaviour_batch(module)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    first = module.compute_loss(batch)
    for _ in range(200):
        optimizer.zero_grad()
        module.compute_loss(batch)["loss"].backward()
        optimizer.step()
    last = module.compute_loss(batch)
    assert last["loss"] < first["loss"]
    assert last["baseline_loss"] < first["baseline_loss"]


def test_every_loss_term_reaches_the_policy_parameters():
    module = make_module()
    losses = module.compute_loss(behaviour_batch(module))
    for name in ("policy_loss", "baseline_loss", "entropy_loss"):
        module.zero_grad()
        losses[name].backward(retain_graph=True)
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        assert grads and any(bool(g.abs().sum() > 0) for g in grads), name


def test_the_loss_under_bfloat16_autocast_is_the_float32_loss_to_bfloat16_precision():
    # trainer.precision bf16-mixed: the learner hands the policy its uint8 frames in bfloat16.
    module = make_module(obs_shape=[4, 84, 84], num_actions=6, torso="shallow", hidden_size=64, use_lstm=False)
    generator = torch.Generator().manual_seed(0)
    core_h, core_c = module.policy.initial_state(B)
    batch = {
        "obs": torch.randint(0, 256, (T + 1, B, 4, 84, 84), dtype=torch.uint8, generator=generator),
        "done": torch.zeros(T + 1, B, dtype=torch.bool), "prev_action": torch.randint(0, 6, (T + 1, B), generator=generator),
        "reward": torch.randn(T + 1, B, generator=generator), "truncation_value": torch.zeros(T + 1, B),
        "action": torch.randint(0, 6, (T + 1, B), generator=generator), "core_h": core_h, "core_c": core_c,
    }
    with torch.no_grad():
        batch["behaviour_logits"], _, _ = module(batch)
    full = module.compute_loss(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = module.compute_loss(batch)
    for name in ("loss", "policy_loss", "baseline_loss", "entropy_loss"):
        assert half[name].dtype == torch.float32
        torch.testing.assert_close(half[name], full[name], rtol=0.02, atol=0.02)


# Episode ends in the loss. With the value head giving VALUE everywhere and the batch on-policy, the
# V-trace target vs_s is the n-step return (the paper's eq. 1 with every ρ and c equal to 1): the
# discounted rewards to the end of the episode, or to obs[T] plus γ^n · VALUE if it runs on. The
# baseline loss is then baseline_cost · ½ Σ (vs_s − VALUE)² over steps and envs.

GAMMA, VALUE = 0.9, 2.0
END = 3
"""The step whose arrival ends every env's episode: departures 0 .. END-1 are its last steps."""


def episode_end_batch(module: ImpalaModule, last_reward: float, truncation_value: float = 0.0) -> dict:
    """A batch in which every env's episode ends on the step END-1 -> END with `last_reward` (its
    only reward) and, for a time-limit truncation, `truncation_value`, then runs on to obs[T]."""
    batch = behaviour_batch(module)
    batch["reward"].zero_()
    batch["done"].zero_()
    batch["reward"][END] = last_reward
    batch["done"][END] = True
    batch["truncation_value"][END] = truncation_value
    with torch.no_grad():
        # On-policy: the rewards and episode ends are policy inputs, so the logits are taken again.
        batch["behaviour_logits"] = module(batch)[0]
    return batch


def constant_value_module(**overrides) -> ImpalaModule:
    module = make_module(use_lstm=False, discount=GAMMA, baseline_cost=1.0, **overrides)
    with torch.no_grad():
        module.policy.baseline.weight.zero_()
        module.policy.baseline.bias.fill_(VALUE)
    return module


def baseline_loss(targets: list[float]) -> float:
    """½ Σ (vs − VALUE)² for the targets of steps 0 .. T-1, the same in each of the B envs."""
    assert len(targets) == T
    return B * 0.5 * sum((target - VALUE) ** 2 for target in targets)


# After END a new episode runs to obs[T], which bootstraps with V = VALUE.
NEXT_EPISODE_TARGETS = [GAMMA ** (T - s) * VALUE for s in range(END, T)]


def test_a_terminal_step_cuts_the_return():
    module = constant_value_module()
    losses = module.compute_loss(episode_end_batch(module, last_reward=1.0))
    episode_targets = [GAMMA ** (END - 1 - s) * 1.0 for s in range(END)]
    expected = baseline_loss(episode_targets + NEXT_EPISODE_TARGETS)
    assert losses["baseline_loss"].item() == pytest.approx(expected)


def test_a_truncated_step_bootstraps_from_its_truncation_value():
    module = constant_value_module()
    losses = module.compute_loss(episode_end_batch(module, last_reward=1.0, truncation_value=0.5))
    episode_targets = [GAMMA ** (END - 1 - s) * (1.0 + GAMMA * 0.5) for s in range(END)]
    expected = baseline_loss(episode_targets + NEXT_EPISODE_TARGETS)
    assert losses["baseline_loss"].item() == pytest.approx(expected)


def test_the_loss_clips_rewards_but_not_the_truncation_value():
    module = constant_value_module(reward_clipping="abs_one")
    losses = module.compute_loss(episode_end_batch(module, last_reward=10.0, truncation_value=5.0))
    episode_targets = [GAMMA ** (END - 1 - s) * (1.0 + GAMMA * 5.0) for s in range(END)]
    expected = baseline_loss(episode_targets + NEXT_EPISODE_TARGETS)
    assert losses["baseline_loss"].item() == pytest.approx(expected)


def test_reward_clipping_modes():
    rewards = torch.tensor([-10.0, -0.5, 0.0, 0.5, 10.0])
    assert clip_rewards(rewards, "abs_one").tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert torch.equal(clip_rewards(rewards, "none"), rewards)
    soft = clip_rewards(rewards, "soft_asymmetric")
    assert soft[4] == pytest.approx(5 * torch.tanh(torch.tensor(2.0)).item())
    assert soft[0] == pytest.approx(-0.3 * 5 * torch.tanh(torch.tensor(2.0)).item())


def test_learning_rate_decays_linearly_to_zero_over_the_frame_budget():
    module = make_module(max_frames=1000, learning_rate=0.01)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    learning_rates = [optimizer.param_groups[0]["lr"]]
    # What each learner step does: count its frames, step the optimizer, then the schedule.
    for env_frames in (250, 500, 1000, 5000):
        module.env_frames.fill_(env_frames)
        optimizer.step()
        scheduler.step()
        learning_rates.append(optimizer.param_groups[0]["lr"])
    assert learning_rates == pytest.approx([0.01, 0.0075, 0.005, 0.0, 0.0])


def test_without_lr_decay_the_learning_rate_stays():
    module = make_module(max_frames=1000, learning_rate=0.01, lr_decay=False)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    module.env_frames.fill_(500)
    optimizer.step()
    scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_with_lr_decay_time_the_learning_rate_follows_the_budget_further_spent():
    module = make_module(max_frames=1000, learning_rate=0.01, lr_decay_time=True)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    learning_rates = []
    # (env frames, share of trainer.max_time spent, as _job_step sets it): the larger share decides.
    for env_frames, share in ((100, 0.5), (600, 0.5), (700, 0.9), (700, 1.0)):
        module.env_frames.fill_(env_frames)
        module._time_share = share
        optimizer.step()
        scheduler.step()
        learning_rates.append(optimizer.param_groups[0]["lr"])
    assert learning_rates == pytest.approx([0.005, 0.004, 0.001, 0.0])


def test_the_time_share_is_what_lightnings_timer_counted_of_max_time_resumes_included():
    assert time_share(None) == 0.0
    assert time_share(Timer()) == 0.0  # a Timer without a duration
    timer = Timer(duration=timedelta(seconds=100))
    timer.load_state_dict({"time_elapsed": {"train": 25.0}})  # a resumed fit: 25 s before this one
    assert time_share(timer) == pytest.approx(0.25)
    timer.load_state_dict({"time_elapsed": {"train": 250.0}})
    assert time_share(timer) == 1.0


def test_lr_decay_time_without_lr_decay_is_refused():
    with pytest.raises(ConfigError, match="set model.lr_decay true, or model.lr_decay_time false"):
        make_module(lr_decay=False, lr_decay_time=True)


def test_env_frame_counter_is_saved_in_the_state_dict():
    module = make_module()
    module.env_frames.fill_(1234)
    restored = make_module()
    restored.load_state_dict(module.state_dict())
    assert int(restored.env_frames) == 1234


def test_frame_share_is_each_states_share_of_the_steps_of_the_fits_finished_episodes():
    module = ImpalaModule(obs_shape=[4], num_actions=2, torso="mlp", hidden_size=8)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    module.optimizers = lambda: optimizer
    logged = {}
    module.log = lambda name, value, **_: logged.__setitem__(name, float(value))
    module._trainer = SimpleNamespace(global_step=0, world_size=1, datamodule=SimpleNamespace(rotated_states=["A", "B", "C"]))

    def batch(lengths_and_states: list[tuple[float, int]]) -> dict[str, torch.Tensor]:
        """One step of unrolls of 2 steps, each ending an episode of the given length on the given state."""
        columns = len(lengths_and_states)
        done = torch.zeros(3, columns, dtype=torch.bool)
        done[2] = True
        ended = torch.full((3, columns), float("nan"))
        lengths, states = ended.clone(), ended.clone()
        lengths[2] = torch.tensor([length for length, _ in lengths_and_states])
        states[2] = torch.tensor([float(state) for _, state in lengths_and_states])
        return {"reward": torch.zeros(3, columns), "done": done, "episode_return": torch.where(done, 1.0, ended),
                "episode_length": lengths, "episode_state": states,
                "policy_version": torch.zeros(columns, dtype=torch.int64), "env_frames": 2 * columns}

    for unrolls, shares in [
        ([(30.0, 0), (10.0, 1)], (0.75, 0.25, 0.0)),  # one episode each: a share of steps, not of episodes
        ([(10.0, 1), (10.0, 1)], (0.5, 0.5, 0.0)),  # summed over the fit: 30 steps each
    ]:
        step = batch(unrolls)
        module._log_training(step, {"loss": torch.tensor(1.0)}, module._job_step(step))
        assert [logged[f"train/{state}/frame_share"] for state in "ABC"] == pytest.approx(shares)
