"""The IMPALA actor-critic network: a torso, an optional LSTM core, and policy and baseline heads.
It is compiled with torch.jit.script; actors and evaluation run the scripted module."""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kart_lightning.errors import ConfigError

TORSOS = ("shallow", "deep", "mlp")


class ResidualBlock(nn.Module):
    """[ReLU, conv3x3, ReLU, conv3x3] plus the skip connection; [N, C, H, W] -> [N, C, H, W]."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv1(F.relu(self.conv0(F.relu(x))))


class PixelConv2d(nn.Conv2d):
    """A first convolution that takes pixels in [0, 255] and computes conv(x / 255) as a
    convolution of x by weight / 255: the same function, gradients and state dict, without a pass
    over the frames, the largest tensor of a learner step."""

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(x, self.weight / 255, self.bias)


def _shallow_features(in_channels: int) -> nn.Sequential:
    """The IMPALA paper's Atari CNN up to the flatten: [N, C, H, W] pixels in [0, 255] ->
    [N, 32 * H' * W']."""
    return nn.Sequential(
        PixelConv2d(in_channels, 16, kernel_size=8, stride=4),
        nn.ReLU(),
        nn.Conv2d(16, 32, kernel_size=4, stride=2),
        nn.ReLU(),
        nn.Flatten(),
    )


def _deep_features(in_channels: int) -> nn.Sequential:
    """The IMPALA paper's residual network up to the flatten: [N, C, H, W] pixels in [0, 255] ->
    [N, 32 * H' * W']."""
    layers: list[nn.Module] = []
    for channels in (16, 32, 32):
        # Zero padding is the same for x and x / 255, so only the first convolution scales.
        conv = PixelConv2d if not layers else nn.Conv2d
        layers += [
            conv(in_channels, channels, kernel_size=3, stride=1, padding=1),
            nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            ResidualBlock(channels),
            ResidualBlock(channels),
        ]
        in_channels = channels
    layers += [nn.ReLU(), nn.Flatten()]
    return nn.Sequential(*layers)


def _make_torso(obs_shape: list[int], torso: str, hidden_size: int) -> nn.Sequential:
    """Build the torso: one observation batch [N, *obs_shape] -> features [N, hidden_size]."""
    if torso not in TORSOS:
        raise ConfigError(f"Unknown torso {torso!r}: set model.torso to one of {', '.join(TORSOS)}.")
    if torso == "mlp":
        if len(obs_shape) != 1:
            raise ConfigError(
                f"The mlp torso needs vector observations [D] but the env gives {obs_shape}: "
                "set model.torso to shallow or deep for image observations."
            )
        # tanh rather than ReLU: vector observations are not normalised, and a bounded activation
        # keeps features from large raw values in range; tanh MLPs are also the better default for
        # on-policy actor-critics (Andrychowicz et al. 2021, "What Matters in On-Policy RL").
        return nn.Sequential(
            nn.Linear(obs_shape[0], hidden_size),
            nn.Tanh(),
            nn.Linear(hidden_size, hidden_size),
            nn.Tanh(),
        )
    if len(obs_shape) != 3:
        raise ConfigError(
            f"The {torso} torso needs image observations [C, H, W] but the env gives {obs_shape}: "
            "set model.torso to mlp for vector observations."
        )
    features = _shallow_features(obs_shape[0]) if torso == "shallow" else _deep_features(obs_shape[0])
    # A dry run gives the flatten size, so any H and W the convolutions accept will do.
    with torch.no_grad():
        flat_size = features(torch.zeros([1] + obs_shape)).shape[1]
    return nn.Sequential(*features, nn.Linear(flat_size, hidden_size), nn.ReLU())


class ActorCritic(nn.Module):
    """IMPALA policy and value network.

    obs_shape: [C, H, W] for image observations (frame stack as channels) in [0, 255], uint8 or
    any float dtype, scaled to [0, 1] by the first convolution; [D] for float32 vector
    observations (torso "mlp"), used as is.
    torso: "shallow" (the paper's Atari CNN), "deep" (the paper's residual network) or "mlp".
    The torso output is concatenated with the previous reward, clamped to [-1, 1], and the one-hot
    previous action, and goes through an optional one-layer LSTM core before the heads.
    """

    use_lstm: torch.jit.Final[bool]
    # In the class body: TorchScript does not take annotations of attributes inside __init__.
    obs_shape: list[int]
    num_actions: int

    def __init__(
        self,
        obs_shape: Sequence[int],
        num_actions: int,
        torso: str = "shallow",
        hidden_size: int = 256,
        use_lstm: bool = False,
        lstm_size: int = 256,
    ) -> None:
        super().__init__()
        self.obs_shape = [int(size) for size in obs_shape]
        self.num_actions = int(num_actions)
        self.use_lstm = use_lstm
        self.torso = _make_torso(self.obs_shape, torso, hidden_size)
        core_input_size = hidden_size + 1 + self.num_actions
        if use_lstm:
            self.core = nn.LSTM(core_input_size, lstm_size, num_layers=1)
            self.core_state_size = lstm_size
            head_input_size = lstm_size
        else:
            # Zero-width state keeps the core state a Tuple[Tensor, Tensor] for every model.
            self.core_state_size = 0
            head_input_size = core_input_size
        self.policy = nn.Linear(head_input_size, self.num_actions)
        self.baseline = nn.Linear(head_input_size, 1)

    @torch.jit.export
    def initial_state(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """Zero core state (h, c), each [1, batch_size, lstm_size] ([1, batch_size, 0] without LSTM)."""
        device = self.policy.weight.device
        shape = [1, batch_size, self.core_state_size]
        return torch.zeros(shape, device=device), torch.zeros(shape, device=device)

    def forward(
        self,
        obs: Tensor,
        prev_action: Tensor,
        prev_reward: Tensor,
        done: Tensor,
        core_state: tuple[Tensor, Tensor],
    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """Run T steps for B environments.

        obs [T, B, *obs_shape] (uint8 images or float32 vectors); prev_action [T, B] int64;
        prev_reward [T, B] float32; done [T, B] bool, True where obs[t] starts a new episode;
        core_state (h, c), each [1, B, lstm_size] ([1, B, 0] without LSTM).
        Returns policy_logits [T, B, num_actions] float32, baseline [T, B] float32 and the core
        state after step T-1 (the input state, unchanged, without LSTM).
        """
        T, B = prev_action.shape[0], prev_action.shape[1]
        x = obs.flatten(0, 1)
        if not x.is_floating_point():
            # Pixels in [0, 255]: the torso's first convolution divides by 255. Under autocast
            # the learner hands them over in autocast's dtype instead (ImpalaModule.forward).
            x = x.float()
        x = self.torso(x)  # [T * B, hidden_size]
        one_hot_action = F.one_hot(prev_action.flatten(0, 1), self.num_actions).to(x.dtype)
        reward = prev_reward.flatten(0, 1).clamp(-1, 1).unsqueeze(1).to(x.dtype)
        x = torch.cat([x, reward, one_hot_action], dim=1)  # [T * B, hidden_size + 1 + A]

        if self.use_lstm:
            x = x.view(T, B, -1)
            # The state carried into step t must not leak across an episode boundary.
            not_done = (1 - done.to(x.dtype)).view(T, 1, B, 1)
            h, c = core_state
            outputs: list[Tensor] = []
            for t in range(T):
                output, (h, c) = self.core(x[t].unsqueeze(0), (h * not_done[t], c * not_done[t]))
                outputs.append(output)
            core_state = (h, c)
            x = torch.cat(outputs).flatten(0, 1)  # [T * B, lstm_size]

        # Under autocast the heads may run in reduced precision; the losses want float32.
        policy_logits = self.policy(x).float().view(T, B, self.num_actions)
        baseline = self.baseline(x).float().view(T, B)
        return policy_logits, baseline, core_state

    @torch.jit.export
    def act(
        self,
        obs: Tensor,
        prev_action: Tensor,
        prev_reward: Tensor,
        done: Tensor,
        core_state: tuple[Tensor, Tensor],
        greedy: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, tuple[Tensor, Tensor]]:
        """One step for B environments: forward with T = 1.

        obs [B, *obs_shape]; prev_action [B] int64; prev_reward [B] float32; done [B] bool;
        core_state (h, c), each [1, B, lstm_size]. Returns action [B] int64 (sampled from
        softmax(policy_logits), or the argmax when greedy), policy_logits [B, num_actions],
        baseline [B] and the new core state.
        """
        policy_logits, baseline, core_state = self.forward(
            obs.unsqueeze(0), prev_action.unsqueeze(0), prev_reward.unsqueeze(0), done.unsqueeze(0), core_state
        )
        policy_logits = policy_logits.squeeze(0)
        if greedy:
            action = policy_logits.argmax(dim=1)
        else:
            action = torch.multinomial(F.softmax(policy_logits, dim=1), num_samples=1).squeeze(1)
        return action, policy_logits, baseline.squeeze(0), core_state
