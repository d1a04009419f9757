"""Experience replay (data/replay.py) and the learner-side levers that come with it: the replay
buffer, its batches through real actors, LASER's trust region and the augmentations (random shift, mirror)."""

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from kart_lightning.data import ActorPool, ImpalaDataModule, TrajectoryDataset, WeightPublisher
from kart_lightning.data.replay import ReplayBuffer, ReplayConfig, split_batch
from kart_lightning.data.rollout import create_buffers, rollout_spec, stack_slots
from kart_lightning.envs import EnvConfig
from kart_lightning.errors import ConfigError
from kart_lightning.losses import vtrace
from kart_lightning.models import ActorCritic
from kart_lightning.models.augmentation import mirror, random_shift
from kart_lightning.module import ImpalaModule

T = 5


def filled_buffers(slots: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rollout slots of 3x8x8 uint8 frames, every field random; slot i's policy_version is i."""
    generator = torch.Generator().manual_seed(seed)
    spec = rollout_spec([3, 8, 8], torch.uint8, num_actions=4, unroll_length=T, core_state_size=6)
    buffers = create_buffers(spec, slots)
    for buffer in buffers.values():
        if buffer.dtype == torch.uint8:
            buffer.copy_(torch.randint(0, 256, buffer.shape, generator=generator, dtype=torch.uint8))
        elif buffer.dtype == torch.bool:
            buffer.copy_(torch.rand(buffer.shape, generator=generator) < 0.2)
        elif buffer.dtype == torch.int64:
            buffer.copy_(torch.randint(0, 4, buffer.shape, generator=generator))
        else:
            buffer.copy_(torch.randn(buffer.shape, generator=generator))
    buffers["policy_version"].copy_(torch.arange(slots))
    return buffers


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, NaNs included (torch.equal finds NaN unequal to itself)."""
    if a.dtype == torch.float32:
        a, b = a.view(torch.int32), b.view(torch.int32)
    return torch.equal(a, b)


def unroll(batch: dict[str, torch.Tensor], column: int) -> dict[str, torch.Tensor]:
    """One unroll (column) of a time-major batch."""
    return {name: values[column] if values.dim() == 1 else values[:, column] for name, values in batch.items()
            if isinstance(values, torch.Tensor) and name != "replayed"}


def test_split_batch_gives_replayed_per_fresh_and_refuses_ratios_with_no_room():
    assert split_batch(16, 0) == (16, 0)
    assert split_batch(16, 1) == (8, 8)
    assert split_batch(16, 3) == (4, 12)
    assert split_batch(16, 100) == (1, 15)
    with pytest.raises(ConfigError, match="leaves no replayed unroll"):
        split_batch(16, 0.01)
    with pytest.raises(ConfigError, match="set it to 0"):
        split_batch(16, -1)


def test_replayed_unrolls_are_bit_exact_copies_that_actors_cannot_touch():
    buffers = filled_buffers(6)
    original = stack_slots(buffers, list(range(6)))
    replay = ReplayBuffer(buffers, ReplayConfig(capacity=6))
    replay.add(stack_slots(buffers, list(range(6))))
    # The actors go on writing their slots: the buffer holds its own copies.
    for buffer in buffers.values():
        buffer.zero_() if buffer.dtype != torch.bool else buffer.fill_(True)
    sampled = replay.sample(50)
    seen = set()
    for column in range(50):
        got = unroll(sampled, column)
        index = int(got["policy_version"])
        seen.add(index)
        for name, values in unroll(original, index).items():
            assert bit_equal(got[name], values), name
    assert seen == set(range(6))


def test_a_full_buffer_drops_its_oldest_unrolls_and_recent_sampling_favours_new_ones():
    buffers = filled_buffers(10)
    replay = ReplayBuffer(buffers, ReplayConfig(capacity=4))
    for first in range(0, 10, 2):  # 10 unrolls, 2 at a time, into room for 4
        replay.add(stack_slots(buffers, [first, first + 1]))
    assert len(replay) == 4
    assert set(replay.sample(200)["policy_version"].tolist()) == {6, 7, 8, 9}

    uniform = ReplayBuffer(buffers, ReplayConfig(capacity=10, sampling="uniform"))
    recent = ReplayBuffer(buffers, ReplayConfig(capacity=10, sampling="recent", half_life=2))
    for replay in (uniform, recent):
        replay.add(stack_slots(buffers, list(range(10))))
    uniform_mean = uniform.sample(4000)["policy_version"].float().mean()
    recent_mean = recent.sample(4000)["policy_version"].float().mean()
    assert abs(uniform_mean - 4.5) < 0.3
    # Weights halve every 2 unrolls back from the newest, 9: the mean is 6.91.
    assert abs(recent_mean - 6.91) < 0.2

    # Recency after the ring has wrapped: 10 unrolls into room for 4, the newest (9) most often.
    wrapped = ReplayBuffer(buffers, ReplayConfig(capacity=4, sampling="recent", half_life=1))
    for first in range(0, 10, 2):
        wrapped.add(stack_slots(buffers, [first, first + 1]))
    counts = torch.bincount(wrapped.sample(4000)["policy_version"], minlength=10)[6:].tolist()
    assert counts == sorted(counts) and counts[-1] > 1800  # 6 < 7 < 8 < 9, 9 about 8/15 of them


def test_advantage_sampling_favours_unrolls_that_went_better_than_expected_and_passes_over_dropped_ones():
    buffers = filled_buffers(10)
    replay = ReplayBuffer(buffers, ReplayConfig(capacity=10, sampling="advantage"))
    ids = replay.add(stack_slots(buffers, list(range(10))))
    assert ids.tolist() == list(range(10))
    # No priority yet (no batch has learnt from them): uniform.
    assert abs(replay.sample(4000)["policy_version"].float().mean() - 4.5) < 0.3
    replay.update_priorities(ids, torch.tensor([0.0] * 9 + [9.0]))
    sampled = replay.sample(4000)
    assert torch.equal(sampled["replay_id"], sampled["policy_version"])  # each unroll's id comes with it
    # Chances (priority + mean 0.9): 9.9 for unroll 9 against 0.9 for each other, 55 % of draws.
    assert 0.5 < (sampled["policy_version"] == 9).float().mean() < 0.6
    flat = ReplayBuffer(buffers, ReplayConfig(capacity=10, sampling="advantage", priority_exponent=0))
    flat.update_priorities(flat.add(stack_slots(buffers, list(range(10)))), torch.tensor([0.0] * 9 + [9.0]))
    assert abs(flat.sample(4000)["policy_version"].float().mean() - 4.5) < 0.3

    # After the ring has wrapped: 10 unrolls into room for 4; ids 0-5 are gone, and a priority
    # for one of them (a batch learnt from it while newer ones took its row) is passed over.
    wrapped = ReplayBuffer(buffers, ReplayConfig(capacity=4, sampling="advantage"))
    for first in range(0, 8, 2):
        wrapped.add(stack_slots(buffers, [first, first + 1]))
    wrapped.update_priorities(torch.tensor([5, 7]), torch.tensor([2.0, 6.0]))
    assert wrapped.add(stack_slots(buffers, [8, 9])).tolist() == [8, 9]  # into the rows of ids 4 and 5
    wrapped.update_priorities(torch.tensor([5, 9]), torch.tensor([100.0, 1.0]))
    assert wrapped.priority.tolist() == [2.0, 1.0, 0.0, 6.0]  # ids 8 and 9 entered at the mean, 2; then 9 at 1
    sampled = wrapped.sample(2000)
    assert torch.equal(sampled["replay_id"], sampled["policy_version"])
    assert set(sampled["replay_id"].tolist()) == {6, 7, 8, 9}
    with pytest.raises(ConfigError, match="priority_exponent is -1"):
        ReplayBuffer(buffers, ReplayConfig(sampling="advantage", priority_exponent=-1))


class KeepReplay(Callback):
    """Keeps the datamodule's replay buffer, which it drops with its actors when fit ends."""

    def on_train_end(self, trainer, pl_module):
        self.replay = trainer.datamodule.replay_buffer


@pytest.mark.slow
@pytest.mark.parametrize("draw", [{"sampling": "advantage"}, {"self_imitation": 1}], ids=["sampling", "imitation"])
def test_fit_with_advantage_sampling_sets_each_unrolls_priority_from_the_batch_that_learnt_from_it(tmp_path, draw):
    data = ImpalaDataModule(env=EnvConfig(id="CartPole-v1"), num_actors=1, envs_per_actor=2, unroll_length=5,
                            batch_size=4, replay=ReplayConfig(ratio=1, capacity=12, **draw))
    model = ImpalaModule(obs_shape=data.obs_shape, num_actions=data.num_actions, torso="mlp", hidden_size=16)
    kept = KeepReplay()
    trainer = Trainer(default_root_dir=tmp_path, max_steps=12, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, limit_val_batches=0, callbacks=[WeightPublisher(), kept])
    trainer.fit(model, datamodule=data)
    # 2 fresh unrolls a step; the ring of 12 holds the last 6 steps' (and the one Lightning took
    # untrained). CartPole pays 1 a step and the value starts near 0: every unroll went better
    # than expected, by amounts that differ from unroll to unroll.
    priority = kept.replay.priority
    assert kept.replay.added >= 24 and (priority > 0).all() and len(priority.unique()) > 6
    if "self_imitation" in draw:  # the last unroll of each batch was learnt by self-imitation
        assert trainer.callback_metrics["train/self_imitation_loss"] > 0


def test_self_imitation_draws_its_unrolls_by_advantage_beside_uniform_ones_and_refuses_more_than_are_replayed():
    buffers = filled_buffers(10)
    replay = ReplayBuffer(buffers, ReplayConfig(capacity=10, sampling="uniform", self_imitation=2))
    assert replay.keeps_priorities
    assert not ReplayBuffer(buffers, ReplayConfig(capacity=10)).keeps_priorities
    replay.update_priorities(replay.add(stack_slots(buffers, list(range(10)))), torch.tensor([0.0] * 9 + [9.0]))
    assert abs(replay.sample(4000)["policy_version"].float().mean() - 4.5) < 0.3  # its own draw: uniform
    assert 0.5 < (replay.sample(4000, by_advantage=True)["policy_version"] == 9).float().mean() < 0.6
    with pytest.raises(ConfigError, match="self_imitation is 3, and a batch holds 2 replayed unrolls"):
        ImpalaDataModule(env=EnvConfig(id="CartPole-v1"), batch_size=4, replay=ReplayConfig(ratio=1, self_imitation=3))
    with pytest.raises(ConfigError, match="self_imitation_value_cost is -1"):
        image_module(self_imitation_value_cost=-1)


def test_self_imitation_learns_the_imitated_unrolls_where_their_return_beat_the_value_and_nothing_else():
    module = image_module(self_imitation_value_cost=0.25, reward_clipping="none")
    buffers = acted_batch(module, 4)
    batch = stack_slots(buffers, [0, 1, 2, 3])
    batch["done"][:] = False  # one discount throughout, no episode cut: the returns below need neither
    batch["truncation_value"][:] = 0
    batch["reward"] *= 3
    batch["self_imitation"] = torch.tensor([False, False, True, True])
    with torch.no_grad():
        losses = module.compute_loss(batch)
        others = module.compute_loss({name: values[:, :2] if values.dim() > 1 else values[:2]
                                      for name, values in batch.items() if name != "self_imitation"})
        logits, values, _ = module(batch)
    # The V-trace loss is that of the other unrolls alone.
    for name in ("policy_loss", "baseline_loss", "entropy_loss"):
        torch.testing.assert_close(losses[name], others[name], rtol=1e-5, atol=1e-5)
    # The policy acted (μ = π), so V-trace's targets from its logits are the discounted returns
    # bootstrapped from V(x_T): what self-imitation learns towards.
    returns = vtrace.from_logits(
        behaviour_policy_logits=logits[:-1], target_policy_logits=logits[:-1], actions=batch["action"][:-1],
        discounts=torch.full((T, 4), module.hparams.discount), rewards=batch["reward"][1:],
        values=values[:-1], bootstrap_value=values[-1], clip_rho_threshold=None, clip_pg_rho_threshold=None,
    )
    better = (returns.vs - values[:-1]).clamp(min=0)[:, 2:]
    assert (better > 0).any() and (better == 0).any()  # some actions beat the value, some did not
    taken = torch.log_softmax(logits[:-1, 2:], -1).gather(-1, batch["action"][:-1, 2:, None]).squeeze(-1)
    expected = -(taken * better).sum() + 0.25 * 0.5 * better.pow(2).sum()
    torch.testing.assert_close(losses["self_imitation_loss"], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(losses["loss"], others["loss"] + expected, rtol=1e-5, atol=1e-5)


def test_capacity_in_gib_bounds_the_unrolls_kept():
    buffers = filled_buffers(2)
    per_unroll = sum(buffer[0].numel() * buffer.element_size() for buffer in buffers.values())
    replay = ReplayBuffer(buffers, ReplayConfig(capacity=1, capacity_gib=10.5 * per_unroll / 2**30))
    assert replay.capacity == 10 and replay.nbytes == 10 * per_unroll


def image_module(**overrides) -> ImpalaModule:
    torch.manual_seed(0)
    return ImpalaModule(obs_shape=[3, 8, 8], num_actions=4, torso="deep", hidden_size=16, **overrides)


def acted_batch(module: ImpalaModule, slots: int) -> dict[str, torch.Tensor]:
    """Slots whose behaviour logits are the module's policy's on their own observations."""
    buffers = filled_buffers(slots)
    batch = stack_slots(buffers, list(range(slots)))
    with torch.no_grad():
        logits, _, _ = module(batch)
    for slot in range(slots):
        buffers["behaviour_logits"][slot] = logits[:, slot]
    return buffers


def test_replayed_batches_give_the_loss_of_the_same_unrolls_fresh_while_the_policy_is_unchanged():
    module = image_module()
    buffers = acted_batch(module, 8)
    replay = ReplayBuffer(buffers, ReplayConfig(capacity=8))
    replay.add(stack_slots(buffers, list(range(8))))
    sampled = replay.sample(6)
    fresh = stack_slots(buffers, sampled["policy_version"].tolist())
    with torch.no_grad():
        replayed_loss, fresh_loss = module.compute_loss(sampled), module.compute_loss(fresh)
    for name in ("loss", "policy_loss", "baseline_loss", "entropy_loss"):
        # The same numbers, summed in a possibly different order: equal to the last bits.
        torch.testing.assert_close(replayed_loss[name], fresh_loss[name], rtol=1e-6, atol=1e-6)


def test_the_trust_region_leaves_out_only_unrolls_whose_policy_moved_too_far():
    module = image_module(trust_region_kl=0.05)
    buffers = acted_batch(module, 4)
    buffers["behaviour_logits"][2:] = torch.randn(buffers["behaviour_logits"][2:].shape) * 5  # old policies
    batch = stack_slots(buffers, list(range(4)))
    with torch.no_grad():
        losses = module.compute_loss(batch)
        near = image_module().compute_loss({name: values[:, :2] if values.dim() > 1 else values[:2]
                                            for name, values in batch.items()})
    assert losses["trust_region_kept"] == 0.5
    # The far unrolls add nothing to the policy gradient term.
    assert torch.allclose(losses["policy_loss"], near["policy_loss"])
    assert image_module().compute_loss(batch)["policy_loss"] != losses["policy_loss"]


def test_random_shift_keeps_shape_and_dtype_and_moves_all_stacked_frames_of_an_observation_together():
    frame = torch.arange(64, dtype=torch.uint8).reshape(8, 8)
    obs = frame.expand(6, 5, 3, 8, 8).contiguous()  # [T+1, B, C, H, W], the same frame everywhere
    shifted = random_shift(obs, pad=2, generator=torch.Generator().manual_seed(0))
    assert shifted.shape == obs.shape and shifted.dtype == torch.uint8
    assert torch.equal(random_shift(obs, pad=0), obs)
    moved = 0
    for image in shifted.reshape(-1, 3, 8, 8):
        assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])
        # Each is the frame shifted by (dy, dx) within [-2, 2], edge pixels repeated.
        matches = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                   if torch.equal(image[0], frame[(torch.arange(8) + dy).clamp(0, 7)][:, (torch.arange(8) + dx).clamp(0, 7)])]
        assert matches
        moved += (0, 0) not in matches
    assert moved > 20  # of 30: a 1-in-25 chance each to stay put


