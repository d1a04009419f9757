"""The actor process: steps its environments, gets actions from the policy (its own CPU copy or
the learner's inference server) and fills its own rollout slots in shared memory."""

import contextlib
import sys
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection

import numpy as np
import torch

from kart_lightning.data.exploration import NO_EXPLORATION, ExplorationConfig, HeldActions
from kart_lightning.data.inference import LocalInference, RemoteInference
from kart_lightning.data.slots import ParentGone, SlotBoard
from kart_lightning.data.weights import SharedWeights
from kart_lightning.envs import EnvConfig, make_env
from kart_lightning.processes import die_with_parent


@dataclass
class ActorSpec:
    """Everything an actor process needs, picklable for the spawn start method."""

    index: int
    """This actor's number in its pool."""
    job_index: int
    """Its number among the actors of all ranks (rank r's pool starts at r * num_actors)."""
    env: EnvConfig
    num_envs: int
    seed: int
    """Env k of this actor is seeded seed + k."""
    action_seed: int
    """Seeds this process's torch generator, which samples the actions: distinct per run seed,
    actor and restart, so no two actors (nor an actor and its restart) replay one random stream."""
    unroll_length: int
    parent_pid: int
    torch_threads: int
    extra_stats: tuple[str, ...]
    """The env family's episode extra stats, written as `episode_KEY` rows (see rollout_spec)."""
    # Actor inference: the scripted policy (script_bytes). Learner inference: None.
    policy_bytes: bytes | None
    exploration: ExplorationConfig = NO_EXPLORATION
    """εz-greedy holds on top of the policy's actions (off by default)."""

    def env_index(self, k: int) -> int:
        """Env k's number among all envs of the job: it picks the env's first track."""
        return self.job_index * self.num_envs + k


@dataclass
class ActorCounters:
    """Per-actor counters in shared memory, [num_actors] int64 each, read by the pool."""

    unrolls: torch.Tensor
    env_rebuilds: torch.Tensor

    @classmethod
    def create(cls, num_actors: int) -> "ActorCounters":
        return cls(*(torch.zeros(num_actors, dtype=torch.int64).share_memory_() for _ in range(2)))


@dataclass
class LearnerLink:
    """The actor's end of learner inference: its pipe and the server's request/response rows."""

    connection: Connection
    requests: dict[str, torch.Tensor]
    responses: dict[str, torch.Tensor]


def run_actor(
    spec: ActorSpec,
    buffers: dict[str, torch.Tensor],
    weights: SharedWeights | None,
    link: LearnerLink | None,
    board: SlotBoard,
    counters: ActorCounters,
    errors,
) -> None:
    """Entry point of an actor process: run until the parent goes away or the process is stopped."""
    die_with_parent(spec.parent_pid)
    torch.set_num_threads(spec.torch_threads)
    torch.manual_seed(spec.action_seed)
    try:
        if link is None:
            inference = LocalInference(spec.policy_bytes, weights, spec.num_envs)
            num_groups = 1
        else:
            inference = RemoteInference(link.connection, link.requests, link.responses, spec.parent_pid)
            # Two halves: one steps its envs while the server computes the other's actions.
            num_groups = min(2, spec.num_envs)
        _run(spec, buffers, inference, num_groups, board, counters)
    except (KeyboardInterrupt, ParentGone):
        pass
    except Exception:
        errors.put((spec.index, traceback.format_exc()))
        raise


def _run(spec: ActorSpec, buffers, inference, num_groups: int, board: SlotBoard, counters: ActorCounters) -> None:
    # The global env index picks the first track when the config lists several.
    envs = [
        make_env(spec.env, seed=spec.seed + k, env_index=spec.env_index(k))
        for k in range(spec.num_envs)
    ]
    rebuild = EnvRebuilder(spec, envs, counters)
    bounds = np.linspace(0, spec.num_envs, num_groups + 1).astype(int)
    groups = [
        EnvGroup(g, slice(int(bounds[g]), int(bounds[g + 1])), spec, envs, rebuild)
        for g in range(num_groups)
    ]
    # Learner inference addresses the server's rows: this actor's envs start at index * K.
    row_offset = 0 if isinstance(inference, LocalInference) else spec.index * spec.num_envs
    with torch.no_grad():
        for group in groups:
            inference.submit(group.index, group.rows(row_offset), *group.inputs())
        while True:
            for group in groups:
                action, logits, state_before, version = inference.result(group.index)
                action, logits = group.explore(action, logits, group.done)
                if group.record(buffers, action, logits, state_before, version, board, spec):
                    counters.unrolls[spec.index] += 1
                    inference.refresh()
                group.step(action, inference, row_offset)
                inference.submit(group.index, group.rows(row_offset), *group.inputs())


