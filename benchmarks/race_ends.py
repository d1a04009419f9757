"""Where a checkpoint's races stop on a track: for each sampled episode (the seeds `test` plays),
the furthest checkpoint it reached, where that was, and how it spent the steps after it.

    python benchmarks/race_ends.py --ckpt_path checkpoints/impala/last.ckpt --track MarioCircuit.Act2
    python benchmarks/race_ends.py --ckpt_path ... --track MarioCircuit.Act2 --restarts 40 --past 30
    python benchmarks/race_ends.py --ckpt_path ... --track MarioCircuit.Act2 --restarts 40 --past 30 --drivers 30
    python benchmarks/race_ends.py ... --restarts 40 --past 30 --drivers 10 --map docs/mc2-jump.png
    python benchmarks/race_ends.py --ckpt_path ... --track MarioCircuit.Act2 --restarts 40 --past 30 --epsilon 0.05

With `--restarts N` it plays N races with restarts along the course instead (the first from the
grid, then each from a checkpoint an earlier one passed; see `restart_share`) and counts, per start
checkpoint, the races that got past checkpoint `--past` of the first lap: how often the policy gets
through a place from just before it. `--drivers N` then drives from the states kept at the three
checkpoints up to `--past` without the policy, with the throttle held and N times at random
(accelerating half the time), for whether the place is hard to get through or only hard for it,
and prints the policy's mean action probabilities there (its first 10 steps at `--past`);
`--map PNG` draws those races over the course seen from above.
`--epsilon E` drives every race with the policy and εz-greedy holds on top (`data.exploration`
with epsilon E, as the actors of `fit` would): how often the behaviour that training sees gets
through.
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
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this checkout's kart_lightning

from kart_lightning.checkpointing import read_checkpoint
from kart_lightning.cli import check_checkpoint
from kart_lightning.data.exploration import ExplorationConfig, HeldActions
from kart_lightning.envs import make_env
from kart_lightning.envs.factory import env_config_from_dict
from kart_lightning.envs.mario_kart.actions import ACTION_SETS
from kart_lightning.envs.mario_kart.config import MarioKartConfig
from kart_lightning.envs.mario_kart.paths import GAME
from kart_lightning.envs.mario_kart.restarts import FIRST_LAP
from kart_lightning.envs.mario_kart.track_map import map_pixels, track_map
from kart_lightning.errors import ConfigError
from kart_lightning.evaluation import Recording, play_episode
from kart_lightning.module import ImpalaModule

EVAL_SEED = 1_000_000
"""The first seed `test` plays (data.eval_seed's default)."""


def race_end(infos: list[dict]) -> dict:
    """The furthest point of one race (its first step there) and the steps after it, with the most
    checkpoints lost in one step after it (`drop`) and the checkpoint that step landed on."""
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
    parser.add_argument("--drivers", type=int, default=0, help="with --restarts: from the states kept just before "
                        "--past, the throttle held, this many random drivers, and the policy's action probabilities")
    parser.add_argument("--map", help="with --drivers: a PNG of their paths and the policy's over the course")
    parser.add_argument("--epsilon", type=float, default=0.0,
                        help="drive with εz-greedy holds on top of the policy (data.exploration.epsilon)")
    args = parser.parse_args()
    if args.restarts and args.past is None:
        parser.error("--restarts counts the races that get past a checkpoint: name it with --past.")
    if args.drivers and not args.restarts:
        parser.error("--drivers starts from the states that --restarts races keep: add --restarts N --past C.")
    if args.map and not args.drivers:
        parser.error("--map draws the --drivers races: add --restarts N --past C --drivers D.")
    if args.past is not None and not args.restarts:
        parser.error("--past counts restarted races: add --restarts N, or leave --past out.")
    if min(args.episodes, args.restarts, args.drivers) < 0 or args.episodes == 0:
        parser.error("--episodes must be at least 1, and --restarts and --drivers at least 0.")

    try:
        check_checkpoint(args.ckpt_path, None)
        data = read_checkpoint(args.ckpt_path).get("datamodule_hyper_parameters") or {}
        if "env" not in data or env_config_from_dict(data["eval_env"] or data["env"]).id != GAME:
            raise ConfigError(f"{args.ckpt_path} is not a Super Mario Kart checkpoint: pass one written by "
                              "kart_lightning fit with configs/impala.yaml or another Mario Kart config.")
        config = dataclasses.replace(env_config_from_dict(data["eval_env"] or data["env"]), retro_state=args.track)
        options = config.options
        options = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options)
        if args.restarts:
            # Restarts from any kept checkpoint, whatever the run trained with: the tally is per start.
            config = dataclasses.replace(config, options={**options, "restart_share": 0.99, "restart_from": "anywhere"})
        exploration = ExplorationConfig(epsilon=args.epsilon)
        exploration.check()
        env = make_env(config, seed=EVAL_SEED)  # an unknown track is a ConfigError naming the known ones
    except ConfigError as error:
        parser.error(str(error))
    policy = ImpalaModule.load_from_checkpoint(args.ckpt_path, map_location="cpu", weights_only=True).policy
    # The races drive with the holds on top; the action probabilities printed are the policy's own.
    driver = ExploringPolicy(policy, exploration) if args.epsilon else policy
    try:
        if not args.restarts:
            for seed in range(EVAL_SEED, EVAL_SEED + args.episodes):
                recording = Recording(0)
                result = play_episode(driver, env, seed, False, recording)
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
            play_episode(driver, env, EVAL_SEED + race, False, recording)
            start = "grid" if "restart" not in recording.infos[0] else recording.infos[0]["race"]["checkpoint"]
            passed_it = any(got_past(info, args.past) for info in recording.infos[1:])
            tried[start] += 1
            passed[start] += passed_it
            end = race_end(recording.infos)
            if not passed_it and end["drop"] > 1:
                put_back[start] += 1
        for start in sorted(tried, key=lambda start: -1 if start == "grid" else start):
            print(f"from {start}: past checkpoint {args.past} in {passed[start]} of {tried[start]}"
                  + (f"; put back along the course at once in {put_back[start]}" if put_back[start] else ""))
        if args.drivers:
            kept = env.get_wrapper_attr("kept").get(0, {})
            kept = {start: kept[start] for start in range(args.past - 2, args.past + 1) if start in kept}
            if not kept:
                print(f"no race reached checkpoints {args.past - 2}-{args.past}: nothing to drive from.")
                return
            defaults = MarioKartConfig()
            actions = list(ACTION_SETS[options.get("actions", defaults.actions)])
            # A run that never cuts a race (stall_steps null) still bounds these tries by the default.
            steps = options.get("stall_steps", defaults.stall_steps) or defaults.stall_steps
            races = drive_without_policy(env, kept, args.past, args.drivers, actions, steps)
            races += policy_actions(policy, env, kept, args.past, actions)
            if args.map:
                draw_map(env, next(iter(kept.values())), races, args.map)
    finally:
        env.close()