def test_augmentation_applies_to_training_batches_only():
    module = image_module(augmentation="random_shift")
    batch = stack_slots(filled_buffers(4), list(range(4)))
    module.train()
    assert not torch.equal(module.augment(batch)["obs"], batch["obs"])
    module.eval()
    assert module.augment(batch) is batch
    assert image_module().augment(batch) is batch  # augmentation none


CYCLE = torch.tensor([1, 2, 3, 0])
"""A mirror permutation that is not its own inverse, so the test tells the two directions apart."""


def test_mirror_flips_the_chosen_unrolls_and_gives_the_mirrored_action_the_behaviour_probability_taken():
    batch = stack_slots(filled_buffers(4), list(range(4)))
    flip = torch.tensor([True, False, True, False])
    mirrored = mirror(batch, CYCLE, flip)
    for unroll_index, flipped in enumerate(flip.tolist()):
        obs, new_obs = batch["obs"][:, unroll_index], mirrored["obs"][:, unroll_index]
        action, new_action = batch["action"][:, unroll_index], mirrored["action"][:, unroll_index]
        if flipped:
            assert torch.equal(new_obs, obs.flip(-1)) and not torch.equal(new_obs, obs)
            assert torch.equal(new_action, CYCLE[action])
            assert torch.equal(mirrored["prev_action"][:, unroll_index], CYCLE[batch["prev_action"][:, unroll_index]])
        else:
            assert torch.equal(new_obs, obs) and torch.equal(new_action, action)
        # μ(mirrored action | mirrored frames) is μ(action | frames).
        log_mu = torch.log_softmax(batch["behaviour_logits"][:, unroll_index], -1).gather(-1, action[:, None])
        new_log_mu = torch.log_softmax(mirrored["behaviour_logits"][:, unroll_index], -1).gather(-1, new_action[:, None])
        torch.testing.assert_close(new_log_mu, log_mu)  # the same sum of exponentials, in another order
    back = mirror(mirrored, CYCLE.argsort(), flip)
    assert all(torch.equal(back[name], batch[name]) for name in batch)


