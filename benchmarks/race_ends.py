"""Where a checkpoint's races stop on a track: for each sampled episode (the seeds `test` plays),
the furthest checkpoint it reached, where that was, and how it spent the steps after it.

    python benchmarks/race_ends.py --ckpt_path checkpoints/impala/last.ckpt --track MarioCircuit.Act2
    python benchmarks/race_ends.py --ckpt_path ... --track MarioCircuit.Act2 --restarts 40 --past 32

With `--restarts N` it plays N races with restarts along the course instead (the first from the
grid, then each from a checkpoint an earlier one passed; see `restart_share`) and counts, per start
checkpoint, the races that got past checkpoint `--past` of the first lap: how often the policy gets
through a place from just before it. Run it alone on the machine.
"""

import argparse
import dataclasses
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's kart_lightning

from kart_lightning.checkpointing import read_checkpoint
from kart_lightning.cli import check_checkpoint
from kart_lightning.envs import make_env
from kart_lightning.envs.factory import env_config_from_dict
from kart_lightning.envs.mario_kart.paths import GAME
from kart_lightning.errors import ConfigError
from kart_lightning.evaluation import Recording, play_episode
from kart_lightning.module import ImpalaModule

EVAL_SEED = 1_000_000
"""The first seed `test` plays (data.eval_seed's default)."""


def race_end(infos: list[dict]) -> dict:
    """The furthest point of one race (its first step there) and the steps after it."""
    races = [info["race"] for info in infos if "race" in info]
    best = max(range(len(races)), key=lambda step: (races[step]["progress"], -step))
    tail = races[best + 1:]
    return {
        "furthest_checkpoint": races[best]["checkpoint"], "laps": races[best]["laps_completed"],
        "x": races[best]["x"], "y": races[best]["y"], "steps_after": len(tail),
        "wrong_way_after": sum(race["wrong_way"] for race in tail) / max(1, len(tail)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--track", required=True)
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--restarts", type=int, default=0, help="races with restarts along the course instead")
    parser.add_argument("--past", type=int, help="with --restarts: the first-lap checkpoint to get past")
    args = parser.parse_args()
    if args.restarts and args.past is None:
        parser.error("--restarts counts the races that get past a checkpoint: name it with --past.")

    try:
        check_checkpoint(args.ckpt_path, None)
        data = read_checkpoint(args.ckpt_path).get("datamodule_hyper_parameters") or {}
        if "env" not in data or env_config_from_dict(data["eval_env"] or data["env"]).id != GAME:
            raise ConfigError(f"{args.ckpt_path} is not a Super Mario Kart checkpoint: pass one written by "
                              "kart_lightning fit with configs/impala.yaml or another Mario Kart config.")
        config = dataclasses.replace(env_config_from_dict(data["eval_env"] or data["env"]), retro_state=args.track)
        if args.restarts:
            options = config.options
            options = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options)
            config = dataclasses.replace(config, options={**options, "restart_share": 0.99})
        env = make_env(config, seed=EVAL_SEED)  # an unknown track is a ConfigError naming the known ones
    except ConfigError as error:
        parser.error(str(error))
    policy = ImpalaModule.load_from_checkpoint(args.ckpt_path, map_location="cpu", weights_only=True).policy
    try:
        if not args.restarts:
            for seed in range(EVAL_SEED, EVAL_SEED + args.episodes):
                recording = Recording(0)
                result = play_episode(policy, env, seed, False, recording)
                end = race_end(recording.infos)
                print(f"seed {seed}: {result['checkpoints']} checkpoints net; furthest checkpoint "
                      f"{end['furthest_checkpoint']} on lap {end['laps'] + 1} at x {end['x']} y {end['y']}, then "
                      f"{end['steps_after']} steps, {end['wrong_way_after']:.0%} of them the wrong way")
            return
        tried, passed = Counter(), Counter()
        for race in range(args.restarts):
            recording = Recording(0)
            play_episode(policy, env, EVAL_SEED + race, False, recording)
            start = "grid" if "restart" not in recording.infos[0] else recording.infos[0]["race"]["checkpoint"]
            # RAM lap 128 is the first lap (127 on the grid, and again after backing over the line).
            through = any(info["lap"] > 128 or info["lap"] == 128 and info["race"]["checkpoint"] > args.past
                          for info in recording.infos[1:])
            tried[start] += 1
            passed[start] += through
        for start in sorted(tried, key=lambda start: -1 if start == "grid" else start):
            print(f"from {start}: past checkpoint {args.past} in {passed[start]} of {tried[start]}")
    finally:
        env.close()


if __name__ == "__main__":
    main()
