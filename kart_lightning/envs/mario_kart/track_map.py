"""The course's top-down map, read from the running emulator's Mode 7 plane, and the kart's path drawn on it.

The map comes from the game itself (VRAM and CGRAM in the snes9x savestate), never from shipped files.
"""

from pathlib import Path

import gymnasium
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure

# The snes9x savestate (stable-retro 1.0.1's env.em.get_state()): a magic line with the format
# version, then blocks b"NAM:" + 6 decimal digits of length + b":" + data. Source: snes9x snapshot.cpp.
SNAPSHOT_MAGIC = b"#!s9xsnp:0009\n"
"""Format 9: version 11 inserts CGSavedByte before CGDATA, which would move the palette."""
BLOCK_HEADER_BYTES = 11
VRAM_BLOCK = "VRA"
"""64 KiB of VRAM, word i at bytes 2i (low) and 2i + 1 (high)."""
PPU_BLOCK = "PPU"
"""snes9x's SnapPPU fields in order, integers big-endian: VMA and WRAM (14 bytes), four BGs (11 bytes
each), BGMode, BG3Priority, CGFLIP, CGFLIPRead, CGADD (1 byte each), then CGDATA (256 words)."""
PPU_BG_MODE_OFFSET = 58
PPU_CGDATA_OFFSET = 63
MODE_7 = 7

PLANE_TILES = 128
TILE_PIXELS = 8
PLANE_PIXELS = PLANE_TILES * TILE_PIXELS
"""A Mode 7 plane is 128 x 128 tiles of 8 x 8 pixels: Super Mario Kart's whole course."""

RAM_UNITS_PER_PIXEL = 4
"""RAM `x` and `y` count quarter pixels of the plane: the kart at (x, y) is over plane pixel
(x / 4, y / 4). Measured (NOTES.md): the grid and the lap line of Mario Circuit 4 and the road
under the driven path."""


class NotOnACourseError(RuntimeError):
    """The emulator is not showing a course (a menu, say), so there is no Mode 7 plane to read."""


def snapshot_blocks(state: bytes) -> dict[str, bytes]:
    """The named blocks of a snes9x format 9 savestate `state` (env.em.get_state()): name -> data."""
    if not state.startswith(SNAPSHOT_MAGIC):
        raise ValueError(
            f"The emulator's savestate starts {state[:14]!r}, not {SNAPSHOT_MAGIC!r}: track_map reads "
            "the snes9x format of stable-retro 1.0.1; check the PPU block offsets for this version."
        )
    blocks = {}
    position = len(SNAPSHOT_MAGIC)
    while position < len(state):
        header = state[position : position + BLOCK_HEADER_BYTES]
        name, length = header[:3].decode("ascii"), int(header[4:10])
        start = position + BLOCK_HEADER_BYTES
        blocks[name] = state[start : start + length]
        position = start + length
    return blocks


def mode7_plane(vram: bytes) -> np.ndarray:
    """`[1024, 1024] uint8` palette indices of the Mode 7 plane in `vram` (64 KiB).

    The low byte of VRAM word i < 0x4000 is the tile at map cell (i % 128, i // 128); the high
    byte of word 64 * t + p is pixel p (row-major) of tile t.
    """
    words = np.frombuffer(vram, np.uint8)[: 2 * PLANE_TILES * PLANE_TILES].reshape(-1, 2)
    tile_map = words[:, 0].reshape(PLANE_TILES, PLANE_TILES)
    tiles = words[:, 1].reshape(-1, TILE_PIXELS, TILE_PIXELS)
    # [tile row, tile column, pixel row, pixel column] -> [plane row, plane column]
    return tiles[tile_map].transpose(0, 2, 1, 3).reshape(PLANE_PIXELS, PLANE_PIXELS)


