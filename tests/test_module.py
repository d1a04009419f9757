"""ImpalaModule: the V-trace loss on [T+1, B] batches, reward clipping, frame budget and lr decay."""

import pytest
import torch

from kart_lightning.module import ImpalaModule, clip_rewards

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


def test_a_terminal_step_cuts_the_return_and_a_truncated_one_bootstraps():
    module = make_module(discount=0.9, use_lstm=False)
    batch = behaviour_batch(module)
    batch["done"][:] = False
    batch["reward"][:] = 0.0
    batch["done"][T, 0] = True
    batch["done"][T, 1] = True
    batch["truncation_value"][T, 1] = 0.5
    # Both envs end on the last step; only the truncated one (env 1) keeps a value beyond it.
    with torch.no_grad():
        _, values, _ = module(batch)
    from kart_lightning.losses import vtrace

    rewards = batch["reward"][1:] + 0.9 * batch["truncation_value"][1:]
    discounts = (~batch["done"][1:]).float() * 0.9
    returns = vtrace.from_logits(
        batch["behaviour_logits"][:-1], batch["behaviour_logits"][:-1], batch["action"][:-1],
        discounts, rewards, values[:-1], values[-1],
    )
    assert returns.vs[T - 1, 0] == pytest.approx(0.0, abs=1e-6)
    assert returns.vs[T - 1, 1] == pytest.approx(0.9 * 0.5, abs=1e-6)


def test_reward_clipping_modes():
    rewards = torch.tensor([-10.0, -0.5, 0.0, 0.5, 10.0])
    assert clip_rewards(rewards, "abs_one").tolist() == [-1.0, -0.5, 0.0, 0.5, 1.0]
    assert torch.equal(clip_rewards(rewards, "none"), rewards)
    soft = clip_rewards(rewards, "soft_asymmetric")
    assert soft[4] == pytest.approx(5 * torch.tanh(torch.tensor(2.0)).item())
    assert soft[0] == pytest.approx(-0.3 * 5 * torch.tanh(torch.tensor(2.0)).item())


def test_learning_rate_decays_linearly_to_zero_over_the_frame_budget():
    module = make_module(max_frames=1000)
    assert module._lr_factor(0) == 1.0
    module.env_frames.fill_(250)
    assert module._lr_factor(0) == pytest.approx(0.75)
    module.env_frames.fill_(5000)
    assert module._lr_factor(0) == 0.0


def test_env_frame_counter_is_saved_in_the_state_dict():
    module = make_module()
    module.env_frames.fill_(1234)
    restored = make_module()
    restored.load_state_dict(module.state_dict())
    assert int(restored.env_frames) == 1234