class EnvGroup:
    """Envs of one actor stepped together, each filling one slot per unroll.

    It holds the arrival fields of its envs' current step ([n] each) and its row t in the slots.
    """

    def __init__(self, index: int, envs: slice, spec: ActorSpec, all_envs: list, rebuild) -> None:
        self.index, self.envs, self.all_envs, self.rebuild = index, envs, all_envs, rebuild
        n = envs.stop - envs.start
        self.obs = torch.from_numpy(
            np.stack([all_envs[k].reset(seed=spec.seed + k)[0] for k in range(envs.start, envs.stop)])
        )
        self.reward = torch.zeros(n)
        self.done = torch.ones(n, dtype=torch.bool)
        self.truncation_value = torch.zeros(n)
        self.prev_action = torch.zeros(n, dtype=torch.int64)
        self.stat_names = ("return", "length", *spec.extra_stats)
        self.explore = HeldActions(spec.exploration, n)
        self.episode_stats = self._no_episode_ended(n)
        self.slots: torch.Tensor | None = None
        self.t = 0

    def rows(self, offset: int) -> slice:
        return slice(offset + self.envs.start, offset + self.envs.stop)

    def inputs(self) -> tuple:
        return self.obs, self.prev_action, self.reward, self.done

    def record(self, buffers, action, logits, state_before, version: int, board: SlotBoard, spec) -> bool:
        """Write row t; after row T, hand the slots over and start the next unroll with the same
        step as its row 0. Returns whether an unroll was completed."""
        completed = False
        if self.slots is None:
            self._begin(buffers, state_before, version, board, spec)
        self._write_row(buffers, action, logits)
        if self.t == spec.unroll_length:
            board.mark_full(self.slots)
            completed = True
            self._begin(buffers, state_before, version, board, spec)
            self._write_row(buffers, action, logits)
        self.t += 1
        return completed

    def _begin(self, buffers, state_before, version: int, board: SlotBoard, spec) -> None:
        self.slots = board.acquire(spec.index, self.envs.stop - self.envs.start, spec.parent_pid)
        buffers["core_h"][self.slots] = state_before[0].transpose(0, 1)
        buffers["core_c"][self.slots] = state_before[1].transpose(0, 1)
        buffers["policy_version"][self.slots] = version
        self.t = 0

    def _write_row(self, buffers, action, logits) -> None:
        row = {
            "obs": self.obs, "reward": self.reward, "done": self.done,
            "truncation_value": self.truncation_value, "prev_action": self.prev_action,
            "action": action, "behaviour_logits": logits, **self.episode_stats,
        }
        for name, value in row.items():
            buffers[name][self.slots, self.t] = value

    def _no_episode_ended(self, n: int) -> dict[str, torch.Tensor]:
        """`episode_KEY` [n] rows of NaN: no episode ended on arriving at this step."""
        return {f"episode_{name}": torch.full((n,), float("nan")) for name in self.stat_names}

    def step(self, action: torch.Tensor, inference, row_offset: int) -> None:
        """Step each env once with `action` [n]; reset those whose episode ended.

        An episode cut short (a time limit, or the env raising: it is rebuilt) is a truncation:
        its arrival row carries the value of the observation to bootstrap from, the last one for a
        time limit and the last good one (acted on, reward 0) for a crash, and a crashed episode
        reports no statistics, as it did not finish."""
        n = len(action)
        observations, rewards = [], torch.zeros(n)
        done = torch.zeros(n, dtype=torch.bool)
        self.truncation_value = torch.zeros(n)
        self.episode_stats = self._no_episode_ended(n)
        # Rows to bootstrap: (row, observation, the action and reward that led to it).
        cut: list[tuple[int, object, torch.Tensor, torch.Tensor]] = []
        for i, k in enumerate(range(self.envs.start, self.envs.stop)):
            try:
                observation, reward, terminated, truncated_now, info = self.all_envs[k].step(int(action[i]))
                if terminated or truncated_now:
                    last_observation = observation
                    observation, _ = self.all_envs[k].reset()
            except Exception as error:  # noqa: BLE001 - any env failure: rebuild it, start a new episode
                cut.append((i, self.obs[i].numpy(), self.prev_action[i], self.reward[i]))
                observations.append(self.rebuild(k, error))
                done[i] = True
                continue
            rewards[i] = float(reward)
            # An episode restarted mid-game (a race from a checkpoint) trains, but its results are not a game's.
            if "episode" in info and not info.get("restart"):
                stats = {"return": info["episode"]["r"], "length": info["episode"]["l"],
                         "state": info.get("state_index"), **info.get("episode_extra_stats", {})}
                for name in self.stat_names:
                    if stats.get(name) is not None:
                        self.episode_stats[f"episode_{name}"][i] = float(stats[name])
            if terminated or truncated_now:
                done[i] = True
                if truncated_now and not terminated:
                    cut.append((i, last_observation, action[i], rewards[i]))
            observations.append(observation)
        if cut:
            rows, cut_obs, cut_actions, cut_rewards = zip(*cut, strict=True)
            index = torch.tensor(rows)
            self.truncation_value[index] = inference.values(
                self.index, index + row_offset + self.envs.start,
                torch.from_numpy(np.stack(cut_obs)), torch.stack(cut_actions), torch.stack(cut_rewards),
            )
        self.obs = torch.from_numpy(np.stack(observations))
        self.prev_action = action
        self.reward = rewards
        self.done = done


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
        self.envs[k] = make_env(
            self.spec.env, seed=self.spec.seed + k + 1000 * rebuilds,
            env_index=self.spec.env_index(k),
        )
        observation, _ = self.envs[k].reset()
        return observation

