"""Where actors get their actions: a CPU copy of the policy inside the actor, or the learner's
inference server, which batches the requests of all actors on the learner's device (GA3C)."""

import queue
import threading
import time
from multiprocessing.connection import Connection, wait

import torch

from kart_lightning.data.rollout import create_buffers
from kart_lightning.data.slots import ParentGone
from kart_lightning.data.weights import SharedWeights
from kart_lightning.models import load_script, script_bytes
from kart_lightning.processes import parent_alive

PARENT_CHECK_S = 1.0
SERVER_WAIT_S = 0.05


def request_spec(obs_shape, obs_dtype: torch.dtype) -> dict:
    """Inputs of one policy step per env row, [R, ...]; value_* rows carry the last observation of
    episodes cut by a time limit, whose value bootstraps them."""
    return {
        "obs": ((*obs_shape,), obs_dtype),
        "prev_action": ((), torch.int64),
        "reward": ((), torch.float32),
        "done": ((), torch.bool),
        "value_obs": ((*obs_shape,), obs_dtype),
        "value_prev_action": ((), torch.int64),
        "value_reward": ((), torch.float32),
    }


def response_spec(num_actions: int, core_state_size: int) -> dict:
    """Outputs per env row, [R, ...]: the action, its logits, the core state the step started
    from, the version of the weights that chose it, and a bootstrap value."""
    return {
        "action": ((), torch.int64),
        "logits": ((num_actions,), torch.float32),
        "core_h": ((1, core_state_size), torch.float32),
        "core_c": ((1, core_state_size), torch.float32),
        "version": ((), torch.int64),
        "value": ((), torch.float32),
    }


class LocalInference:
    """Actor-side inference: a CPU copy of the scripted policy, refreshed from shared weights at
    unroll boundaries. Steps are computed at `submit`; `result` hands them over."""

    def __init__(self, policy_bytes: bytes, weights: SharedWeights, num_envs: int) -> None:
        self.policy = load_script(policy_bytes)
        self.weights = weights
        self.policy_state = self.policy.state_dict(keep_vars=True)
        self.version = weights.copy_into(self.policy_state)
        self.core_state = self.policy.initial_state(num_envs)
        self.pending: dict[int, tuple] = {}

    def refresh(self) -> None:
        if self.weights.version.value != self.version:
            self.version = self.weights.copy_into(self.policy_state)

    def submit(self, group: int, rows: slice, obs, prev_action, reward, done) -> None:
        # Copies: the rows are overwritten below, and this is the slot's starting state.
        state = (self.core_state[0][:, rows].clone(), self.core_state[1][:, rows].clone())
        action, logits, _, (h, c) = self.policy.act(obs, prev_action, reward, done, state, False)
        self.core_state[0][:, rows] = h
        self.core_state[1][:, rows] = c
        self.pending[group] = (action, logits, state, self.version)

    def result(self, group: int) -> tuple:
        """(action [n], logits [n, A], core state before the step ([1, n, H], [1, n, H]), version)."""
        return self.pending.pop(group)

    def values(self, group: int, rows: torch.Tensor, obs, prev_action, reward) -> torch.Tensor:
        """V of `obs` [m, ...] for env rows `rows` [m], from their current core state; no update."""
        state = (self.core_state[0][:, rows], self.core_state[1][:, rows])
        done = torch.zeros(len(rows), dtype=torch.bool)
        return self.policy.act(obs, prev_action, reward, done, state, False)[2]


