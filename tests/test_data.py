"""The actor pool and TrajectoryDataset, with real actor processes stepping CartPole-v1."""

import os
import signal
import time

import gymnasium
import psutil
import pytest
import torch
from gymnasium.envs.classic_control import CartPoleEnv
from lightning.pytorch import Trainer

from kart_lightning.data import ActorFailed, ActorPool, ImpalaDataModule, TrajectoryDataset, WeightPublisher
from kart_lightning.data.inference import InferenceServer, RemoteInference
from kart_lightning.data.rollout import create_buffers, empty_batch, rollout_spec, stack_slots
from kart_lightning.data.slots import FREE, SlotBoard
from kart_lightning.data.weights import SharedWeights
from kart_lightning.envs import EnvConfig
from kart_lightning.models import ActorCritic
from kart_lightning.module import ImpalaModule

CARTPOLE = EnvConfig(id="CartPole-v1")


def make_pool(policy, num_actors=1, envs_per_actor=1, unroll_length=5, batch_size=1, env=CARTPOLE,
              start_method="spawn", inference="actor"):
    return ActorPool(
        policy=policy, env=env, obs_shape=[4], obs_dtype=torch.float32, num_actions=2,
        num_actors=num_actors, envs_per_actor=envs_per_actor, unroll_length=unroll_length,
        batch_size=batch_size, seed=0, start_method=start_method, inference=inference,
    )


INFERENCE_MODES = pytest.mark.parametrize("inference", ["actor", "learner"])


def actor_processes():
    """Live spawned children of this process (multiprocessing's resource tracker is not one)."""
    alive = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                alive.append(child)
        except psutil.NoSuchProcess:
            pass
    return alive


@pytest.fixture
def policy():
    torch.manual_seed(0)
    return torch.jit.script(ActorCritic([4], 2, torso="mlp", hidden_size=32, use_lstm=True, lstm_size=16))


def test_stacked_slots_are_time_major_with_batch_second():
    spec = rollout_spec([4, 8, 8], torch.uint8, num_actions=3, unroll_length=5, core_state_size=7)
    buffers = create_buffers(spec, num_slots=4)
    buffers["obs"][2] = 7
    batch = stack_slots(buffers, [2, 0])
    assert batch["obs"].shape == (6, 2, 4, 8, 8)
    assert batch["obs"].dtype == torch.uint8
    assert bool((batch["obs"][:, 0] == 7).all()) and bool((batch["obs"][:, 1] == 0).all())
    assert batch["behaviour_logits"].shape == (6, 2, 3)
    assert batch["core_h"].shape == (1, 2, 7)
    assert batch["policy_version"].shape == (2,)


def test_shared_weights_reach_a_module_and_carry_their_version(policy):
    weights = SharedWeights(policy.state_dict(), torch.multiprocessing.get_context("spawn"))
    other = torch.jit.script(ActorCritic([4], 2, torso="mlp", hidden_size=32, use_lstm=True, lstm_size=16))
    weights.publish(policy.state_dict(), version=3)
    assert weights.copy_into(other.state_dict(keep_vars=True)) == 3
    for name, tensor in other.state_dict().items():
        assert torch.equal(tensor, policy.state_dict()[name])


@pytest.mark.slow
@INFERENCE_MODES
def test_behaviour_logits_are_what_the_policy_gives_on_the_stored_trajectory(policy, inference):
    pool = make_pool(policy, num_actors=2, envs_per_actor=2, unroll_length=6, batch_size=3, inference=inference)
    try:
        batch = pool.take_batch(timeout_s=120)
    finally:
        pool.close()
    with torch.no_grad():
        logits, _, _ = policy(batch["obs"], batch["prev_action"], batch["reward"], batch["done"],
                              (batch["core_h"], batch["core_c"]))
    torch.testing.assert_close(logits, batch["behaviour_logits"])
    assert bool((batch["prev_action"][1:] == batch["action"][:-1]).all())


