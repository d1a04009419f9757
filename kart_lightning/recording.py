"""Records one episode of a policy: a GIF at the emulator's full resolution and, for Super Mario
Kart, the kart's path over the track's map coloured by speed (PNG). Also logs both to TensorBoard.
"""

import dataclasses
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import torch
from tensorboard.compat.proto.summary_pb2 import Summary

from kart_lightning.envs.factory import EnvConfig, make_env
from kart_lightning.evaluation import Recording, play_episode


@dataclasses.dataclass
class RecordOptions:
    """How a recorded episode is played and written.

    Args:
        fps: GIF frames per second; 15 plays a frame skip of 4 at the game's speed (60 frames/s).
        max_frames: GIF frames kept (one per agent step, from the start); the episode plays on to
            its end for its result and path.
        greedy: act with the most likely action instead of sampling.
        seed: the episode's seed.
    """

    fps: float = 15.0
    max_frames: int = 900
    greedy: bool = False
    seed: int = 1_000_000


def record_episode(
    policy: torch.jit.ScriptModule, config: EnvConfig, gif_path: Path, options: RecordOptions
) -> dict[str, Any]:
    """Play one episode on `config` (its first state) and write `gif_path`, plus a trajectory PNG
    beside it (`.png`) for a race. Returns the episode's result with the paths written."""
    config = dataclasses.replace(config, render_mode="rgb_array")
    env = make_env(config, seed=options.seed)
    try:
        recording = Recording(options.max_frames)
        result = play_episode(policy, env, options.seed, options.greedy, recording)
        track_image = _track_image(env) if recording.path else None
    finally:
        env.close()
    gif_path.parent.mkdir(parents=True, exist_ok=True)
    # GIF keeps frame times in hundredths of a second: round to the nearest rather than truncate.
    # The writer merges identical consecutive frames into one longer frame.
    frame_ms = 10 * round(100 / options.fps)
    iio.imwrite(gif_path, np.stack(recording.frames), extension=".gif", duration=frame_ms, loop=0)
    result["gif"] = str(gif_path)
    if track_image is not None:
        from kart_lightning.envs.mario_kart.track_map import plot_trajectory

        png_path = gif_path.with_suffix(".png")
        xs, ys, speeds = zip(*recording.path, strict=True)
        plot_trajectory(track_image, xs, ys, speeds, path=png_path)
        result["png"] = str(png_path)
    return result


def _track_image(env) -> np.ndarray:
    # Imported here: only races have a map, and reading it needs the emulator of a Mario Kart env.
    from kart_lightning.envs.mario_kart.track_map import track_map

    return track_map(env.unwrapped)


def log_recording(logger, tag: str, result: dict[str, Any], step: int) -> None:
    """Log a recording's GIF (animated, in TensorBoard's Images tab) and trajectory PNG, when the
    logger writes TensorBoard events (its `experiment` a SummaryWriter)."""
    writer = getattr(getattr(logger, "experiment", None), "file_writer", None)
    if writer is None:
        return
    gif = Path(result["gif"])
    _, height, width, _ = iio.improps(gif).shape
    # SummaryWriter.add_video would re-encode through moviepy; an image summary holding GIF bytes
    # is what it writes in the end, and TensorBoard plays it.
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif.read_bytes())
    writer.add_summary(Summary(value=[Summary.Value(tag=f"{tag}/gif", image=image)]), step)
    if "png" in result:
        trajectory = iio.imread(result["png"])[..., :3]
        logger.experiment.add_image(f"{tag}/trajectory", trajectory, step, dataformats="HWC")
