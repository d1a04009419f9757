"""Records one episode of a policy: a GIF at the emulator's full resolution and, when the env
family draws one, a picture of the episode (PNG). Also logs both to TensorBoard.
"""

import dataclasses
from pathlib import Path
from typing import Any

import imageio.v3 as iio
import numpy as np
import torch
from tensorboard.compat.proto.summary_pb2 import Summary

from kart_lightning.envs import EnvConfig, find_family, make_env
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
    """Play one episode on `config` (its first state) and write `gif_path`, plus the env family's
    picture of the episode beside it (`.png`), if it draws one. Returns the episode's result with
    the paths written."""
    config = dataclasses.replace(config, render_mode="rgb_array")
    episode_plot = find_family(config.id).episode_plot
    gif_path.parent.mkdir(parents=True, exist_ok=True)
    env = make_env(config, seed=options.seed)
    try:
        recording = Recording(options.max_frames)
        result = play_episode(policy, env, options.seed, options.greedy, recording)
        if episode_plot is not None:
            # Drawn before the env closes: a picture may read the emulator (a course's map).
            episode_plot(env, recording.infos, gif_path.with_suffix(".png"))
            result["png"] = str(gif_path.with_suffix(".png"))
    finally:
        env.close()
    # GIF keeps frame times in hundredths of a second: round to the nearest rather than truncate.
    # The writer merges identical consecutive frames into one longer frame.
    frame_ms = 10 * round(100 / options.fps)
    iio.imwrite(gif_path, np.stack(recording.frames), extension=".gif", duration=frame_ms, loop=0)
    result["gif"] = str(gif_path)
    return result


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