class RemoteInference:
    """Actor side of learner inference: write a request into shared memory, send its group index
    through this actor's pipe, wait for the answer to come back the same way."""

    def __init__(self, connection: Connection, requests: dict, responses: dict, parent_pid: int) -> None:
        self.connection = connection
        self.requests = requests
        self.responses = responses
        self.parent_pid = parent_pid
        self.answered: set = set()
        self.rows: dict[int, slice] = {}

    def refresh(self) -> None:
        """The server holds the weights."""

    def submit(self, group: int, rows: slice, obs, prev_action, reward, done) -> None:
        self.rows[group] = rows
        self.requests["obs"][rows] = obs
        self.requests["prev_action"][rows] = prev_action
        self.requests["reward"][rows] = reward
        self.requests["done"][rows] = done
        self.connection.send(("act", group, rows.start, rows.stop))

    def _wait_for(self, answer: tuple) -> None:
        while answer not in self.answered:
            if self.connection.poll(PARENT_CHECK_S):
                try:
                    self.answered.add(self.connection.recv())
                except (EOFError, OSError):
                    raise ParentGone from None
            elif not parent_alive(self.parent_pid):
                raise ParentGone
        self.answered.remove(answer)

    def result(self, group: int) -> tuple:
        self._wait_for(("act", group))
        rows, answer = self.rows[group], self.responses
        state = (answer["core_h"][rows].transpose(0, 1).clone(), answer["core_c"][rows].transpose(0, 1).clone())
        return answer["action"][rows].clone(), answer["logits"][rows].clone(), state, int(answer["version"][rows.start])

    def values(self, group: int, rows: torch.Tensor, obs, prev_action, reward) -> torch.Tensor:
        self.requests["value_obs"][rows] = obs
        self.requests["value_prev_action"][rows] = prev_action
        self.requests["value_reward"][rows] = reward
        self.connection.send(("value", group, rows.tolist()))
        self._wait_for(("value", group))
        return self.responses["value"][rows].clone()


