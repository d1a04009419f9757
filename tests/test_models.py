import io

import pytest
import torch
import torch.nn.functional as F

from kart_lightning.models import ActorCritic

T, B, A = 3, 2, 5
HIDDEN, LSTM = 32, 16
OBS_SHAPES = {"shallow": [4, 84, 84], "deep": [3, 64, 64], "mlp": [8]}


def make_model(torso: str = "shallow", use_lstm: bool = False, obs_shape=None) -> ActorCritic:
    torch.manual_seed(0)
    return ActorCritic(
        obs_shape or OBS_SHAPES[torso], A, torso=torso, hidden_size=HIDDEN, use_lstm=use_lstm, lstm_size=LSTM
    )


def make_obs(obs_shape, *batch):
    if len(obs_shape) == 1:
        return torch.randn(*batch, *obs_shape)
    return torch.randint(0, 256, (*batch, *obs_shape), dtype=torch.uint8)


def make_inputs(model: ActorCritic, steps: int = T, envs: int = B):
    """obs [steps, envs, *obs_shape], prev_action, prev_reward, done [steps, envs], a random core state."""
    state_size = model.initial_state(envs)[0].shape[-1]
    return (
        make_obs(model.obs_shape, steps, envs),
        torch.randint(0, A, (steps, envs)),
        3 * torch.randn(steps, envs),
        torch.zeros(steps, envs, dtype=torch.bool),
        (torch.randn(1, envs, state_size), torch.randn(1, envs, state_size)),
    )


def assert_outputs_equal(actual, expected):
    (logits, baseline, (h, c)), (logits_e, baseline_e, (h_e, c_e)) = actual, expected
    for a, e in [(logits, logits_e), (baseline, baseline_e), (h, h_e), (c, c_e)]:
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("use_lstm", [False, True])
@pytest.mark.parametrize("torso", ["shallow", "deep", "mlp"])
def test_each_torso_scripts_and_gives_the_same_outputs_as_eager(torso, use_lstm):
    model = make_model(torso, use_lstm)
    scripted = torch.jit.script(model)
    inputs = make_inputs(model)
    with torch.no_grad():
        assert_outputs_equal(scripted(*inputs), model(*inputs))
        step = [x[0] for x in inputs[:4]]
        action, logits, baseline, _ = scripted.act(*step, inputs[4], True)
        action_e, logits_e, baseline_e, _ = model.act(*step, inputs[4], True)
    torch.testing.assert_close(action, action_e)
    torch.testing.assert_close(logits, logits_e)
    torch.testing.assert_close(baseline, baseline_e)


@pytest.mark.parametrize("use_lstm", [False, True])
def test_output_shapes(use_lstm):
    model = torch.jit.script(make_model("shallow", use_lstm))
    state_size = LSTM if use_lstm else 0
    h0, c0 = model.initial_state(B)
    assert h0.shape == c0.shape == (1, B, state_size)
    obs, prev_action, prev_reward, done, _ = make_inputs(model)
    with torch.no_grad():
        logits, baseline, (h, c) = model(obs, prev_action, prev_reward, done, (h0, c0))
        action, step_logits, step_baseline, (step_h, step_c) = model.act(
            obs[0], prev_action[0], prev_reward[0], done[0], (h0, c0)
        )
    assert logits.shape == (T, B, A) and logits.dtype == torch.float32
    assert baseline.shape == (T, B) and baseline.dtype == torch.float32
    assert h.shape == c.shape == (1, B, state_size)
    assert action.shape == (B,) and action.dtype == torch.int64
    assert step_logits.shape == (B, A)
    assert step_baseline.shape == (B,)
    assert step_h.shape == step_c.shape == (1, B, state_size)


def test_lstm_state_is_zeroed_after_episode_end():
    model = torch.jit.script(make_model("mlp", use_lstm=True))
    steps, k = 5, 2
    obs, prev_action, prev_reward, done, state = make_inputs(model, steps)
    done[k, 0] = True  # env 0 starts a new episode at step k; env 1 carries on
    with torch.no_grad():
        logits, baseline, (h, c) = model(obs, prev_action, prev_reward, done, state)
        fresh_logits, fresh_baseline, (fresh_h, fresh_c) = model(
            obs[k:], prev_action[k:], prev_reward[k:], done[k:], model.initial_state(B)
        )
    torch.testing.assert_close(logits[k:, 0], fresh_logits[:, 0])
    torch.testing.assert_close(baseline[k:, 0], fresh_baseline[:, 0])
    torch.testing.assert_close(h[:, 0], fresh_h[:, 0])
    torch.testing.assert_close(c[:, 0], fresh_c[:, 0])
    # Env 1's episode did not end, so its carried state still matters.
    assert not torch.allclose(logits[k:, 1], fresh_logits[:, 1])


