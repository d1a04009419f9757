"""A pool of actor processes around shared rollout slots: start, hand out full slots, restart
actors that die, stop. Every child is gone after `close()`, after the learner dies, and at exit."""

import atexit
import dataclasses
import logging
import os
import queue
import time

import numpy as np
import torch
import torch.multiprocessing as mp

from kart_lightning.data.actor import ActorCounters, ActorSpec, LearnerLink, run_actor
from kart_lightning.data.exploration import NO_EXPLORATION, ExplorationConfig
from kart_lightning.data.inference import InferenceServer
from kart_lightning.data.rollout import create_buffers, rollout_spec, stack_slots
from kart_lightning.data.slots import FILLING, FULL, SlotBoard, default_slots_per_env
from kart_lightning.data.weights import SharedWeights
from kart_lightning.envs import EnvConfig
from kart_lightning.models import script_bytes
from kart_lightning.processes import stop_processes

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 5.0
LEARNER_POLL_S = 0.0005
HEALTH_CHECK_S = 0.5


class ActorFailed(RuntimeError):
    """Actors keep dying before they finish an unroll; carries the last traceback."""


def action_seed(seed: int, actor: int, restarts: int) -> int:
    """The torch seed of an actor process: a hash of (run seed, actor index, its restart count)."""
    return int(np.random.SeedSequence([seed, actor, restarts]).generate_state(1)[0])


