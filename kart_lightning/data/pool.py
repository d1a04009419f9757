"""A pool of actor processes around shared rollout slots: start, hand out full slots, stop.

Every child is gone after `close()`, after the learner dies, and at interpreter exit.
"""

import atexit
import io
import logging
import os
import queue
import time

import torch
import torch.multiprocessing as mp

from kart_lightning.data.actor import ActorSpec, act
from kart_lightning.data.rollout import SharedWeights, create_buffers, rollout_spec
from kart_lightning.envs import EnvConfig

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 5.0


class ActorFailed(RuntimeError):
    """An actor process raised; carries its traceback."""


class ActorPool:
    """N actor processes, K envs each, writing [T+1]-step slots that the learner takes B at a time."""

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
        num_slots: int | None,
        seed: int,
        start_method: str,
    ) -> None:
        self.batch_size = batch_size
        self.unroll_length = unroll_length
        # Enough slots that every actor can hold K while the learner holds B: no deadlock
        # (ImpalaDataModule refuses fewer than num_actors * envs_per_actor + batch_size).
        self.num_slots = num_slots or 2 * num_actors * envs_per_actor + batch_size
        core_state_size = policy.initial_state(1)[0].shape[-1]
        spec = rollout_spec(obs_shape, obs_dtype, num_actions, unroll_length, core_state_size)
        self.buffers = create_buffers(spec, self.num_slots)

        context = mp.get_context(start_method)
        self.weights = SharedWeights(policy.state_dict(), context)
        self.free_slots = context.Queue()
        self.full_slots = context.Queue()
        self.errors = context.Queue()
        for slot in range(self.num_slots):
            self.free_slots.put(slot)

        policy_file = io.BytesIO()
        torch.jit.save(policy, policy_file)
        self.processes = []
        self.closed = False
        for index in range(num_actors):
            actor_spec = ActorSpec(
                index=index,
                env=env,
                num_envs=envs_per_actor,
                seed=seed + 10_000 * index,
                unroll_length=unroll_length,
                policy_bytes=policy_file.getvalue(),
                parent_pid=os.getpid(),
            )
            process = context.Process(
                target=act,
                args=(actor_spec, self.buffers, self.weights, self.free_slots, self.full_slots, self.errors),
                name=f"kart-actor-{index}",
                daemon=True,
            )
            process.start()
            self.processes.append(process)
        atexit.register(self.close)

    def publish(self, state: dict[str, torch.Tensor], version: int) -> None:
        """Make new policy weights available to the actors."""
        self.weights.publish(state, version)

    def take_batch_slots(self, timeout_s: float) -> list[int]:
        """Block until B full slots are ready; raise if an actor died or nothing came in time."""
        slots: list[int] = []
        deadline = time.monotonic() + timeout_s
        while len(slots) < self.batch_size:
            try:
                slots.append(self.full_slots.get(timeout=1.0))
            except queue.Empty:
                self._raise_if_an_actor_failed()
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"no rollout arrived from the actors in {timeout_s:.0f} s; "
                        "raise data.rollout_timeout_s if the environment is very slow."
                    ) from None
        return slots

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self.free_slots.put(slot)

    def _raise_if_an_actor_failed(self) -> None:
        try:
            index, trace = self.errors.get_nowait()
        except queue.Empty:
            dead = [p.name for p in self.processes if not p.is_alive()]
            if dead:
                raise ActorFailed(f"actor processes died without a report: {', '.join(dead)}") from None
            return
        raise ActorFailed(f"actor {index} failed:\n{trace}")

    def close(self) -> None:
        """Stop every actor process; safe to call more than once."""
        if self.closed:
            return
        self.closed = True
        for process in self.processes:
            if process.is_alive():
                process.terminate()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for process in self.processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.kill()
                process.join()
        self.processes = []
        for q in (self.free_slots, self.full_slots, self.errors):
            q.cancel_join_thread()
            q.close()
        atexit.unregister(self.close)
