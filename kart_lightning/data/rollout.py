"""Shared-memory rollout slots, described once by a spec (name -> shape, dtype).

A slot holds one unroll of T+1 steps of one environment; actors write slots, the learner reads them.
"""

from collections.abc import Mapping, Sequence

import torch

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]


def rollout_spec(
    obs_shape: Sequence[int],
    obs_dtype: torch.dtype,
    num_actions: int,
    unroll_length: int,
    core_state_size: int,
    extra_stats: Sequence[str] = (),
) -> Spec:
    """Fields of one slot. Row t holds what led into step t and what the actor did at step t.

    Arrival fields (the transition into obs[t]):
      reward [T+1] float32: env reward received on arriving at obs[t] (unclipped).
      done [T+1] bool: obs[t] starts a new episode (the previous one terminated or was truncated).
      truncation_value [T+1] float32: the behaviour policy's value of the last observation of an
        episode cut by a time limit (0 otherwise); the learner folds it into the reward so a
        truncated episode bootstraps instead of ending.
      prev_action [T+1] int64: the action that led to obs[t] (a model input, as in the paper).
      episode_return [T+1] float32 and episode_length [T+1] float32: statistics of the episode
        that ended on arriving at obs[t], NaN where none ended.
      episode_KEY [T+1] float32 for each KEY of `extra_stats`: the env family's episode extra
        stats (see envs.registry) of that episode, NaN where none ended or it reported no value.
    Departure fields (the actor at obs[t]):
      obs [T+1, *obs_shape], action [T+1] int64, behaviour_logits [T+1, A] float32.
    Per slot: core_h, core_c [1, H]: the core state before obs[0]; policy_version []: the learner
    step of the weights that acted.
    """
    steps = unroll_length + 1
    return {
        "obs": ((steps, *obs_shape), obs_dtype),
        "reward": ((steps,), torch.float32),
        "done": ((steps,), torch.bool),
        "truncation_value": ((steps,), torch.float32),
        "prev_action": ((steps,), torch.int64),
        "episode_return": ((steps,), torch.float32),
        "episode_length": ((steps,), torch.float32),
        **{f"episode_{key}": ((steps,), torch.float32) for key in extra_stats},
        "action": ((steps,), torch.int64),
        "behaviour_logits": ((steps, num_actions), torch.float32),
        "core_h": ((1, core_state_size), torch.float32),
        "core_c": ((1, core_state_size), torch.float32),
        "policy_version": ((), torch.int64),
    }


def create_buffers(spec: Spec, num_slots: int) -> dict[str, torch.Tensor]:
    """One shared-memory tensor [num_slots, *shape] per field of the spec."""
    return {
        name: torch.zeros((num_slots, *shape), dtype=dtype).share_memory_()
        for name, (shape, dtype) in spec.items()
    }


def stack_slots(
    buffers: Mapping[str, torch.Tensor], slots: list[int], out: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Copy B slots, once, into a time-major batch: [T+1, B, ...] per field ([B, ...] per slot field).

    The core state comes out as [1, B, H], the layout the policy's core takes. With `out` (for
    example pinned host memory for a fast copy to the GPU) the batch is written there.
    """
    batch = {}
    for name, buffer in buffers.items():
        # Per-slot scalars stack to [B]; everything else gains B as its second axis.
        dim = 0 if buffer.dim() == 1 else 1
        parts = [buffer[slot] for slot in slots]
        batch[name] = torch.stack(parts, dim=dim, out=out[name]) if out else torch.stack(parts, dim=dim)
    return batch


def empty_batch(buffers: Mapping[str, torch.Tensor], batch_size: int, pin_memory: bool) -> dict[str, torch.Tensor]:
    """Storage for one batch of `batch_size` slots, laid out as `stack_slots` writes it."""
    batch = {}
    for name, buffer in buffers.items():
        shape = list(buffer.shape[1:])
        shape.insert(0 if buffer.dim() == 1 else 1, batch_size)
        batch[name] = torch.empty(shape, dtype=buffer.dtype, pin_memory=pin_memory)
    return batch
