"""Data augmentation of the learner's observations (RAD, Laskin et al. 2020; DrAC, Raileanu et al.
2020): the policy learns from shifted frames, so it cannot key on where things sit on the screen.
Only training batches are augmented; actors and evaluation see the frames as they are."""

import torch
from torch import Tensor


def random_shift(obs: Tensor, pad: int, generator: torch.Generator | None = None) -> Tensor:
    """Pad-and-crop: each observation of `obs` [..., C, H, W] (any dtype) moves by its own random
    offset of up to `pad` pixels in each direction, its edge pixels repeated into the gap (as
    padding with `replicate` and cropping back to H x W would). All C channels of one
    observation (its stacked frames) move together. Same shape and dtype as `obs`."""
    if pad <= 0:
        return obs
    *lead, channels, height, width = obs.shape
    flat = obs.reshape(-1, channels, height, width)
    count = flat.shape[0]
    offsets = torch.randint(-pad, pad + 1, (count, 2), generator=generator)
    rows = (torch.arange(height) + offsets[:, :1]).clamp_(0, height - 1)  # [N, H]
    cols = (torch.arange(width) + offsets[:, 1:]).clamp_(0, width - 1)  # [N, W]
    rows = rows.to(obs.device)[:, None, :, None].expand(count, channels, height, width)
    cols = cols.to(obs.device)[:, None, None, :].expand(count, channels, height, width)
    shifted = torch.gather(torch.gather(flat, 2, rows), 3, cols)
    return shifted.reshape(*lead, channels, height, width)