class ActorPool:
    """N actor processes, K envs each, writing [T+1]-step slots that the learner takes B at a time.

    An actor that dies is restarted and its half-written slots recycled; one that dies
    `max_actor_failures` times in a row without finishing an unroll stops the run (ActorFailed).
    """

    def __init__(
        self,
        policy: torch.jit.ScriptModule,
        env: EnvConfig,
        obs_shape: list[int],
        obs_dtype: torch.dtype,
        num_actions: int,
        num_actors: int,
        envs_per_actor: int,
        unroll_length: int,
        batch_size: int,
        seed: int,
        start_method: str,
        first_actor: int = 0,
        slots_per_env: int | None = None,
        actor_threads: int = 1,
        max_actor_failures: int = 3,
        inference: str = "actor",
        device: torch.device | None = None,
        inference_batch_envs: int | None = None,
        inference_timeout_s: float = 0.001,
        extra_stats: tuple[str, ...] = (),
        exploration: ExplorationConfig = NO_EXPLORATION,
    ) -> None:
        self.batch_size = batch_size
        self.unroll_length = unroll_length
        self.max_actor_failures = max_actor_failures
        slots_per_env = slots_per_env or default_slots_per_env(num_actors * envs_per_actor, batch_size)
        self.board = SlotBoard(num_actors, slots_per_env * envs_per_actor)
        core_state_size = policy.initial_state(1)[0].shape[-1]
        spec = rollout_spec(obs_shape, obs_dtype, num_actions, unroll_length, core_state_size, extra_stats)
        self.buffers = create_buffers(spec, self.board.num_slots)
        self.counters = ActorCounters.create(num_actors)

        self.context = mp.get_context(start_method)
        self.errors = self.context.Queue()
        self.weights: SharedWeights | None = None
        self.server: InferenceServer | None = None
        policy_bytes = None
        if inference == "learner":
            self.server = InferenceServer(
                policy, device or torch.device("cpu"), num_actors, envs_per_actor, obs_shape, obs_dtype,
                num_actions, inference_batch_envs, inference_timeout_s,
            )
        else:
            self.weights = SharedWeights(policy.state_dict(), self.context)
            policy_bytes = script_bytes(policy)
        self.seed = seed
        # Seeds go by the actor's number in the whole job (several ranks each start a pool).
        self.first_actor = first_actor
        self.specs = [
            ActorSpec(
                index=index, job_index=first_actor + index, env=env, num_envs=envs_per_actor,
                seed=seed + 10_000 * (first_actor + index), action_seed=action_seed(seed, first_actor + index, 0),
                unroll_length=unroll_length,
                parent_pid=os.getpid(), torch_threads=actor_threads, extra_stats=tuple(extra_stats),
                policy_bytes=policy_bytes, exploration=exploration,
            )
            for index in range(num_actors)
        ]
        self.actor_restarts = [0] * num_actors
        self.failures = [0] * num_actors
        self.unrolls_at_start = [0] * num_actors
        self.last_errors: dict[int, str] = {}
        self.processes: list = [None] * num_actors
        self.closed = False
        for index in range(num_actors):
            self._start(index)
        if self.server is not None:
            self.server.start()
        self.next_health_check = time.monotonic() + HEALTH_CHECK_S
        atexit.register(self.close)

    def _start(self, index: int) -> None:
        link = None
        if self.server is not None:
            link = LearnerLink(
                self.server.connect(index, self.context), self.server.requests, self.server.responses
            )
        process = self.context.Process(
            target=run_actor,
            args=(self.specs[index], self.buffers, self.weights, link, self.board, self.counters, self.errors),
            name=f"kart-actor-{index}",
            daemon=True,
        )
        process.start()
        if link is not None:
            link.connection.close()  # the child holds its own copy of this end
        self.processes[index] = process
        self.unrolls_at_start[index] = int(self.counters.unrolls[index])

    def publish(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Make new policy weights available to the actors (or to the inference server)."""
        if self.server is not None:
            self.server.publish(state, version)
        else:
            self.weights.publish(state, version)

    @property
    def version(self) -> int:
        """Version of the newest published weights."""
        return self.server.version if self.server is not None else self.weights.version.value

    def take_batch_slots(self, timeout_s: float) -> list[int]:
        """Block until B full slots are ready (oldest first), restarting actors that died."""
        deadline = time.monotonic() + timeout_s
        while True:
            if time.monotonic() > self.next_health_check:
                self.restart_dead_actors()
                self.next_health_check = time.monotonic() + HEALTH_CHECK_S
            slots = self.board.take_oldest_full(self.batch_size)
            if slots is not None:
                return slots
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no batch arrived from the actors in {timeout_s:.0f} s; "
                    "raise data.rollout_timeout_s if the environment is very slow."
                )
            time.sleep(LEARNER_POLL_S)

    @property
    def restarts(self) -> int:
        """Actor restarts so far, all actors together."""
        return sum(self.actor_restarts)

    def release(self, slots: list[int]) -> None:
        self.board.release(slots)

    def take_batch(self, timeout_s: float, out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The next learner batch, [T+1, B, ...] per field (see stack_slots; written into `out` if
        given): B full slots, copied out and handed back to the actors."""
        slots = self.take_batch_slots(timeout_s)
        try:
            return stack_slots(self.buffers, slots, out=out)
        finally:
            self.release(slots)

    def restart_dead_actors(self) -> None:
        """Restart every actor process that has exited, recycling its half-written slots."""
        if self.server is not None and self.server.error is not None:
            raise RuntimeError("the inference server thread failed") from self.server.error
        self._collect_errors()
        for index, process in enumerate(self.processes):
            if process.is_alive():
                continue
            process.join()
            finished_unrolls = int(self.counters.unrolls[index]) > self.unrolls_at_start[index]
            self.failures[index] = 0 if finished_unrolls else self.failures[index] + 1
            if self.failures[index] >= self.max_actor_failures:
                raise ActorFailed(
                    f"actor {index} died {self.failures[index]} time{'s' if self.failures[index] > 1 else ''} in a row "
                    f"before finishing an unroll (exit code {process.exitcode}); last error:\n"
                    f"{self.last_errors.get(index, 'none reported (killed by a signal?)')}"
                )
            recycled = self.board.recycle(index)
            self.actor_restarts[index] += 1
            self.specs[index] = dataclasses.replace(
                self.specs[index],
                action_seed=action_seed(self.seed, self.first_actor + index, self.actor_restarts[index]),
            )
            log.warning(
                "actor %d exited with code %s; restarting it (%d restarts so far, %d slots recycled)",
                index, process.exitcode, self.restarts, recycled,
            )
            self._start(index)

    def _collect_errors(self) -> None:
        while True:
            try:
                index, trace = self.errors.get_nowait()
            except queue.Empty:
                return
            self.last_errors[index] = trace

    def stats(self) -> dict[str, float]:
        """Numbers worth logging: slots by state, actor restarts, env rebuilds."""
        stats = {
            "pool/full_slots": float(self.board.count(FULL)),
            "pool/filling_slots": float(self.board.count(FILLING)),
            "pool/actor_restarts": float(self.restarts),
            "pool/env_rebuilds": float(self.counters.env_rebuilds.sum()),
        }
        if self.server is not None:
            stats["inference/batch_envs"] = self.server.mean_batch_envs()
        return stats

    def close(self) -> None:
        """Stop every actor process; safe to call more than once."""
        if self.closed:
            return
        self.closed = True
        stop_processes(self.processes, JOIN_TIMEOUT_S)
        if self.server is not None:
            self.server.stop()
        self.errors.cancel_join_thread()
        self.errors.close()
        atexit.unregister(self.close)