def palette_rgb(cgram: bytes) -> np.ndarray:
    """`[256, 3] uint8` RGB of the 256 BGR555 colours in `cgram` (big-endian words, as snes9x saves
    them), scaled by 8 as stable-retro's screen shows them."""
    colours = np.frombuffer(cgram, ">u2")
    channels = np.stack([colours & 31, (colours >> 5) & 31, (colours >> 10) & 31], axis=-1)
    return (channels << 3).astype(np.uint8)


def track_map(env: gymnasium.Env) -> np.ndarray:
    """`[1024, 1024, 3] uint8`: the whole course seen from above, as the emulator of `env` holds it now.

    `env` is a Super Mario Kart env (any wrapping) during a race; row r, column c is plane pixel
    (c, r), which map_pixels gives for a RAM position.
    """
    blocks = snapshot_blocks(env.unwrapped.em.get_state())
    ppu = blocks[PPU_BLOCK]
    if ppu[PPU_BG_MODE_OFFSET] != MODE_7:
        raise NotOnACourseError(
            f"The screen is in background mode {ppu[PPU_BG_MODE_OFFSET]}, not Mode 7: "
            "read the track map during a race, after reset."
        )
    palette = palette_rgb(ppu[PPU_CGDATA_OFFSET : PPU_CGDATA_OFFSET + 2 * 256])
    return palette[mode7_plane(blocks[VRAM_BLOCK])]


def map_pixels(xs: np.ndarray, ys: np.ndarray, map_size: int = PLANE_PIXELS) -> tuple[np.ndarray, np.ndarray]:
    """Columns and rows (float, `[N]` each) in a `map_size`-pixel square map of RAM positions `xs`, `ys`.

    A position past the plane's top or left edge (a kart sinking off Koopa Beach, say) wraps to
    65535 and below in RAM's unsigned words: it is read back as negative, off the map.
    """
    scale = map_size / (PLANE_PIXELS * RAM_UNITS_PER_PIXEL)
    signed = [np.asarray(ram, np.int64).astype(np.uint16).view(np.int16) for ram in (xs, ys)]
    return signed[0] * scale, signed[1] * scale


def plot_trajectory(
    map_image: np.ndarray,
    xs: np.ndarray,
    ys: np.ndarray,
    speeds: np.ndarray,
    path: str | Path | None = None,
    size_px: tuple[int, int] = (640, 512),
    dpi: int = 100,
) -> np.ndarray:
    """The path through RAM positions `xs`, `ys` (`[N]` each) over `map_image` (a square track_map,
    any size), coloured by RAM `speeds` (`[N]`), with a colour bar.

    Returns `[H, W, 3] uint8` with (W, H) = `size_px`, for TensorBoard's add_image (dataformats
    "HWC"), and also saves it as a PNG at `path` when given.
    """
    columns, rows = map_pixels(xs, ys, map_image.shape[0])
    figure = Figure(figsize=(size_px[0] / dpi, size_px[1] / dpi), dpi=dpi)
    canvas = FigureCanvasAgg(figure)
    axes = figure.add_axes((0.01, 0.02, 0.78, 0.96))
    axes.imshow(map_image, interpolation="nearest")
    points = np.stack([columns, rows], axis=-1)
    segments = np.stack([points[:-1], points[1:]], axis=1)  # [N - 1, 2 ends, (column, row)]
    line = LineCollection(segments, cmap="plasma", linewidths=2)
    line.set_array(np.asarray(speeds, float)[1:])
    axes.add_collection(line)
    axes.plot(columns[:1], rows[:1], "o", color="white", markeredgecolor="black", markersize=5)
    axes.set_xlim(0, map_image.shape[1])
    axes.set_ylim(map_image.shape[0], 0)
    axes.set_axis_off()
    colour_bar = figure.colorbar(line, cax=figure.add_axes((0.82, 0.1, 0.03, 0.8)))
    colour_bar.set_label("speed (RAM 7E10EA, raw units)")
    canvas.draw()
    image = np.asarray(canvas.buffer_rgba())[..., :3].copy()
    if path is not None:
        figure.savefig(path, dpi=dpi)
    return image