class InferenceServer:
    """Learner side of learner inference: a thread waits on every actor's pipe, gathers the
    pending requests into one dynamic batch (up to `max_batch_envs` env rows, or whatever arrived
    within `batch_timeout_s`), runs the scripted policy on `device` and answers each actor.

    It keeps every env's core state on the device and its own copy of the weights, replaced by
    `publish` between batches, so inference never reads weights the optimizer is writing.
    """

    def __init__(
        self,
        policy: torch.jit.ScriptModule,
        device: torch.device,
        num_actors: int,
        envs_per_actor: int,
        obs_shape,
        obs_dtype: torch.dtype,
        num_actions: int,
        max_batch_envs: int | None,
        batch_timeout_s: float,
    ) -> None:
        self.policy = load_script(script_bytes(policy), device)
        self.device = device
        self.envs_per_actor = envs_per_actor
        num_rows = num_actors * envs_per_actor
        core_state_size = policy.initial_state(1)[0].shape[-1]
        # One row per env of every actor: [R, ...] in shared memory.
        self.requests = create_buffers(request_spec(obs_shape, obs_dtype), num_rows)
        self.responses = create_buffers(response_spec(num_actions, core_state_size), num_rows)
        self.core_state = self.policy.initial_state(num_rows)
        self.max_batch_envs = max_batch_envs or num_rows
        self.batch_timeout_s = batch_timeout_s
        self.version = 0
        self.weights_lock = threading.Lock()
        self.connections: list[Connection | None] = [None] * num_actors
        self.new_connections: queue.SimpleQueue = queue.SimpleQueue()
        self.batches = 0
        self.batched_rows = 0
        self.error: BaseException | None = None
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, name="kart-inference", daemon=True)

    def connect(self, actor: int, context) -> Connection:
        """A fresh pipe for (a restarted) `actor`, whose envs start from a zero core state."""
        server_end, actor_end = context.Pipe(duplex=True)
        self.new_connections.put((actor, server_end))
        return actor_end

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        if self.thread.is_alive():
            self.thread.join()
        for connection in self.connections:
            if connection is not None:
                connection.close()

    def publish(self, state: dict[str, torch.Tensor], version: int) -> None:
        with self.weights_lock, torch.no_grad():
            for name, tensor in self.policy.state_dict().items():
                tensor.copy_(state[name])
            self.version = version

    def mean_batch_envs(self) -> float:
        return self.batched_rows / max(self.batches, 1)

    def _serve(self) -> None:
        try:
            with torch.no_grad():
                while not self.stopping.is_set():
                    self._serve_one_batch()
        except BaseException as error:  # the learner reports it instead of waiting forever
            self.error = error
            raise

    def _serve_one_batch(self) -> None:
        self._adopt_new_connections()
        ready = wait(self._live(), timeout=SERVER_WAIT_S)
        if not ready:
            return
        requests = self._receive(ready)
        deadline = time.monotonic() + self.batch_timeout_s
        while self._rows(requests) < self.max_batch_envs and time.monotonic() < deadline:
            asked = {connection for connection, _ in requests}
            waiting = [c for c in self._live() if c not in asked]
            more = wait(waiting, timeout=max(0.0, deadline - time.monotonic())) if waiting else []
            if not more:
                break
            requests += self._receive(more)
        self._answer(requests)

    def _live(self) -> list:
        return [c for c in self.connections if c is not None]

    def _adopt_new_connections(self) -> None:
        while True:
            try:
                actor, connection = self.new_connections.get_nowait()
            except queue.Empty:
                return
            if self.connections[actor] is not None:
                self.connections[actor].close()
            self.connections[actor] = connection
            rows = slice(actor * self.envs_per_actor, (actor + 1) * self.envs_per_actor)
            self.core_state[0][:, rows] = 0
            self.core_state[1][:, rows] = 0

    def _receive(self, ready: list) -> list:
        """Every message waiting on the ready pipes, as (connection, message)."""
        requests = []
        for connection in ready:
            try:
                while connection.poll():
                    requests.append((connection, connection.recv()))
            except (EOFError, OSError):
                # The actor died; the pool restarts it with a new pipe.
                self.connections = [None if c is connection else c for c in self.connections]
                connection.close()
                requests = [(c, m) for c, m in requests if c is not connection]
        return requests

    @staticmethod
    def _rows(requests: list) -> int:
        return sum(message[3] - message[2] for _, message in requests if message[0] == "act")

    def _answer(self, requests: list) -> None:
        acts = [(c, m) for c, m in requests if m[0] == "act"]
        with self.weights_lock:
            if acts:
                rows = torch.cat([torch.arange(m[2], m[3]) for _, m in acts])
                self._act(rows)
            for connection, message in requests:
                if message[0] == "value":
                    self._value(torch.tensor(message[2]))
        for connection, message in requests:
            try:
                connection.send(message[:2])
            except (BrokenPipeError, OSError):
                pass

    def _act(self, rows: torch.Tensor) -> None:
        device_rows = rows.to(self.device)
        inputs = [self.requests[name][rows].to(self.device, non_blocking=True)
                  for name in ("obs", "prev_action", "reward", "done")]
        state = (self.core_state[0][:, device_rows], self.core_state[1][:, device_rows])
        action, logits, _, (h, c) = self.policy.act(*inputs, state, False)
        self.core_state[0][:, device_rows] = h
        self.core_state[1][:, device_rows] = c
        self.responses["action"][rows] = action.cpu()
        self.responses["logits"][rows] = logits.cpu()
        self.responses["core_h"][rows] = state[0].transpose(0, 1).cpu()
        self.responses["core_c"][rows] = state[1].transpose(0, 1).cpu()
        self.responses["version"][rows] = self.version
        self.batches += 1
        self.batched_rows += len(rows)

    def _value(self, rows: torch.Tensor) -> None:
        device_rows = rows.to(self.device)
        inputs = [self.requests[name][rows].to(self.device)
                  for name in ("value_obs", "value_prev_action", "value_reward")]
        done = torch.zeros(len(rows), dtype=torch.bool, device=self.device)
        state = (self.core_state[0][:, device_rows], self.core_state[1][:, device_rows])
        self.responses["value"][rows] = self.policy.act(*inputs, done, state, False)[2].cpu()

