"""Gradient norms of the three loss terms (policy, baseline, entropy) and of their sum, before any
clipping, on batches that each checkpoint's own policy plays: which term sets the direction of a
step, and how far above `trainer.gradient_clip_val` the sum sits.

    python benchmarks/grad_norms.py --config configs/atari.yaml checkpoints/atari/last.ckpt
    python benchmarks/grad_norms.py --config configs/atari.yaml --torso shallow fresh run_a/last.ckpt run_b/last.ckpt

`fresh` is a new policy of the config's model. Each checkpoint plays with one actor process of
`--envs` envs; the first `--skip` batches are dropped (the envs start at their first frames) and
the next `--batches` printed, one line each. The loss uses each checkpoint's own hyperparameters
(costs, clipping), summed over T x B as in training, so the norms grow with T x B.
"""

import argparse
import sys
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's kart_lightning

from kart_lightning.checkpointing import read_checkpoint
from kart_lightning.data import ActorPool, ImpalaDataModule, TrajectoryDataset
from kart_lightning.envs.factory import env_config_from_dict
from kart_lightning.errors import ConfigError
from kart_lightning.module import ImpalaModule, gradient_norm

TERMS = ("loss", "policy_loss", "baseline_loss", "entropy_loss")


def term_norm(module: ImpalaModule, loss: torch.Tensor) -> float:
    module.zero_grad()
    loss.backward(retain_graph=True)
    return float(gradient_norm(module))


def load(name: str, model: dict, data: ImpalaDataModule) -> ImpalaModule:
    """`fresh`: a new policy of the config's model; else the checkpoint, which must fit the env."""
    if name == "fresh":
        torch.manual_seed(0)
        return ImpalaModule(obs_shape=data.obs_shape, num_actions=data.num_actions, **model)
    hparams = read_checkpoint(name, mmap=True)["hyper_parameters"]  # a ConfigError for anything else
    if list(hparams.get("obs_shape") or []) != data.obs_shape or hparams.get("num_actions") != data.num_actions:
        raise ConfigError(
            f"{name} plays observations {hparams.get('obs_shape')} with {hparams.get('num_actions')} actions, "
            f"and the config's env gives {data.obs_shape} with {data.num_actions}: pass the --config it was trained with."
        )
    return ImpalaModule.load_from_checkpoint(name, map_location="cpu", weights_only=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/atari.yaml")
    parser.add_argument("--unroll_length", type=int, default=20)
    parser.add_argument("--envs", type=int, default=8, help="envs of the one actor, and unrolls per batch")
    parser.add_argument("--torso", choices=["shallow", "deep", "mlp"], help="the fresh policy's torso (default: the config's)")
    parser.add_argument("--skip", type=int, default=2)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("checkpoints", nargs="+", help="checkpoint files, or `fresh`")
    args = parser.parse_args()
    if min(args.unroll_length, args.envs, args.batches) < 1 or args.skip < 0:
        parser.error("--unroll_length, --envs and --batches must be at least 1, and --skip at least 0.")

    try:
        config = yaml.safe_load(Path(args.config).read_text())
        env = env_config_from_dict(config["data"]["env"])
        model = {k: v for k, v in config.get("model", {}).items() if k != "max_frames"}
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        parser.error(f"{args.config} is not a readable config with a data.env section: pass one of configs/.")
    if args.torso:
        model["torso"] = args.torso
    try:
        data = ImpalaDataModule(env=env)
        modules = [load(name, model, data) for name in args.checkpoints]
    except ConfigError as error:
        parser.error(str(error))
    print(f"batches of {args.envs} unrolls of {args.unroll_length} steps; gradient norms before clipping")
    for name, module in zip(args.checkpoints, modules):
        pool = ActorPool(policy=module.policy, env=data.env, obs_shape=data.obs_shape, obs_dtype=data.obs_dtype,
                         num_actions=data.num_actions, num_actors=1, envs_per_actor=args.envs,
                         unroll_length=args.unroll_length, batch_size=args.envs, seed=1, start_method="spawn",
                         inference="actor")
        try:
            stream = iter(TrajectoryDataset(pool, env_frames_per_step=data.env_frames_per_step, timeout_s=300))
            batches = [next(stream) for _ in range(args.skip + args.batches)][args.skip:]
        finally:
            pool.close()
        for batch in batches:
            losses = module.compute_loss(batch)
            with torch.no_grad():
                log_policy = torch.log_softmax(module(batch)[0][:-1], dim=-1)
                entropy = float(-(log_policy.exp() * log_policy).sum(-1).mean())
            norms = " ".join(f"{term} {term_norm(module, losses[term]):7.2f}" for term in TERMS)
            rewards = int((batch["reward"][1:] != 0).sum())
            print(f"{name}: entropy {entropy:.3f} nats, {rewards} rewards; norms: {norms}", flush=True)


if __name__ == "__main__":
    main()