def got_past(info: dict, past: int) -> bool:
    """Whether a step's info is past checkpoint `past` of the first lap (RAM lap FIRST_LAP; 127 on
    the grid, and again after backing over the line)."""
    return info["lap"] > FIRST_LAP or info["lap"] == FIRST_LAP and info["race"]["checkpoint"] > past


def reset_to(env, state: bytes):
    """Reset `env` (restart_share 0.99) to `state` alone: its CheckpointRestarts keeps only it, and
    a draw that started on the grid (1 in 100) is drawn again."""
    while True:
        env.set_wrapper_attr("kept", {0: {0: state}})
        obs, info = env.reset()
        if info.get("restart"):
            return obs, info


def drive_without_policy(env, kept: dict[int, bytes], past: int, drivers: int, actions: list[str],
                         steps: int) -> list[tuple[str, bool, list]]:
    """From each state in `kept` (checkpoint -> emulator state), one race with the throttle held and
    `drivers` with random actions (accelerate ½, accelerate left or right ⅕ each, the others sharing
    the rest): how many get past `past` within `steps` agent steps. Returns each race as (driver,
    got past, its positions)."""
    weights = {"accelerate": 0.5, "accelerate_left": 0.2, "accelerate_right": 0.2}
    rest = (1 - sum(weights.values())) / (len(actions) - len(weights))
    weights = [weights.get(name, rest) for name in actions]
    throttle = actions.index("accelerate")
    driven = []
    for start, state in kept.items():
        pick = random.Random(start)
        held = through(env, state, past, lambda: throttle, steps)
        randomly = [through(env, state, past, lambda pick=pick: pick.choices(range(len(actions)), weights)[0], steps)
                    for _ in range(drivers)]
        print(f"from {start} without the policy: throttle held {'gets' if held[0] else 'does not get'} past "
              f"checkpoint {past}; random drivers get past in {sum(race[0] for race in randomly)} of {drivers}")
        driven += [("throttle", *held)] + [("random", *race) for race in randomly]
    return driven


def through(env, state: bytes, past: int, action, steps: int) -> tuple[bool, list]:
    """One race from `state` with `action()` each step: whether it gets past `past` in `steps`, and
    its positions (approach_path)."""
    reset_to(env, state)
    infos, passed = [], False
    for _ in range(steps):
        _, _, terminated, truncated, info = env.step(action())
        infos.append(info)
        passed = passed or got_past(info, past)
        if terminated or truncated:
            break
        if passed and len(infos) > len(approach_path(infos, past)):  # as far as the map draws it
            break
    return passed, approach_path(infos, past)


