"""Data augmentation of the learner's batches: shifted frames (RAD, Laskin et al. 2020; DrAC,
Raileanu et al. 2020), so the policy cannot key on where things sit on the screen, or unrolls
mirrored left to right with their actions, a track the agent has not driven for each it has.
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


def mirror(batch: dict[str, Tensor], mirrored_actions: Tensor, flip: Tensor) -> dict[str, Tensor]:
    """The unrolls of `batch` where `flip` [B] bool is set, mirrored left to right: their frames
    `obs` [T+1, B, C, H, W] flipped along W, and `action`, `prev_action` [T+1, B] and
    `behaviour_logits` [T+1, B, A] mapped to the mirrored actions (`mirrored_actions` [A] int64, a
    permutation: action a mirrored is mirrored_actions[a]). A flipped unroll is one acted by μ's
    mirror image on the mirrored course: μ of the mirrored action on the mirrored frames is μ of the
    action taken. The other fields and unrolls are unchanged (`truncation_value` too: the value of
    the frames as they were, the same on a game that plays the same mirrored); `batch` is not
    written to."""
    # Unroll by unroll: a where() over the whole [T+1, B, C, H, W] batch takes 7x as long on a CPU.
    flipped = flip.nonzero().flatten().tolist()  # no wait on a GPU when `flip` is on the CPU
    flip = flip.to(batch["obs"].device)
    mirrored_actions = mirrored_actions.to(batch["action"].device)
    mirrored = dict(batch)
    obs = mirrored["obs"] = batch["obs"].clone()
    for unroll in flipped:
        obs[:, unroll] = obs[:, unroll].flip(-1)
    for name in ("action", "prev_action"):
        mirrored[name] = torch.where(flip[None, :], mirrored_actions[batch[name]], batch[name])
    # Column mirrored_actions[a] of the new logits is column a of the old.
    logits = batch["behaviour_logits"]
    mirrored["behaviour_logits"] = torch.where(flip[None, :, None], logits[..., mirrored_actions.argsort()], logits)
    return mirrored
