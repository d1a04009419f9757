"""Emulator frames/s in one process: the bare stable-retro env, and the same game through the
project's wrappers (frame skip with max-pool, RAM reward, crop, resize, grayscale, frame stack).

    python benchmarks/env_speed.py --config configs/impala.yaml [--seconds 20]

Uniform-random actions, no policy, no learning: the ceiling one actor process can reach.
"""

import argparse
import time

import numpy as np
import stable_retro
import yaml

from kart_lightning.envs import env_config_from_dict, env_frames_per_step, make_env, retro_state_names


def frames_per_s(step, seconds: float) -> tuple[float, int]:
    """Call step() (which returns the frames it emulated) for `seconds`; frames/s and frames."""
    frames, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        frames += step()
    return frames / elapsed, frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with open(args.config) as file:
        config = env_config_from_dict(yaml.safe_load(file)["data"]["env"])
    rng = np.random.default_rng(0)

    env = make_env(config)  # registers the game and makes its states when needed
    frames_per_step = env_frames_per_step(config)

    def wrapped_step() -> int:
        _, _, terminated, truncated, _ = env.step(int(rng.integers(env.action_space.n)))
        if terminated or truncated:
            env.reset()
        return frames_per_step

    wrapped, _ = frames_per_s(wrapped_step, args.seconds)
    env.close()

    states = retro_state_names(config)
    raw_env = stable_retro.make(
        config.id, state=states[0] if states else stable_retro.State.DEFAULT,
        inttype=stable_retro.data.Integrations.ALL, use_restricted_actions=stable_retro.Actions.ALL, render_mode=None,
    )
    raw_env.reset(seed=0)
    # Hold one button (B accelerates in Super Mario Kart): START would pause the game.
    hold = np.array([button == "B" for button in raw_env.buttons], dtype=np.int8)

    def raw_step() -> int:
        _, _, terminated, truncated, _ = raw_env.step(hold)
        if terminated or truncated:
            raw_env.reset()
        return 1

    raw, _ = frames_per_s(raw_step, args.seconds)
    raw_env.close()
    print(f"{config.id} {states[:1]}: raw stable-retro env {raw:,.0f} frames/s; "
          f"through the wrappers {wrapped:,.0f} frames/s ({wrapped / frames_per_step:,.0f} agent steps/s, "
          f"frame skip {frames_per_step}); one process, random actions")


if __name__ == "__main__":
    main()