def test_a_mirrored_unroll_gives_the_vtrace_targets_of_the_unroll_under_the_mirrored_policy():
    batch = stack_slots(filled_buffers(4), list(range(4)))
    target = torch.randn(batch["behaviour_logits"].shape, generator=torch.Generator().manual_seed(1))
    mirrored = mirror(batch, CYCLE, torch.ones(4, dtype=torch.bool))

    def targets(unrolls: dict[str, torch.Tensor], target_logits: torch.Tensor) -> vtrace.VTraceFromLogitsReturns:
        return vtrace.from_logits(
            behaviour_policy_logits=unrolls["behaviour_logits"][:-1], target_policy_logits=target_logits[:-1],
            actions=unrolls["action"][:-1], discounts=0.9 * (~unrolls["done"][1:]).float(),
            rewards=unrolls["reward"][1:], values=unrolls["truncation_value"][:-1],
            bootstrap_value=unrolls["truncation_value"][-1],
        )

    # π mirrored: the mirrored action has the logit the action had.
    plain, flipped = targets(batch, target), targets(mirrored, target[..., CYCLE.argsort()])
    torch.testing.assert_close(flipped.vs, plain.vs)
    torch.testing.assert_close(flipped.pg_advantages, plain.pg_advantages)


def test_mirror_needs_a_game_with_mirrored_actions_and_no_lstm_and_flips_training_batches_only():
    with pytest.raises(ConfigError, match="names no mirrored actions"):
        image_module(augmentation="mirror")
    with pytest.raises(ConfigError, match="set model.use_lstm false"):
        image_module(augmentation="mirror", mirrored_actions=CYCLE.tolist(), use_lstm=True)
    with pytest.raises(ValueError, match="is not a permutation of 4 actions"):
        image_module(augmentation="mirror", mirrored_actions=[0, 0, 1, 2])
    module = image_module(augmentation="mirror", mirrored_actions=CYCLE.tolist())
    assert "mirror_index" not in module.state_dict()  # the hyperparameters carry it
    batch = stack_slots(filled_buffers(8), list(range(8)))
    module.train()
    augmented = module.augment(batch)
    flipped = [not torch.equal(augmented["obs"][:, index], batch["obs"][:, index]) for index in range(8)]
    assert 0 < sum(flipped) < 8  # each unroll a coin toss (torch seeded by image_module)
    for index, was_flipped in enumerate(flipped):
        mapped = CYCLE[batch["action"][:, index]] if was_flipped else batch["action"][:, index]
        assert torch.equal(augmented["action"][:, index], mapped)
    assert torch.isfinite(module.compute_loss(augmented)["loss"])
    module.eval()
    assert module.augment(batch) is batch


