"""A reference learner on kart_lightning's own env: Stable-Baselines3's A2C with RL Zoo's Atari
settings, trained on the envs `fit` builds from a config, so that a learning curve of `fit` can
be set beside another algorithm's on exactly the same frames, rewards and preprocessing.

    pip install -e ".[reference]"      # Stable-Baselines3
    python benchmarks/reference_a2c.py --config configs/atari.yaml --frames 20000000 --logdir runs/pong-a2c

RL Zoo's A2C settings for Atari (rl-baselines3-zoo, hyperparams/a2c.yml): 16 envs, 5 steps per
update (80 steps a batch), lr 0.0007, RMSProp as TensorFlow has it (eps 1e-5), entropy cost 0.01,
value cost 0.25, gradient clip 0.5 on the batch-mean loss. The envs are `make_env`'s, with the
config's frame skip, stack, no-op reset and episode limit, in one process (a DummyVecEnv); image
envs get SB3's Nature CNN, vector envs its MLP.

It writes `env_frames` and `train/episode_return` (the mean of the last 100 episodes) to
TensorBoard under `--logdir`, the tags `fit` writes, so `benchmarks/curve.py --key return` plots
both. Env frames are agent steps × the frame skip, as `fit` counts them.
"""

import argparse
import sys
import time
from collections import deque
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's kart_lightning

from kart_lightning.envs.factory import env_config_from_dict, env_frames_per_step, make_env
from kart_lightning.errors import ConfigError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/atari.yaml", help="a fit config; its data.env is trained on")
    parser.add_argument("--frames", type=int, default=20_000_000, help="env frames to train for")
    parser.add_argument("--envs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--logdir", required=True)
    args = parser.parse_args()
    try:
        from stable_baselines3 import A2C
        from stable_baselines3.common.callbacks import BaseCallback
        from stable_baselines3.common.sb2_compat.rmsprop_tf_like import RMSpropTFLike
        from stable_baselines3.common.vec_env import DummyVecEnv
    except ImportError as error:
        parser.error(f"this benchmark needs Stable-Baselines3 ({error}): pip install -e \".[reference]\" (or stable-baselines3)")
    from torch.utils.tensorboard import SummaryWriter

    try:
        env_dict = dict(yaml.safe_load(Path(args.config).read_text())["data"]["env"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as error:
        parser.error(f"{args.config} is not a readable fit config with data.env ({error}): pass one from configs/.")
    if args.frames < 1 or args.envs < 1:
        parser.error("--frames and --envs must be at least 1.")
    try:
        config = env_config_from_dict(env_dict)
        skip = env_frames_per_step(config)
        envs = DummyVecEnv([
            (lambda index=index: make_env(config, seed=args.seed * 1000 + index, env_index=index))
            for index in range(args.envs)
        ])
    except ConfigError as error:
        parser.error(str(error))
    model = A2C(
        "CnnPolicy" if len(envs.observation_space.shape) == 3 else "MlpPolicy", envs, learning_rate=7e-4, n_steps=5, gamma=0.99, gae_lambda=1.0,
        ent_coef=0.01, vf_coef=0.25, max_grad_norm=0.5,
        policy_kwargs={"optimizer_class": RMSpropTFLike, "optimizer_kwargs": {"eps": 1e-5}},
        seed=args.seed, device="cpu", verbose=0,
    )
    writer = SummaryWriter(args.logdir)
    returns: deque[float] = deque(maxlen=100)
    started = time.monotonic()

    class Log(BaseCallback):
        def _on_step(self) -> bool:
            for info in self.locals["infos"]:
                if "episode" in info:
                    returns.append(float(info["episode"]["r"]))
            if self.n_calls % 200 == 0:
                frames = self.num_timesteps * skip
                writer.add_scalar("env_frames", frames, self.n_calls)
                writer.add_scalar("frames_per_s", frames / (time.monotonic() - started), self.n_calls)
                if returns:
                    writer.add_scalar("train/episode_return", sum(returns) / len(returns), self.n_calls)
            if self.n_calls % 20_000 == 0 and returns:
                frames = self.num_timesteps * skip
                print(f"{frames / 1e6:.2f}M env frames, {(time.monotonic() - started) / 60:.1f} min: "
                      f"mean return of the last {len(returns)} episodes {sum(returns) / len(returns):.1f}", flush=True)
            return True

    model.learn(total_timesteps=args.frames // skip, callback=Log())
    writer.close()


if __name__ == "__main__":
    main()
