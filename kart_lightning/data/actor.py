"""The actor process: steps its environments with a CPU copy of the scripted policy and fills
its own rollout slots in shared memory; the slot board says which slots are ready."""

import contextlib
import io
import sys
import traceback
from dataclasses import dataclass

import numpy as np
import torch

from kart_lightning.data.rollout import SharedWeights
from kart_lightning.data.slots import ParentGone, SlotBoard
from kart_lightning.envs import EnvConfig, make_env


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
    torch_threads: int


@dataclass
class ActorCounters:
    """Per-actor counters in shared memory, [num_actors] int64 each, read by the pool."""

    unrolls: torch.Tensor
    env_rebuilds: torch.Tensor

    @classmethod
    def create(cls, num_actors: int) -> "ActorCounters":
        return cls(*(torch.zeros(num_actors, dtype=torch.int64).share_memory_() for _ in range(2)))


def act(
    spec: ActorSpec,
    buffers: dict[str, torch.Tensor],
    weights: SharedWeights,
    board: SlotBoard,
    counters: ActorCounters,
    errors,
) -> None:
    """Entry point of an actor process: run until the parent goes away or the process is stopped."""
    torch.set_num_threads(spec.torch_threads)
    try:
        _run(spec, buffers, weights, board, counters)
    except (KeyboardInterrupt, ParentGone):
        pass
    except Exception:
        errors.put((spec.index, traceback.format_exc()))
        raise


def _run(spec: ActorSpec, buffers, weights: SharedWeights, board: SlotBoard, counters: ActorCounters) -> None:
    policy = torch.jit.load(io.BytesIO(spec.policy_bytes), map_location="cpu")
    policy.eval()
    policy_state = policy.state_dict(keep_vars=True)
    version = weights.copy_into(policy_state)

    envs = [make_env(spec.env, seed=spec.seed + k) for k in range(spec.num_envs)]
    rebuild = EnvRebuilder(spec, envs, counters)
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
            slots = board.acquire(spec.index, K, spec.parent_pid)
            if weights.version.value != version:
                version = weights.copy_into(policy_state)
            buffers["core_h"][slots] = state_before[0].transpose(0, 1)
            buffers["core_c"][slots] = state_before[1].transpose(0, 1)
            buffers["policy_version"][slots] = version

            for t in range(spec.unroll_length + 1):
                if t > 0:
                    prev_action = action
                    obs, reward, done, truncation_value, episode_return, episode_length = _step(
                        envs, action, policy, core_state, rebuild
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
            board.mark_full(slots)
            counters.unrolls[spec.index] += 1


def _write_row(buffers, slots: torch.Tensor, t: int, row: dict[str, torch.Tensor]) -> None:
    for name, value in row.items():
        buffers[name][slots, t] = value


class EnvRebuilder:
    """Replaces an env that raised with a fresh one, counted, so one bad episode does not kill
    the actor (an env that cannot even be built still does: the pool restarts the actor)."""

    def __init__(self, spec: ActorSpec, envs: list, counters: ActorCounters) -> None:
        self.spec, self.envs, self.counters = spec, envs, counters

    def __call__(self, k: int, error: Exception):
        rebuilds = int(self.counters.env_rebuilds[self.spec.index]) + 1
        self.counters.env_rebuilds[self.spec.index] = rebuilds
        print(
            f"kart_lightning: actor {self.spec.index} env {k} raised {type(error).__name__}: {error}; "
            "rebuilding it", file=sys.stderr, flush=True,
        )
        # A broken env may fail to close too; it is dropped either way.
        with contextlib.suppress(Exception):
            self.envs[k].close()
        # A new seed, so a deterministic failure is not replayed step for step.
        self.envs[k] = make_env(self.spec.env, seed=self.spec.seed + k + 1000 * rebuilds)
        observation, _ = self.envs[k].reset()
        return observation


def _step(envs: list, action: torch.Tensor, policy, core_state, rebuild: EnvRebuilder):
    """Step every env once; reset the ones whose episode ended. Returns the arrival fields, [K] each."""
    K = len(envs)
    observations, rewards = [], torch.zeros(K)
    done = torch.zeros(K, dtype=torch.bool)
    truncation_value = torch.zeros(K)
    episode_return = torch.full((K,), float("nan"))
    episode_length = torch.full((K,), float("nan"))
    truncated_obs, truncated_index = [], []
    for k, env in enumerate(envs):
        try:
            observation, reward, terminated, truncated, info = env.step(int(action[k]))
            if terminated or truncated:
                last_observation = observation
                observation, _ = env.reset()
        except Exception as error:  # noqa: BLE001 - any env failure: rebuild it and start a new episode
            observations.append(rebuild(k, error))
            done[k] = True
            continue
        rewards[k] = float(reward)
        if "episode" in info:
            episode_return[k] = float(info["episode"]["r"])
            episode_length[k] = float(info["episode"]["l"])
        if terminated or truncated:
            done[k] = True
            if truncated and not terminated:
                truncated_obs.append(last_observation)
                truncated_index.append(k)
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