@pytest.mark.slow
@INFERENCE_MODES
def test_consecutive_unrolls_of_an_env_overlap_by_one_step(policy, inference):
    pool = make_pool(policy, unroll_length=4, batch_size=1, inference=inference)
    try:
        dataset = iter(TrajectoryDataset(pool, env_frames_per_step=1, timeout_s=120))
        first, second = next(dataset), next(dataset)
    finally:
        pool.close()
    for name in ("obs", "reward", "done", "action", "behaviour_logits"):
        torch.testing.assert_close(second[name][0], first[name][-1])
    assert bool(first["done"][0]), "an env's first unroll starts an episode"
    assert first["env_frames"] == 4


@pytest.mark.slow
def test_no_actor_process_survives_close(policy):
    pool = make_pool(policy, num_actors=2)
    pids = [p.pid for p in pool.processes]
    pool.close()
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                   for pid in pids)


class FailingModule(ImpalaModule):
    def training_step(self, batch, batch_idx):
        if batch_idx == 2:
            raise RuntimeError("boom")
        return super().training_step(batch, batch_idx)


@pytest.mark.slow
def test_no_actor_process_survives_an_exception_during_fit(tmp_path):
    data = ImpalaDataModule(env=CARTPOLE, num_actors=2, unroll_length=5, batch_size=2)
    model = FailingModule(obs_shape=data.obs_shape, num_actions=data.num_actions, torso="mlp", hidden_size=16)
    trainer = Trainer(default_root_dir=tmp_path, max_steps=10, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, limit_val_batches=0, callbacks=[WeightPublisher()])
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit(model, datamodule=data)
    assert data.pool is None
    assert actor_processes() == []


class FlakyCartPole(CartPoleEnv):
    """CartPole whose step raises every 50th call: an env that crashes now and then."""

    calls = 0

    def step(self, action):
        FlakyCartPole.calls += 1
        if FlakyCartPole.calls % 50 == 0:
            raise RuntimeError("emulator crashed")
        return super().step(action)


class BrokenCartPole(CartPoleEnv):
    def reset(self, **kwargs):
        raise RuntimeError("this env never starts")


class RestartingCartPole(CartPoleEnv):
    """CartPole whose episodes last 5 steps, then 7 marked as begun mid-game (`info["restart"]`), in turn."""

    def reset(self, **kwargs):
        self.restart, self.t = not getattr(self, "restart", True), 0
        return super().reset(**kwargs)

    def step(self, action):
        obs, reward, _, _, info = super().step(action)  # the pole stands for 7 steps whatever the actions
        self.t += 1
        if self.restart:
            info["restart"] = True
        return obs, reward, self.t == (7 if self.restart else 5), False, info


# Registered here and inherited by forked actors (spawned ones would not see the registry).
gymnasium.register("FlakyCartPole-v0", entry_point=FlakyCartPole, max_episode_steps=500)
gymnasium.register("BrokenCartPole-v0", entry_point=BrokenCartPole)
gymnasium.register("RestartingCartPole-v0", entry_point=RestartingCartPole, max_episode_steps=500)


def test_slot_board_gives_the_learner_the_oldest_full_slots_and_recycles_a_dead_actors():
    board = SlotBoard(num_actors=2, slots_per_actor=3)
    first = board.acquire(actor=1, count=2, parent_pid=os.getppid())
    assert first.tolist() == [3, 4]
    board.mark_full(first[1:])
    board.mark_full(first[:1])
    assert board.take_oldest_full(3) is None
    assert board.take_oldest_full(2) == [4, 3]
    board.acquire(actor=1, count=1, parent_pid=os.getppid())
    assert board.recycle(actor=1) == 1
    assert board.count(FREE) == 4