@pytest.mark.slow
def test_actor_batches_mix_fresh_unrolls_with_bit_exact_earlier_ones_and_count_fresh_frames_only():
    torch.manual_seed(0)
    policy = torch.jit.script(ActorCritic([4], 2, torso="mlp", hidden_size=32))
    pool = ActorPool(
        policy=policy, env=EnvConfig(id="CartPole-v1"), obs_shape=[4], obs_dtype=torch.float32, num_actions=2,
        num_actors=2, envs_per_actor=2, unroll_length=T, batch_size=2, seed=0, start_method="spawn",
    )
    try:
        replay = ReplayBuffer(pool.buffers, ReplayConfig(capacity=6))
        dataset = TrajectoryDataset(pool, env_frames_per_step=1, timeout_s=60, replay=replay, replay_count=3)
        earlier = []
        for step, batch in zip(range(12), dataset):
            assert batch["env_frames"] == 2 * T  # the fresh unrolls only
            replayed = batch["replayed"]
            if step < 3:  # the buffer holds fewer than a batch's worth of unrolls yet: fresh only
                assert replayed.tolist() == [False, False]
            else:
                assert replayed.tolist() == [False, False, True, True, True]
            for column in range(len(replayed)):
                got = unroll(batch, column)
                if replayed[column]:
                    # Among the last 6 fresh unrolls, copied bit for bit.
                    assert any(all(bit_equal(got[name], old[name]) for name in got) for old in earlier[-6:])
            earlier += [unroll(batch, column) for column in range(len(replayed)) if not replayed[column]]
    finally:
        pool.close()


