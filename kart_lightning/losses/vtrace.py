"""V-trace off-policy targets and policy-gradient advantages (IMPALA, arXiv:1802.01561).
Pure TorchScript-compatible functions over time-major [T, B] tensors, after DeepMind's scalable_agent."""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class VTraceReturns(NamedTuple):
    """vs: [T, B] V-trace value targets; pg_advantages: [T, B] advantages for the policy gradient."""

    vs: Tensor
    pg_advantages: Tensor


class VTraceFromLogitsReturns(NamedTuple):
    """V-trace outputs plus the log-probabilities they were computed from, all [T, B]."""

    vs: Tensor
    pg_advantages: Tensor
    log_rhos: Tensor
    behaviour_action_log_probs: Tensor
    target_action_log_probs: Tensor


def action_log_probs(policy_logits: Tensor, actions: Tensor) -> Tensor:
    """Log-probabilities of the taken actions under a softmax policy.

    Args:
      policy_logits: [T, B, A] unnormalised log-probabilities.
      actions: [T, B] int64 indices into the last dimension of policy_logits.

    Returns:
      [T, B] log pi(actions), differentiable with respect to policy_logits.
    """
    log_probs = F.log_softmax(policy_logits, dim=-1)
    return log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def from_logits(
    behaviour_policy_logits: Tensor,
    target_policy_logits: Tensor,
    actions: Tensor,
    discounts: Tensor,
    rewards: Tensor,
    values: Tensor,
    bootstrap_value: Tensor,
    clip_rho_threshold: float | None = 1.0,
    clip_pg_rho_threshold: float | None = 1.0,
) -> VTraceFromLogitsReturns:
    """V-trace for softmax policies, from the logits of the behaviour and target policies.

    Args:
      behaviour_policy_logits: [T, B, A] logits of the policy the actors sampled from (mu).
      target_policy_logits: [T, B, A] logits of the policy being learnt (pi).
      actions: [T, B] int64 actions the actors took.
      discounts: [T, B] per-step discount applied to the value after step t; see from_importance_weights.
      rewards: [T, B] reward received after step t.
      values: [T, B] V(x_t) from the learner's baseline.
      bootstrap_value: [B] V(x_T), the value of the state after the last step.
      clip_rho_threshold: rho-bar for the value targets; None disables clipping.
      clip_pg_rho_threshold: rho-bar for the policy-gradient advantages; None disables clipping.

    Returns:
      VTraceFromLogitsReturns. vs and pg_advantages carry no gradient; target_action_log_probs
      (and log_rhos, through it) keep theirs, since the learner's policy-gradient loss needs them.
    """
    target_action_log_probs = action_log_probs(target_policy_logits, actions)
    behaviour_action_log_probs = action_log_probs(behaviour_policy_logits, actions)
    log_rhos = target_action_log_probs - behaviour_action_log_probs
    returns = from_importance_weights(
        log_rhos=log_rhos,
        discounts=discounts,
        rewards=rewards,
        values=values,
        bootstrap_value=bootstrap_value,
        clip_rho_threshold=clip_rho_threshold,
        clip_pg_rho_threshold=clip_pg_rho_threshold,
    )
    return VTraceFromLogitsReturns(
        vs=returns.vs,
        pg_advantages=returns.pg_advantages,
        log_rhos=log_rhos,
        behaviour_action_log_probs=behaviour_action_log_probs,
        target_action_log_probs=target_action_log_probs,
    )


def from_importance_weights(
    log_rhos: Tensor,
    discounts: Tensor,
    rewards: Tensor,
    values: Tensor,
    bootstrap_value: Tensor,
    clip_rho_threshold: float | None = 1.0,
    clip_pg_rho_threshold: float | None = 1.0,
) -> VTraceReturns:
    """V-trace targets (eq. 1) and policy-gradient advantages (sec. 4.2) from log importance ratios.

    The trace-cutting threshold c-bar is fixed at 1, i.e. c_t = min(1, rho_t).

    Episode ends are carried by discounts alone: the caller passes discount 0 for a step after
    which the episode terminated, which stops both bootstrapping and the trace there. A truncated
    (time-limit) episode needs nothing here: the caller folds discount * V(final state) into that
    step's reward and passes discount 0, so the next episode's values are not used.

    Args:
      log_rhos: [T, B] log(pi(a_t|x_t) / mu(a_t|x_t)), target over behaviour policy.
      discounts: [T, B] discount applied to the value of x_{t+1}, 0 after a terminal step.
      rewards: [T, B] reward received after taking a_t in x_t.
      values: [T, B] V(x_t) from the learner's baseline.
      bootstrap_value: [B] V(x_T), the value of the state after the last step.
      clip_rho_threshold: rho-bar, clipping the ratios in the value targets; None disables it.
      clip_pg_rho_threshold: clipping of the ratios weighting the advantages; None disables it.

    Returns:
      VTraceReturns with vs [T, B] and pg_advantages [T, B], both without gradient.
    """
    # Targets are regression/advantage constants: gradients must flow only through the losses'
    # own uses of values and log-probabilities, never back through the V-trace recursion.
    with torch.no_grad():
        rhos = torch.exp(log_rhos)
        if clip_rho_threshold is not None:
            clipped_rhos = torch.clamp(rhos, max=clip_rho_threshold)
        else:
            clipped_rhos = rhos
        cs = torch.clamp(rhos, max=1.0)

        values_t_plus_1 = torch.cat([values[1:], bootstrap_value.unsqueeze(0)], dim=0)
        deltas = clipped_rhos * (rewards + discounts * values_t_plus_1 - values)
        # Precomputing deltas and the trace factors leaves one fused multiply-add per step, so the
        # sequential loop over T is as cheap as it can be.
        trace_factors = discounts * cs

        # vs_t - V(x_t) = delta_t + gamma_t c_t (vs_{t+1} - V(x_{t+1})), with vs_T - V(x_T) = 0.
        vs_minus_v_xs = torch.empty_like(deltas)
        acc = torch.zeros_like(bootstrap_value)
        for t in range(deltas.shape[0] - 1, -1, -1):
            acc = deltas[t] + trace_factors[t] * acc
            vs_minus_v_xs[t] = acc
        vs = vs_minus_v_xs + values

        vs_t_plus_1 = torch.cat([vs[1:], bootstrap_value.unsqueeze(0)], dim=0)
        if clip_pg_rho_threshold is not None:
            clipped_pg_rhos = torch.clamp(rhos, max=clip_pg_rho_threshold)
        else:
            clipped_pg_rhos = rhos
        pg_advantages = clipped_pg_rhos * (rewards + discounts * vs_t_plus_1 - values)

    return VTraceReturns(vs=vs, pg_advantages=pg_advantages)
