"""V-trace against a brute-force transcription of IMPALA's eq. 1 (arXiv:1802.01561), in float64.

The reference below never uses the module's backward recursion: it evaluates the explicit double sum
  v_s = V(x_s) + sum_{t=s}^{T-1} (prod_{i=s}^{t-1} gamma_i c_i) delta_t V,
  delta_t V = rho_t (r_t + gamma_t V(x_{t+1}) - V(x_t)),  rho_t = min(rho_bar, pi/mu),  c_i = min(1, pi/mu),
with per-step discounts gamma_i (products of discounts rather than powers of one gamma), n = T - s and
V(x_T) the bootstrap value."""

import math

import pytest
import torch
import torch.nn.functional as F

from kart_lightning.losses import vtrace

T, B, A = 6, 4, 5
CLIPPINGS = [(1.0, 1.0), (None, None), (2.0, 0.5)]


def _clip(x: float, threshold: float | None) -> float:
    return x if threshold is None else min(x, threshold)


def brute_force_vtrace(
    log_rhos: torch.Tensor,
    discounts: torch.Tensor,
    rewards: torch.Tensor,
    values: torch.Tensor,
    bootstrap_value: torch.Tensor,
    clip_rho_threshold: float | None,
    clip_pg_rho_threshold: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 1 and the sec. 4.2 advantage, one scalar at a time with plain Python loops."""
    n_steps, batch = log_rhos.shape
    lr, g, r, v, bv = (x.tolist() for x in (log_rhos, discounts, rewards, values, bootstrap_value))
    vs = [[0.0] * batch for _ in range(n_steps)]
    pg = [[0.0] * batch for _ in range(n_steps)]
    for b in range(batch):
        rho = [math.exp(lr[t][b]) for t in range(n_steps)]
        value = [v[t][b] for t in range(n_steps)] + [bv[b]]
        for s in range(n_steps):
            total = value[s]
            for t in range(s, n_steps):
                trace = 1.0
                for i in range(s, t):
                    trace *= g[i][b] * min(1.0, rho[i])
                delta = _clip(rho[t], clip_rho_threshold) * (r[t][b] + g[t][b] * value[t + 1] - value[t])
                total += trace * delta
            vs[s][b] = total
        for s in range(n_steps):
            next_vs = vs[s + 1][b] if s + 1 < n_steps else bv[b]
            pg[s][b] = _clip(rho[s], clip_pg_rho_threshold) * (r[s][b] + g[s][b] * next_vs - value[s])
    return torch.tensor(vs, dtype=torch.float64), torch.tensor(pg, dtype=torch.float64)


def random_inputs(seed: int, n_steps: int = T, batch: int = B) -> dict[str, torch.Tensor]:
    """Off-policy data whose ratios span far above and far below the clipping thresholds."""
    gen = torch.Generator().manual_seed(seed)
    log_rhos = 1.5 * torch.randn(n_steps, batch, generator=gen, dtype=torch.float64)
    log_rhos[0, 0], log_rhos[1, 1], log_rhos[2, 2] = 4.0, -4.0, 3.0
    discounts = 0.9 + 0.1 * torch.rand(n_steps, batch, generator=gen, dtype=torch.float64)
    return {
        "log_rhos": log_rhos,
        "discounts": discounts,
        "rewards": torch.randn(n_steps, batch, generator=gen, dtype=torch.float64),
        "values": torch.randn(n_steps, batch, generator=gen, dtype=torch.float64),
        "bootstrap_value": torch.randn(batch, generator=gen, dtype=torch.float64),
    }


def random_logits_inputs(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    inputs = random_inputs(seed + 1)
    del inputs["log_rhos"]
    inputs["behaviour_policy_logits"] = 2.0 * torch.randn(T, B, A, generator=gen, dtype=torch.float64)
    inputs["target_policy_logits"] = 2.0 * torch.randn(T, B, A, generator=gen, dtype=torch.float64)
    inputs["actions"] = torch.randint(0, A, (T, B), generator=gen, dtype=torch.int64)
    return inputs


def test_on_policy_with_constant_discount_gives_n_step_bootstrapped_returns():
    gamma = 0.9
    inputs = random_inputs(seed=0)
    inputs["log_rhos"] = torch.zeros(T, B, dtype=torch.float64)
    inputs["discounts"] = torch.full((T, B), gamma, dtype=torch.float64)
    rewards, bootstrap = inputs["rewards"], inputs["bootstrap_value"]

    # G_s = sum_{k=s}^{T-1} gamma^(k-s) r_k + gamma^(T-s) V(x_T): the plain n-step return.
    expected = torch.zeros(T, B, dtype=torch.float64)
    for s in range(T):
        expected[s] = gamma ** (T - s) * bootstrap
        for k in range(s, T):
            expected[s] += gamma ** (k - s) * rewards[k]

    returns = vtrace.from_importance_weights(**inputs)
    torch.testing.assert_close(returns.vs, expected, rtol=1e-12, atol=1e-12)


def test_on_policy_advantage_is_one_step_td_error_on_vtrace_targets():
    inputs = random_inputs(seed=1)
    inputs["log_rhos"] = torch.zeros(T, B, dtype=torch.float64)
    returns = vtrace.from_importance_weights(**inputs)
    next_vs = torch.cat([returns.vs[1:], inputs["bootstrap_value"][None]])
    expected = inputs["rewards"] + inputs["discounts"] * next_vs - inputs["values"]
    torch.testing.assert_close(returns.pg_advantages, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("clip_rho, clip_pg_rho", CLIPPINGS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_off_policy_vs_and_advantages_match_brute_force_eq1(seed, clip_rho, clip_pg_rho):
    inputs = random_inputs(seed)
    returns = vtrace.from_importance_weights(
        **inputs, clip_rho_threshold=clip_rho, clip_pg_rho_threshold=clip_pg_rho
    )
    expected_vs, expected_pg = brute_force_vtrace(**inputs, clip_rho_threshold=clip_rho,
                                                  clip_pg_rho_threshold=clip_pg_rho)
    torch.testing.assert_close(returns.vs, expected_vs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(returns.pg_advantages, expected_pg, rtol=1e-10, atol=1e-10)


def test_clipping_changes_results_on_this_data():
    # Guards the test above: with thresholds that never bind, it would not test clipping at all.
    inputs = random_inputs(seed=0)
    clipped = vtrace.from_importance_weights(**inputs)
    unclipped = vtrace.from_importance_weights(**inputs, clip_rho_threshold=None, clip_pg_rho_threshold=None)
    assert not torch.allclose(clipped.vs, unclipped.vs)
    assert not torch.allclose(clipped.pg_advantages, unclipped.pg_advantages)


def test_default_thresholds_are_one():
    inputs = random_inputs(seed=3)
    default = vtrace.from_importance_weights(**inputs)
    explicit = vtrace.from_importance_weights(**inputs, clip_rho_threshold=1.0, clip_pg_rho_threshold=1.0)
    torch.testing.assert_close(default.vs, explicit.vs, rtol=0, atol=0)
    torch.testing.assert_close(default.pg_advantages, explicit.pg_advantages, rtol=0, atol=0)


@pytest.mark.parametrize("clip_rho, clip_pg_rho", CLIPPINGS)
def test_episode_end_inside_unroll_matches_brute_force(clip_rho, clip_pg_rho):
    inputs = random_inputs(seed=4)
    inputs["discounts"][2, :] = 0.0
    inputs["discounts"][4, 1] = 0.0
    returns = vtrace.from_importance_weights(
        **inputs, clip_rho_threshold=clip_rho, clip_pg_rho_threshold=clip_pg_rho
    )
    expected_vs, expected_pg = brute_force_vtrace(**inputs, clip_rho_threshold=clip_rho,
                                                  clip_pg_rho_threshold=clip_pg_rho)
    torch.testing.assert_close(returns.vs, expected_vs, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(returns.pg_advantages, expected_pg, rtol=1e-10, atol=1e-10)


def test_values_and_rewards_after_episode_end_do_not_leak_into_earlier_targets():
    end = 2  # discount 0 after step `end`: steps end+1.. belong to the next episode
    inputs = random_inputs(seed=5)
    inputs["discounts"][end, :] = 0.0
    before = vtrace.from_importance_weights(**inputs)

    perturbed = {k: v.clone() for k, v in inputs.items()}
    perturbed["values"][end + 1:] += 100.0
    perturbed["rewards"][end + 1:] -= 100.0
    perturbed["log_rhos"][end + 1:] += 3.0
    perturbed["bootstrap_value"] += 100.0
    after = vtrace.from_importance_weights(**perturbed)

    torch.testing.assert_close(after.vs[: end + 1], before.vs[: end + 1], rtol=0, atol=0)
    torch.testing.assert_close(after.pg_advantages[: end + 1], before.pg_advantages[: end + 1], rtol=0, atol=0)
    assert not torch.allclose(after.vs[end + 1:], before.vs[end + 1:])


def test_last_step_of_episode_targets_its_reward_only():
    end = 3
    inputs = random_inputs(seed=6)
    inputs["discounts"][end, :] = 0.0
    returns = vtrace.from_importance_weights(**inputs)
    rho_bar = inputs["log_rhos"][end].exp().clamp(max=1.0)
    expected = inputs["values"][end] + rho_bar * (inputs["rewards"][end] - inputs["values"][end])
    torch.testing.assert_close(returns.vs[end], expected, rtol=1e-12, atol=1e-12)


def test_no_gradient_flows_through_vs_or_pg_advantages():
    inputs = {k: v.requires_grad_() for k, v in random_inputs(seed=7).items()}
    returns = vtrace.from_importance_weights(**inputs)
    for out in (returns.vs, returns.pg_advantages):
        assert not out.requires_grad
        assert out.grad_fn is None


def test_from_logits_keeps_gradient_of_target_action_log_probs_only():
    inputs = random_logits_inputs(seed=8)
    inputs["target_policy_logits"].requires_grad_()
    inputs["values"].requires_grad_()
    returns = vtrace.from_logits(**inputs)

    assert not returns.vs.requires_grad
    assert not returns.pg_advantages.requires_grad
    assert returns.target_action_log_probs.requires_grad

    # The learner's policy-gradient loss: advantages are constants, log-probs are not.
    (returns.target_action_log_probs * returns.pg_advantages).sum().backward()
    grad = inputs["target_policy_logits"].grad
    assert grad is not None and grad.abs().sum() > 0
    assert inputs["values"].grad is None


def test_action_log_probs_picks_log_softmax_of_taken_action():
    inputs = random_logits_inputs(seed=9)
    logits, actions = inputs["target_policy_logits"], inputs["actions"]
    log_probs = vtrace.action_log_probs(logits, actions)
    assert log_probs.shape == (T, B)
    for t in range(T):
        for b in range(B):
            expected = F.log_softmax(logits[t, b], dim=-1)[actions[t, b]]
            torch.testing.assert_close(log_probs[t, b], expected, rtol=0, atol=0)


@pytest.mark.parametrize("clip_rho, clip_pg_rho", CLIPPINGS)
def test_from_logits_equals_from_importance_weights_on_hand_computed_log_rhos(clip_rho, clip_pg_rho):
    inputs = random_logits_inputs(seed=10)
    behaviour = inputs.pop("behaviour_policy_logits")
    target = inputs.pop("target_policy_logits")
    actions = inputs.pop("actions")
    index = actions.unsqueeze(-1)
    target_lp = F.log_softmax(target, dim=-1).gather(-1, index).squeeze(-1)
    behaviour_lp = F.log_softmax(behaviour, dim=-1).gather(-1, index).squeeze(-1)
    log_rhos = target_lp - behaviour_lp

    from_logits = vtrace.from_logits(behaviour, target, actions, **inputs,
                                     clip_rho_threshold=clip_rho, clip_pg_rho_threshold=clip_pg_rho)
    from_weights = vtrace.from_importance_weights(log_rhos, **inputs,
                                                  clip_rho_threshold=clip_rho,
                                                  clip_pg_rho_threshold=clip_pg_rho)

    torch.testing.assert_close(from_logits.log_rhos, log_rhos)
    torch.testing.assert_close(from_logits.target_action_log_probs, target_lp)
    torch.testing.assert_close(from_logits.behaviour_action_log_probs, behaviour_lp)
    torch.testing.assert_close(from_logits.vs, from_weights.vs)
    torch.testing.assert_close(from_logits.pg_advantages, from_weights.pg_advantages)


@pytest.mark.parametrize("clip_rho, clip_pg_rho", CLIPPINGS)
def test_torchscript_from_importance_weights_matches_eager(clip_rho, clip_pg_rho):
    scripted = torch.jit.script(vtrace.from_importance_weights)
    inputs = random_inputs(seed=11)
    inputs["discounts"][3, 0] = 0.0
    eager = vtrace.from_importance_weights(**inputs, clip_rho_threshold=clip_rho,
                                           clip_pg_rho_threshold=clip_pg_rho)
    jitted = scripted(**inputs, clip_rho_threshold=clip_rho, clip_pg_rho_threshold=clip_pg_rho)
    assert torch.equal(jitted.vs, eager.vs)
    assert torch.equal(jitted.pg_advantages, eager.pg_advantages)


@pytest.mark.parametrize("clip_rho, clip_pg_rho", CLIPPINGS)
def test_torchscript_from_logits_matches_eager(clip_rho, clip_pg_rho):
    scripted = torch.jit.script(vtrace.from_logits)
    inputs = random_logits_inputs(seed=12)
    eager = vtrace.from_logits(**inputs, clip_rho_threshold=clip_rho, clip_pg_rho_threshold=clip_pg_rho)
    jitted = scripted(**inputs, clip_rho_threshold=clip_rho, clip_pg_rho_threshold=clip_pg_rho)
    for field in vtrace.VTraceFromLogitsReturns._fields:
        assert torch.equal(getattr(jitted, field), getattr(eager, field)), field


def test_outputs_have_time_major_shapes():
    returns = vtrace.from_logits(**random_logits_inputs(seed=13))
    for field in vtrace.VTraceFromLogitsReturns._fields:
        assert getattr(returns, field).shape == (T, B), field