@pytest.mark.slow
@INFERENCE_MODES
def test_a_killed_actor_is_replaced_and_batches_keep_coming(policy, inference):
    pool = make_pool(policy, num_actors=2, unroll_length=4, batch_size=2, inference=inference)
    try:
        pool.release(pool.take_batch_slots(timeout_s=120))
        first_seed = pool.specs[0].action_seed
        victim = pool.processes[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.join()
        for _ in range(20):
            pool.release(pool.take_batch_slots(timeout_s=120))
        deadline = time.monotonic() + 30
        while pool.restarts == 0 and time.monotonic() < deadline:
            pool.release(pool.take_batch_slots(timeout_s=120))
        assert pool.restarts == 1
        assert pool.processes[0].pid != victim.pid and pool.processes[0].is_alive()
        assert pool.specs[0].action_seed != first_seed, "a restarted actor draws a new random stream"
        assert pool.stats()["pool/actor_restarts"] == 1.0
    finally:
        pool.close()


def test_an_env_that_raises_is_rebuilt_and_its_episode_is_a_truncation(policy):
    pool = make_pool(policy, unroll_length=20, batch_size=1, env=EnvConfig(id="FlakyCartPole-v0"),
                     start_method="fork")
    try:
        batches = []
        for _ in range(8):  # 160 steps: at least three crashes
            slots = pool.take_batch_slots(timeout_s=120)
            batches.append(stack_slots(pool.buffers, slots))
            pool.release(slots)
        assert pool.stats()["pool/env_rebuilds"] >= 3
        assert pool.restarts == 0
    finally:
        pool.close()
    # A crash ends an episode that did not finish (no statistics) and bootstraps from V(last good obs).
    crashes = [(batch["truncation_value"][1:][crashed]) for batch in batches
               for crashed in [batch["done"][1:] & torch.isnan(batch["episode_return"][1:])] if crashed.any()]
    assert len(crashes) >= 2
    assert all(bool((values != 0).all()) for values in crashes)


def test_an_episode_restarted_mid_game_trains_but_is_left_out_of_the_episode_statistics(policy):
    pool = make_pool(policy, unroll_length=24, env=EnvConfig(id="RestartingCartPole-v0"), start_method="fork")
    try:
        batch = pool.take_batch(timeout_s=120)
    finally:
        pool.close()
    ended = batch["done"][1:, 0]
    lengths, returns = batch["episode_length"][1:, 0][ended], batch["episode_return"][1:, 0][ended]
    assert int(ended.sum()) >= 3, "episodes of 5 and 7 steps end in turn within 24 steps"
    assert torch.isnan(lengths).any() and torch.isnan(returns).any()
    assert (lengths[~torch.isnan(lengths)] == 5).all() and (returns[~torch.isnan(returns)] == 5).all()


def test_actors_that_keep_dying_stop_the_run_with_their_error(policy):
    pool = make_pool(policy, env=EnvConfig(id="BrokenCartPole-v0"), start_method="fork")
    try:
        with pytest.raises(ActorFailed, match="this env never starts"):
            pool.take_batch_slots(timeout_s=120)
    finally:
        pool.close()


def test_stacking_into_preallocated_storage_gives_the_same_batch():
    spec = rollout_spec([2, 4, 4], torch.uint8, num_actions=3, unroll_length=3, core_state_size=5)
    buffers = create_buffers(spec, num_slots=3)
    for buffer in buffers.values():
        buffer.copy_(torch.randint(0, 100, buffer.shape).to(buffer.dtype))
    out = empty_batch(buffers, batch_size=2, pin_memory=False)
    written = stack_slots(buffers, [2, 0], out=out)
    for name, tensor in stack_slots(buffers, [2, 0]).items():
        assert torch.equal(written[name], tensor)
        assert written[name].data_ptr() == out[name].data_ptr()


def test_dynamic_batching_returns_each_actor_its_own_action(policy):
    context = torch.multiprocessing.get_context("spawn")
    server = InferenceServer(policy, torch.device("cpu"), num_actors=2, envs_per_actor=3, obs_shape=[4],
                             obs_dtype=torch.float32, num_actions=2, max_batch_envs=None, batch_timeout_s=0.05)
    ends = [server.connect(actor, context) for actor in range(2)]
    clients = [RemoteInference(end, server.requests, server.responses, os.getppid()) for end in ends]
    obs = torch.randn(2, 3, 4)
    for actor, client in enumerate(clients):
        rows = slice(3 * actor, 3 * actor + 3)
        client.submit(0, rows, obs[actor], torch.zeros(3, dtype=torch.int64), torch.zeros(3),
                      torch.ones(3, dtype=torch.bool))
    server.start()
    try:
        answers = [client.result(0) for client in clients]
    finally:
        server.stop()
    assert server.batches == 1 and server.mean_batch_envs() == 6.0, "both requests went in one batch"
    for actor, (action, logits, _, _) in enumerate(answers):
        expected, _, _ = policy(obs[actor][None], torch.zeros(1, 3, dtype=torch.int64), torch.zeros(1, 3),
                                torch.ones(1, 3, dtype=torch.bool), policy.initial_state(3))
        torch.testing.assert_close(logits, expected[0])
        assert action.shape == (3,)


def first_unroll_of_each_actor(policy, env: EnvConfig, seed: int) -> dict:
    pool = ActorPool(
        policy=policy, env=env, obs_shape=[4, 84, 84], obs_dtype=torch.uint8, num_actions=12,
        num_actors=2, envs_per_actor=1, unroll_length=30, batch_size=1, seed=seed, start_method="spawn",
    )
    first_unrolls = {}
    try:
        while len(first_unrolls) < 2:
            # Actor i owns a fixed range of slots: which one filled this batch's slot tells the actor.
            slots = pool.take_batch_slots(timeout_s=120)
            first_unrolls.setdefault(slots[0] // pool.board.slots_per_actor, stack_slots(pool.buffers, slots))
            pool.release(slots)
    finally:
        pool.close()
    return first_unrolls


@pytest.mark.slow
def test_actors_on_one_deterministic_game_sample_their_own_actions_reproducibly_from_the_seed():
    # Airstriker starts from one savestate whatever the env seed: the same first frames for both.
    env = EnvConfig(id="Airstriker-Genesis-v0")
    torch.manual_seed(0)
    policy = torch.jit.script(ActorCritic([4, 84, 84], 12, torso="shallow", hidden_size=32))
    first, again = first_unroll_of_each_actor(policy, env, seed=0), first_unroll_of_each_actor(policy, env, seed=0)
    torch.testing.assert_close(first[0]["obs"][0], first[1]["obs"][0])
    assert not torch.equal(first[0]["action"], first[1]["action"]), "each actor has its own random stream"
    for actor in (0, 1):
        assert torch.equal(first[actor]["action"], again[actor]["action"]), "the run seed fixes each stream"


@pytest.mark.slow
def test_a_time_limit_cut_carries_the_value_of_its_last_observation_and_a_terminal_does_not(policy):
    pool = make_pool(policy, unroll_length=50, batch_size=1, env=EnvConfig(id="CartPole-v1", max_episode_steps=20))
    ends = []
    try:
        while sum(length == 20 for length, _ in ends) < 3 or sum(length < 20 for length, _ in ends) < 3:
            batch = pool.take_batch(timeout_s=120)
            rows = batch["done"][1:, 0].nonzero().flatten() + 1
            ends += [(int(batch["episode_length"][row, 0]), float(batch["truncation_value"][row, 0])) for row in rows]
    finally:
        pool.close()
    for length, truncation_value in ends:
        if length == 20:
            assert truncation_value != 0.0, "a truncated episode bootstraps from V(last observation)"
        else:
            assert truncation_value == 0.0, "the pole fell: a terminal step has no value beyond it"


@pytest.mark.slow
def test_the_logged_gradient_norm_is_the_one_before_the_clip(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # A clip far below any real norm: a norm logged after clipping would sit at it.
    data = ImpalaDataModule(env=CARTPOLE, num_actors=1, unroll_length=5, batch_size=2)
    model = ImpalaModule(obs_shape=data.obs_shape, num_actions=data.num_actions, torso="mlp", hidden_size=16)
    logger = TensorBoardLogger(tmp_path, name="run")
    trainer = Trainer(default_root_dir=tmp_path, max_steps=5, logger=logger, log_every_n_steps=1,
                      gradient_clip_val=1e-6, enable_checkpointing=False, enable_progress_bar=False,
                      limit_val_batches=0, callbacks=[WeightPublisher()])
    trainer.fit(model, datamodule=data)
    events = EventAccumulator(logger.log_dir)
    events.Reload()
    norms = [scalar.value for scalar in events.Scalars("train/grad_norm")]
    assert len(norms) == 5
    assert all(1e-3 < norm < 1e6 for norm in norms), norms
