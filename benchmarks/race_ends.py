"""Where a checkpoint's races stop on a track: for each sampled episode (the seeds `test` plays),
the furthest checkpoint it reached, where that was, and how it spent the steps after it.

    python benchmarks/race_ends.py --ckpt_path checkpoints/impala/last.ckpt --track MarioCircuit.Act2
    python benchmarks/race_ends.py --ckpt_path ... --track MarioCircuit.Act2 --restarts 40 --past 32

With `--restarts N` it plays N races with restarts along the course instead (the first from the
grid, then each from a checkpoint an earlier one passed; see `restart_share`) and counts, per start
checkpoint, the races that got past checkpoint `--past` of the first lap: how often the policy gets
through a place from just before it. `--drivers N` then drives from the states kept at the three
checkpoints up to `--past` without the policy, with the throttle held and N times at random
(accelerating half the time), for whether the place is hard to get through or only hard for it,
and prints the policy's mean action probabilities there (its first 10 steps after reaching `--past`).
Run it alone on the machine.
"""

import argparse
import dataclasses
import random
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's kart_lightning

from kart_lightning.checkpointing import read_checkpoint
from kart_lightning.cli import check_checkpoint
from kart_lightning.envs import make_env
from kart_lightning.envs.factory import env_config_from_dict
from kart_lightning.envs.mario_kart.actions import DRIVE
from kart_lightning.envs.mario_kart.paths import GAME
from kart_lightning.envs.mario_kart.restarts import CheckpointRestarts
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
    # The largest loss of progress in one step after it: the kart put back along the course at
    # once (a jump that lands on an earlier stretch of road) rather than driven back.
    drops = [(before["progress"] - after["progress"], after["checkpoint"])
             for before, after in zip(races[best:], tail)]
    drop, landed = max(drops, default=(0, None))
    return {
        "furthest_checkpoint": races[best]["checkpoint"], "laps": races[best]["laps_completed"],
        "x": races[best]["x"], "y": races[best]["y"], "steps_after": len(tail),
        "wrong_way_after": sum(race["wrong_way"] for race in tail) / max(1, len(tail)),
        "drop": drop, "landed": landed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--track", required=True)
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--restarts", type=int, default=0, help="races with restarts along the course instead")
    parser.add_argument("--past", type=int, help="with --restarts: the first-lap checkpoint to get past")
    parser.add_argument("--drivers", type=int, default=0, help="with --restarts: random drivers per kept state")
    args = parser.parse_args()
    if args.restarts and args.past is None:
        parser.error("--restarts counts the races that get past a checkpoint: name it with --past.")
    if args.drivers and not args.restarts:
        parser.error("--drivers starts from the states that --restarts races keep: add --restarts N --past C.")

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
                      f"{end['steps_after']} steps, {end['wrong_way_after']:.0%} of them the wrong way"
                      + (f"; {end['drop']} checkpoints lost in one step, onto checkpoint {end['landed']}"
                         if end["drop"] > 1 else ""))
            return
        tried, passed, put_back = Counter(), Counter(), Counter()
        for race in range(args.restarts):
            recording = Recording(0)
            play_episode(policy, env, EVAL_SEED + race, False, recording)
            start = "grid" if "restart" not in recording.infos[0] else recording.infos[0]["race"]["checkpoint"]
            # RAM lap 128 is the first lap (127 on the grid, and again after backing over the line).
            through = any(info["lap"] > 128 or info["lap"] == 128 and info["race"]["checkpoint"] > args.past
                          for info in recording.infos[1:])
            tried[start] += 1
            passed[start] += through
            end = race_end(recording.infos)
            if not through and end["drop"] > 1:
                put_back[start] += 1
        for start in sorted(tried, key=lambda start: -1 if start == "grid" else start):
            print(f"from {start}: past checkpoint {args.past} in {passed[start]} of {tried[start]}"
                  + (f"; put back along the course at once in {put_back[start]}" if put_back[start] else ""))
        if args.drivers:
            drive_without_policy(env, args.past, args.drivers)
            policy_actions(policy, env, args.past)
    finally:
        env.close()


def drive_without_policy(env, past: int, drivers: int) -> None:
    """From each state kept at the three checkpoints up to `past`, the throttle held for a race and
    `drivers` random drivers (accelerate ½, accelerate left or right ⅕ each, the rest ¼ among them):
    how many get past `past`, in at most 150 steps each."""
    restarts = env
    while not isinstance(restarts, CheckpointRestarts):
        restarts = restarts.env
    kept = restarts.kept.get(0, {})
    names = list(DRIVE)
    weights = [{"accelerate": 0.5, "accelerate_left": 0.2, "accelerate_right": 0.2}.get(name, 0.1 / (len(names) - 3))
               for name in names]
    throttle, pick = names.index("accelerate"), random.Random(0)
    for start in [start for start in range(past - 2, past + 1) if start in kept]:
        restarts.kept = {0: {start: kept[start]}}  # every restart from this state alone
        results = [through(env, past, lambda: throttle)]
        results += [through(env, past, lambda: pick.choices(range(len(names)), weights)[0]) for _ in range(drivers)]
        print(f"from {start} without the policy: throttle held {'gets' if results[0] else 'does not get'} past "
              f"checkpoint {past}; random drivers get past in {sum(results[1:])} of {drivers}")


def policy_actions(policy, env, past: int, races: int = 10) -> None:
    """The policy's action probabilities on its way through: averaged over the first 10 steps after
    reaching checkpoint `past` on the first lap (the throttle held crosses ~7 steps past it on
    Mario Circuit 2's jump) of `races` races restarted from the states `drive_without_policy` used."""
    restarts = env
    while not isinstance(restarts, CheckpointRestarts):
        restarts = restarts.env
    kept = {start: state for start, state in restarts.kept.get(0, {}).items() if past - 2 <= start <= past}
    probabilities = []
    torch.manual_seed(EVAL_SEED)
    for race in range(races):
        restarts.kept = {0: dict(kept)}
        obs, info = env.reset()
        action, reward = torch.zeros(1, dtype=torch.int64), torch.zeros(1)
        done, core_state = torch.ones(1, dtype=torch.bool), policy.initial_state(1)
        approach = 0
        for _ in range(150):
            action, logits, _, core_state = policy.act(torch.from_numpy(np.asarray(obs)).unsqueeze(0), action, reward, done,
                                                       core_state, False)
            if info["race"]["checkpoint"] == past and info["race"]["laps_completed"] == 0 and approach < 10:
                probabilities.append(torch.softmax(logits[0], 0))
                approach += 1
            obs, step_reward, terminated, truncated, info = env.step(int(action))
            reward.fill_(float(step_reward))
            done.fill_(False)
            if terminated or truncated or info["race"]["checkpoint"] > past:
                break
    if probabilities:
        mean = torch.stack(probabilities).mean(0)
        print(f"the policy at checkpoint {past} ({len(probabilities)} steps of {races} races): "
              + ", ".join(f"{name} {share:.2f}" for name, share in zip(DRIVE, mean.tolist())))


def through(env, past: int, action, steps: int = 150) -> bool:
    env.reset()  # restart_share 0.99: from the one kept state (a 1 in 100 grid start shows as no pass)
    for _ in range(steps):
        _, _, terminated, truncated, info = env.step(action())
        if info["lap"] > 128 or info["lap"] == 128 and info["race"]["checkpoint"] > past:
            return True
        if terminated or truncated:
            return False
    return False


if __name__ == "__main__":
    main()