def test_training_statistics_come_from_fresh_unrolls_only():
    torch.manual_seed(0)
    module = ImpalaModule(obs_shape=[4], num_actions=2, torso="mlp", hidden_size=8)
    optimizer = torch.optim.SGD(module.parameters(), lr=0.5)
    module.optimizers = lambda: optimizer
    logged = {}
    module.log = lambda name, value, **_: logged.__setitem__(name, float(value))
    steps, columns = T + 1, 4  # columns 2 and 3 replayed
    done = torch.zeros(steps, columns, dtype=torch.bool)
    done[3] = True
    returns = torch.full((steps, columns), float("nan"))
    returns[3] = torch.tensor([10.0, 20.0, 100.0, 200.0])
    batch = {
        "reward": torch.zeros(steps, columns), "done": done, "episode_return": returns,
        "episode_length": torch.where(done, 50.0, float("nan")),
        "policy_version": torch.tensor([0, 0, -3, -5]), "replayed": torch.tensor([False, False, True, True]),
    }
    module._log_training(batch, {"loss": torch.tensor(1.0)}, module._job_step({**batch, "env_frames": 0}))
    assert module.episodes == 2
    assert logged["train/episode_return"] == 15.0
    assert logged["train/replay_ratio_effective"] == 1.0
    assert logged["policy_lag"] == 0.0 and logged["train/replay_lag"] == 4.0
