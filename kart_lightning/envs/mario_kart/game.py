"""What we measured about Super Mario Kart, as data: RAM values, race rules and screen layout.

Source: the USA ROM in stable-retro 1.0.1, read through data.json's variables (see NOTES.md).
"""

LAP_ON_GRID = 127
"""RAM `lap` before the start line is first crossed; 128 while lap 1 is driven, 133 at the finish."""

GRID_CHECKPOINTS_BEHIND_LINE = 1
GP_GRID_CHECKPOINTS_BEHIND_LINE = 3
"""RAM `checkpoint` on the grid is `checkpoint_count` minus these (the line is checkpoint 0): in
a Time Trial, and in a GP cup's first race, where Mario starts last of eight, further back."""

GP_START_RANK = 14
"""RAM `rank` of Mario on the grid of a GP cup's first race: 8th, as the HUD shows (rank is
2 * (place - 1)). Time Trial reads 0."""

GP_START_COINS = 5
"""RAM `coins` on a GP grid (the HUD's 05); Time Trial has no coins and reads 0."""

RACE_LAPS = 5
"""Laps of a Time Trial or GP race: RAM `lap` reaches LAP_ON_GRID + 1 + RACE_LAPS at the finish."""

GROUND = 0
AIRBORNE = 2
"""RAM `ground_status` on the road or grass, and in the air (an R hop, a jump into water)."""

FALLEN = frozenset({4, 6, 8})
"""RAM `ground_status` once the kart is lost: 4 off an edge (Ghost Valley 1), 8 in deep water
(Koopa Beach 1), 6 after 8 just before Lakitu comes (and, per Data Crystal, in lava: unverified)."""

LAKITU_RESCUE = frozenset({12, 14})
"""RAM `ground_status` while Lakitu carries the kart back (12) and drops it on the track (14)."""

LAKITU_WRONG_WAY = 16
LAKITU_FINISH_FLAG = 64
"""Bits of RAM `lakitu`: 16 while his wrong-way sign shows (also as 20 = 16 | 4 during a rescue,
4 being his rescue flight), 64 while he waves the chequered flag after the finish."""

FULL_SPEED = 737
"""RAM `speed` at full throttle (B held) on Mario Circuit 1's straights; 0 on the grid."""

RACE_FRAME_LIMIT = 18_000
"""Emulator frames (5 minutes at 60 frames/s) before a race is truncated when the config sets no
limit: a 5-lap Time Trial on Mario Circuit 1 takes ~3,000 frames with B held well."""

DRIVER_VIEW_ROWS = (3, 107)
"""Rows [start, stop) of the 224x256 screen showing the driver's view: rows 0-2 are always black,
107-114 the black band above the minimap (or rear view) that fills the lower half. Measured on six
tracks; Ghost Valley's dark floor adds black rows inside both halves, never at these bounds."""

SAVE_BLOCK = 0x206000
"""The key of the cartridge's 2 KiB battery save in stable-retro's `env.data.memory.blocks`."""

SAVE_TROPHIES = 0x7F0
"""Save offset of the GP trophies, six bytes: a <u2 checksum, the sum (mod 2**16) of the two <u2
words that follow, then one byte per cup (Mushroom, Flower, Star, Special), two bits per class in
each. The game reads the save directly, and power-on wipes all six bytes if the sum fails."""

SPECIAL_CUP_TROPHIES = bytes((1, 1, 1, 0))
"""Gold (1 in a cup byte's low two bits, the 100cc class) in the Mushroom, Flower and Star Cups:
with these trophies saved, the course select lists the Special Cup. Gold in all four cups also
offers 150cc; 2 or 3 in those bits (presumably silver and bronze) unlock nothing."""