def test_without_lstm_core_state_passes_through():
    model = torch.jit.script(make_model("mlp", use_lstm=False))
    obs, prev_action, prev_reward, done, _ = make_inputs(model)
    state = model.initial_state(B)
    assert state[0].shape == state[1].shape == (1, B, 0)
    with torch.no_grad():
        _, _, new_state = model(obs, prev_action, prev_reward, done, state)
        _, _, _, step_state = model.act(obs[0], prev_action[0], prev_reward[0], done[0], state)
    for returned in (new_state, step_state):
        assert returned[0] is state[0] and returned[1] is state[1]


@pytest.mark.parametrize("torso", ["shallow", "deep"])
def test_uint8_frames_are_scaled_inside_the_model(torso):
    model = make_model(torso)
    first = model.torso[0]
    seen = []
    first.register_forward_hook(lambda module, args, output: seen.append((args[0], output)))
    obs, prev_action, prev_reward, done, state = make_inputs(model)
    obs[0, 0, 0, 0, 0] = 255
    with torch.no_grad():
        model(obs, prev_action, prev_reward, done, state)
    ((first_input, first_output),) = seen
    assert first_input.dtype == torch.float32
    # The first convolution of pixels in [0, 255] is the plain convolution of pixels in [0, 1].
    scaled = obs.flatten(0, 1).float() / 255
    expected = F.conv2d(scaled, first.weight, first.bias, first.stride, first.padding)
    torch.testing.assert_close(first_output, expected)


def test_frames_in_autocast_dtype_give_the_float32_outputs():
    model = torch.jit.script(make_model("shallow"))
    obs, prev_action, prev_reward, done, state = make_inputs(model)
    with torch.no_grad():
        logits, values, _ = model(obs, prev_action, prev_reward, done, state)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half_logits, half_values, _ = model(obs.to(torch.bfloat16), prev_action, prev_reward, done, state)
    assert half_logits.dtype == half_values.dtype == torch.float32
    torch.testing.assert_close(half_logits, logits, atol=0.05, rtol=0.05)
    torch.testing.assert_close(half_values, values, atol=0.05, rtol=0.05)


def test_act_greedy_is_argmax():
    model = torch.jit.script(make_model("shallow", use_lstm=True))
    obs, prev_action, prev_reward, done, state = make_inputs(model, steps=1, envs=8)
    with torch.no_grad():
        action, logits, _, _ = model.act(obs[0], prev_action[0], prev_reward[0], done[0], state, True)
    torch.testing.assert_close(action, logits.argmax(dim=1))


def test_act_samples_valid_actions():
    model = make_model("mlp")
    # Only actions 0 and 1 have probability, evenly: samples must cover both and nothing else.
    with torch.no_grad():
        model.policy.weight.zero_()
        model.policy.bias.copy_(torch.tensor([0.0, 0.0] + [-1e9] * (A - 2)))
    scripted = torch.jit.script(model)
    envs = 256
    obs, prev_action, prev_reward, done, state = make_inputs(model, steps=1, envs=envs)
    torch.manual_seed(1)
    with torch.no_grad():
        action, _, _, _ = scripted.act(obs[0], prev_action[0], prev_reward[0], done[0], state)
    assert action.shape == (envs,) and action.dtype == torch.int64
    assert set(action.tolist()) == {0, 1}


def test_scripted_model_round_trips_through_torch_jit_save_and_load():
    scripted = torch.jit.script(make_model("shallow", use_lstm=True))
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)
    inputs = make_inputs(scripted)
    with torch.no_grad():
        assert_outputs_equal(loaded(*inputs), scripted(*inputs))
        step = [x[0] for x in inputs[:4]]
        action, _, _, _ = loaded.act(*step, inputs[4], True)
        action_e, _, _, _ = scripted.act(*step, inputs[4], True)
    torch.testing.assert_close(action, action_e)
    assert loaded.initial_state(B)[0].shape == (1, B, LSTM)


def test_cnn_torsos_accept_any_frame_size():
    for torso in ("shallow", "deep"):
        model = make_model(torso, obs_shape=[2, 50, 70])
        obs, prev_action, prev_reward, done, state = make_inputs(model)
        with torch.no_grad():
            logits, _, _ = model(obs, prev_action, prev_reward, done, state)
        assert logits.shape == (T, B, A)


def test_unknown_torso_is_rejected():
    with pytest.raises(ValueError, match="shallow, deep, mlp"):
        ActorCritic([4, 84, 84], A, torso="resnet")


def test_obs_shape_that_does_not_fit_the_torso_is_rejected():
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        ActorCritic([8], A, torso="shallow")
    with pytest.raises(ValueError, match=r"\[D\]"):
        ActorCritic([4, 84, 84], A, torso="mlp")
