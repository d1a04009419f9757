"""The actor process: steps its environments with a CPU copy of the scripted policy and fills
rollout slots in shared memory; queues carry slot indices only."""

import io
import os
import queue
import traceback
from dataclasses import dataclass

import numpy as np
import torch

from kart_lightning.data.rollout import SharedWeights
from kart_lightning.envs import EnvConfig, make_env

QUEUE_POLL_S = 1.0


@dataclass
class ActorSpec:
    """Everything an actor process needs, picklable for the spawn start method."""

    index: int
    env: EnvConfig
    num_envs: int
    seed: int
    unroll_length: int
    policy_bytes: bytes
    parent_pid: int


class ParentGone(Exception):
    """The learner process died; the actor has nobody to work for."""


def _get_slot(free_slots, parent_pid: int) -> int:
    while True:
        try:
            return free_slots.get(timeout=QUEUE_POLL_S)
        except queue.Empty:
            if os.getppid() != parent_pid:
                raise ParentGone from None


def act(
    spec: ActorSpec,
    buffers: dict[str, torch.Tensor],
    weights: SharedWeights,
    free_slots,
    full_slots,
    errors,
) -> None:
    """Entry point of an actor process: run until the parent goes away or the process is stopped."""
    torch.set_num_threads(1)
    try:
        _run(spec, buffers, weights, free_slots, full_slots)
    except (KeyboardInterrupt, ParentGone):
        pass
    except Exception:
        errors.put((spec.index, traceback.format_exc()))
        raise


def _run(spec: ActorSpec, buffers, weights: SharedWeights, free_slots, full_slots) -> None:
    policy = torch.jit.load(io.BytesIO(spec.policy_bytes))
    policy.eval()
    policy_state = policy.state_dict(keep_vars=True)
    version = weights.copy_into(policy_state)

    envs = [make_env(spec.env, seed=spec.seed + k) for k in range(spec.num_envs)]
    K = spec.num_envs
    obs = torch.from_numpy(np.stack([env.reset(seed=spec.seed + k)[0] for k, env in enumerate(envs)]))
    reward = torch.zeros(K)
    done = torch.ones(K, dtype=torch.bool)
    truncation_value = torch.zeros(K)
    prev_action = torch.zeros(K, dtype=torch.int64)
    episode_return = torch.full((K,), float("nan"))
    episode_length = torch.full((K,), float("nan"))
    core_state = policy.initial_state(K)

    with torch.no_grad():
        state_before = core_state
        action, logits, _, core_state = policy.act(obs, prev_action, reward, done, core_state, False)

        while True:
            slots = torch.tensor([_get_slot(free_slots, spec.parent_pid) for _ in range(K)])
            if weights.version.value != version:
                version = weights.copy_into(policy_state)
            buffers["core_h"][slots] = state_before[0].transpose(0, 1)
            buffers["core_c"][slots] = state_before[1].transpose(0, 1)
            buffers["policy_version"][slots] = version

            for t in range(spec.unroll_length + 1):
                if t > 0:
                    prev_action = action
                    obs, reward, done, truncation_value, episode_return, episode_length = _step(
                        envs, action, policy, core_state
                    )
                    state_before = core_state
                    action, logits, _, core_state = policy.act(
                        obs, prev_action, reward, done, core_state, False
                    )
                _write_row(buffers, slots, t, {
                    "obs": obs,
                    "reward": reward,
                    "done": done,
                    "truncation_value": truncation_value,
                    "prev_action": prev_action,
                    "episode_return": episode_return,
                    "episode_length": episode_length,
                    "action": action,
                    "behaviour_logits": logits,
                })
            for slot in slots.tolist():
                full_slots.put(slot)


def _write_row(buffers, slots: torch.Tensor, t: int, row: dict[str, torch.Tensor]) -> None:
    for name, value in row.items():
        buffers[name][slots, t] = value


def _step(envs: list, action: torch.Tensor, policy, core_state):
    """Step every env once; reset the ones whose episode ended. Returns the arrival fields, [K] each."""
    K = len(envs)
    observations, rewards = [], torch.zeros(K)
    done = torch.zeros(K, dtype=torch.bool)
    truncation_value = torch.zeros(K)
    episode_return = torch.full((K,), float("nan"))
    episode_length = torch.full((K,), float("nan"))
    truncated_obs, truncated_index = [], []
    for k, env in enumerate(envs):
        observation, reward, terminated, truncated, info = env.step(int(action[k]))
        rewards[k] = float(reward)
        if "episode" in info:
            episode_return[k] = float(info["episode"]["r"])
            episode_length[k] = float(info["episode"]["l"])
        if terminated or truncated:
            done[k] = True
            if truncated and not terminated:
                truncated_obs.append(observation)
                truncated_index.append(k)
            observation, _ = env.reset()
        observations.append(observation)
    if truncated_index:
        index = torch.tensor(truncated_index)
        state = (core_state[0][:, index], core_state[1][:, index])
        _, _, value, _ = policy.act(
            torch.from_numpy(np.stack(truncated_obs)), action[index], rewards[index],
            torch.zeros(len(index), dtype=torch.bool), state, False,
        )
        truncation_value[index] = value
    return (
        torch.from_numpy(np.stack(observations)), rewards, done, truncation_value,
        episode_return, episode_length,
    )
