"""Shared-memory rollout slots, described once by a spec (name -> shape, dtype).

A slot holds one unroll of T+1 steps of one environment; actors write slots, the learner reads them.
"""

import time
from collections.abc import Mapping, Sequence

import torch

Spec = dict[str, tuple[tuple[int, ...], torch.dtype]]


def rollout_spec(
    obs_shape: Sequence[int],
    obs_dtype: torch.dtype,
    num_actions: int,
    unroll_length: int,
    core_state_size: int,
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
      episode_checkpoints [T+1] float32 and episode_laps [T+1] float32: for a race (Mario Kart),
        the checkpoints passed (net of those driven back) and laps completed in that episode; NaN
        where none ended or the env is not a race.
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
        "episode_checkpoints": ((steps,), torch.float32),
        "episode_laps": ((steps,), torch.float32),
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


class SharedWeights:
    """The latest policy weights in shared memory, with a version (the learner step that made them).

    The learner publishes after its updates; actors copy in when the version moves. A sequence
    counter, odd while the learner writes, stands in for a lock: a reader that saw it move copies
    again, and an actor killed mid-copy cannot leave anything held that would block the learner.
    """

    def __init__(self, state: Mapping[str, torch.Tensor], context) -> None:
        self.tensors = {
            name: tensor.detach().to("cpu", copy=True).share_memory_() for name, tensor in state.items()
        }
        self.version = context.Value("q", 0, lock=False)
        self.sequence = context.Value("q", 0, lock=False)

    def publish(self, state: Mapping[str, torch.Tensor], version: int) -> None:
        with torch.no_grad():
            self.sequence.value += 1
            for name, tensor in state.items():
                self.tensors[name].copy_(tensor.detach())
            self.version.value = version
            self.sequence.value += 1

    def copy_into(self, state: Mapping[str, torch.Tensor]) -> int:
        """Copy the published weights into ``state`` (tensors aliasing a module's); return their version."""
        with torch.no_grad():
            while True:
                before = self.sequence.value
                if before % 2:
                    time.sleep(0.0005)
                    continue
                for name, tensor in state.items():
                    tensor.copy_(self.tensors[name])
                version = self.version.value
                if self.sequence.value == before:
                    return version
