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
from kart_lightning.data import ActorPool, TrajectoryDataset
from kart_lightning.envs.factory import env_config_from_dict, env_frames_per_step, make_env
from kart_lightning.module import ImpalaModule

TERMS = ("loss", "policy_loss", "baseline_loss", "entropy_loss")


def gradient_norm(module: ImpalaModule, loss: torch.Tensor) -> float:
    module.zero_grad()
    loss.backward(retain_graph=True)
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


def load(name: str, model: dict, obs_shape: list[int], num_actions: int) -> ImpalaModule:
    if name == "fresh":
        torch.manual_seed(0)
        return ImpalaModule(obs_shape=obs_shape, num_actions=num_actions, **model)
    checkpoint = read_checkpoint(name)
    accepted = ImpalaModule.__init__.__code__.co_varnames
    module = ImpalaModule(**{k: v for k, v in checkpoint["hyper_parameters"].items() if k in accepted})
    module.load_state_dict(checkpoint["state_dict"], strict=False)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/atari.yaml")
    parser.add_argument("--unroll_length", type=int, default=20)
    parser.add_argument("--envs", type=int, default=8, help="envs of the one actor, and unrolls per batch")
    parser.add_argument("--torso", help="the fresh policy's torso (default: the config's)")
    parser.add_argument("--skip", type=int, default=2)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("checkpoints", nargs="+", help="checkpoint files, or `fresh`")
    args = parser.parse_args()

    config = yaml.safe_load(Path(args.config).read_text())
    env = env_config_from_dict(config["data"]["env"])
    model = {k: v for k, v in config.get("model", {}).items() if k not in ("max_frames",)}
    if args.torso:
        model["torso"] = args.torso
    probe = make_env(env)
    obs_shape, num_actions = list(probe.observation_space.shape), int(probe.action_space.n)
    obs_dtype = torch.from_numpy(probe.observation_space.sample()).dtype
    probe.close()
    print(f"batches of {args.envs} unrolls of {args.unroll_length} steps; gradient norms before clipping")
    for name in args.checkpoints:
        module = load(name, model, obs_shape, num_actions)
        pool = ActorPool(policy=module.policy, env=env, obs_shape=obs_shape, obs_dtype=obs_dtype,
                         num_actions=num_actions, num_actors=1, envs_per_actor=args.envs,
                         unroll_length=args.unroll_length, batch_size=args.envs, seed=1, start_method="spawn",
                         inference="actor")
        try:
            data = iter(TrajectoryDataset(pool, env_frames_per_step=env_frames_per_step(env), timeout_s=300))
            batches = [next(data) for _ in range(args.skip + args.batches)][args.skip:]
        finally:
            pool.close()
        for batch in batches:
            losses = module.compute_loss(batch)
            with torch.no_grad():
                log_policy = torch.log_softmax(module(batch)[0][:-1], dim=-1)
                entropy = float(-(log_policy.exp() * log_policy).sum(-1).mean())
            norms = " ".join(f"{term} {gradient_norm(module, losses[term]):7.2f}" for term in TERMS)
            rewards = int((batch["reward"][1:] != 0).sum())
            print(f"{name}: entropy {entropy:.3f} nats, {rewards} rewards; norms: {norms}", flush=True)


if __name__ == "__main__":
    main()