def approach_path(infos: list[dict], past: int, after: int = 40) -> list[tuple[int, int]]:
    """The positions (RAM x, y) of a race's steps up to `after` steps beyond its first at checkpoint
    `past` of the first lap or beyond it: how it got to the place and what it did there."""
    at = next((step for step, info in enumerate(infos) if "lap" in info and got_past(info, past - 1)), len(infos))
    return [(info["race"]["x"], info["race"]["y"]) for info in infos[:at + after] if "race" in info]


def draw_map(env, state: bytes, races: list[tuple[str, bool, list]], out: str) -> None:
    """The course from above (read with `state` loaded) with `races` (driver, got past, positions):
    the throttle held white, random drivers green where they got past and red where not, the
    policy blue and yellow; saved as a PNG at `out`."""
    reset_to(env, state)
    image = Image.fromarray(track_map(env))
    draw = ImageDraw.Draw(image)
    colours = {"throttle": ((255, 255, 255),) * 2, "random": ((230, 40, 40), (40, 220, 40)),
               "policy": ((255, 220, 0), (40, 120, 255))}
    for driver, passed, path in races:
        columns, rows = map_pixels(np.array([x for x, _ in path]), np.array([y for _, y in path]), image.width)
        draw.line(list(zip(columns.tolist(), rows.tolist())), fill=colours[driver][passed], width=3)
    image.save(out)
    print(f"the races drawn over the course: {out}")


class ExploringPolicy:
    """The policy with εz-greedy holds on top, as an actor of `fit` drives it (`data.exploration`)."""

    def __init__(self, policy: torch.jit.ScriptModule, exploration: ExplorationConfig):
        self.policy = policy
        self.holds = HeldActions(exploration, num_envs=1)

    def parameters(self):
        return self.policy.parameters()

    def initial_state(self, batch_size: int):
        return self.policy.initial_state(batch_size)

    def act(self, obs, prev_action, reward, done, *rest):
        action, logits, baseline, core_state = self.policy.act(obs, prev_action, reward, done, *rest)
        action, logits = self.holds(action, logits, done)
        return action, logits, baseline, core_state


class WatchedPolicy:
    """The policy as `play_episode` drives it, keeping the action probabilities of every step."""

    def __init__(self, policy: torch.jit.ScriptModule):
        self.policy = policy
        self.probabilities: list[torch.Tensor] = []

    def parameters(self):
        return self.policy.parameters()

    def initial_state(self, batch_size: int):
        return self.policy.initial_state(batch_size)

    def act(self, *args):
        action, logits, baseline, core_state = self.policy.act(*args)
        self.probabilities.append(torch.softmax(logits[0], 0))
        return action, logits, baseline, core_state


def policy_actions(policy, env, kept: dict[int, bytes], past: int, actions: list[str],
                   races_per_state: int = 5, approach: int = 10) -> list[tuple[str, bool, list]]:
    """The policy's mean action probabilities over its first `approach` steps at checkpoint `past`
    of the first lap, in `races_per_state` sampled races (`play_episode`, seeds EVAL_SEED on) from
    each state in `kept`; a race the 1-in-100 draw started on the grid is left out. Returns the
    races as ("policy", got past, positions)."""
    probabilities, races, drawn = [], 0, []
    for state in kept.values():
        for race in range(races_per_state):
            env.set_wrapper_attr("kept", {0: {0: state}})
            watched, recording = WatchedPolicy(policy), Recording(0)
            play_episode(watched, env, EVAL_SEED + race, False, recording)
            if not recording.infos[0].get("restart"):
                continue
            races += 1
            # infos[i] is what the policy saw before its step i; a restart's first info (stable-retro's
            # reset gives none of its own) has no "lap": it starts on the first lap.
            before = next((i for i, info in enumerate(recording.infos) if i and got_past(info, past)), None)
            at = [i for i, info in enumerate(recording.infos[:before][:len(watched.probabilities)])
                  if info.get("lap", FIRST_LAP) == FIRST_LAP and info["race"]["checkpoint"] == past]
            probabilities += [watched.probabilities[i] for i in at[:approach]]
            drawn.append(("policy", before is not None, approach_path(recording.infos, past)))
    if not probabilities:
        print(f"the policy reached checkpoint {past} in none of {races} races from the kept states.")
        return drawn
    mean = torch.stack(probabilities).mean(0)
    passed = sum(got_past_it for _, got_past_it, _ in drawn)
    print(f"the policy over its first {approach} steps at checkpoint {past} ({len(probabilities)} steps of "
          f"{races} races from the kept states, {passed} of which got past it): "
          + ", ".join(f"{name} {share:.2f}" for name, share in zip(actions, mean.tolist())))
    return drawn


if __name__ == "__main__":
    main()
