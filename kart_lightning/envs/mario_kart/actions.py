"""The discrete action sets an agent drives Super Mario Kart with, as button combinations.

Controls (game manual; B, Y, R checked in the emulator): B accelerates, Y brakes, A item, L/R hop.
"""

import gymnasium
import numpy as np
from gymnasium.spaces import Discrete
from gymnasium.wrappers import TransformAction

SNES_BUTTONS = ("B", "Y", "SELECT", "START", "UP", "DOWN", "LEFT", "RIGHT", "A", "X", "L", "R")
"""The 12 buttons of stable-retro's SNES action array, in its order (env.buttons with Actions.ALL)."""

DRIVE: dict[str, tuple[str, ...]] = {
    "noop": (),  # coast: the kart slows gently; also what a driver does waiting on the grid
    "accelerate": ("B",),
    "accelerate_left": ("B", "LEFT"),
    "accelerate_right": ("B", "RIGHT"),
    # R pressed hops (ground status 2 for ~14 frames); held while turning, the landing becomes a
    # power slide, the tight fast turn good drivers take corners with.
    "slide_left": ("B", "R", "LEFT"),
    "slide_right": ("B", "R", "RIGHT"),
    "brake": ("Y",),  # stops the kart (there is no reverse): for hairpins and to turn around
}

ACTION_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    "drive": DRIVE,
    # Always on the throttle: a random policy then moves from the first step, where one on
    # `drive` coasts or brakes 2 steps in 7.
    "race": {name: buttons for name, buttons in DRIVE.items() if "B" in buttons},
    # Items exist only in GP races (Time Trial has none); accelerating while firing keeps speed.
    "drive_item": {**DRIVE, "accelerate_use_item": ("B", "A")},
}
"""Action set name (MarioKartConfig.actions) -> action name -> buttons held; action i is the ith."""


def button_table(action_set: str, buttons: tuple[str, ...] | list[str] = SNES_BUTTONS) -> np.ndarray:
    """`[num_actions, len(buttons)] uint8`: row i holds 1 where action i of `action_set` presses."""
    combos = ACTION_SETS[action_set].values()
    table = np.zeros((len(combos), len(buttons)), np.uint8)
    for row, combo in enumerate(combos):
        table[row, [buttons.index(button) for button in combo]] = 1
    return table


def mirrored_actions(action_set: str) -> list[int]:
    """Action i's mirror image (LEFT and RIGHT swapped; a hop with R goes either way) for each i
    of `action_set`: the course mirrored left to right is driven with these."""
    swap = {"LEFT": "RIGHT", "RIGHT": "LEFT"}
    combos = [frozenset(buttons) for buttons in ACTION_SETS[action_set].values()]
    return [combos.index(frozenset(swap.get(button, button) for button in combo)) for combo in combos]


def discrete_actions(env: gymnasium.Env, action_set: str) -> gymnasium.Env:
    """`env` (a stable-retro SNES env made with Actions.ALL) driven by Discrete(n) actions."""
    table = button_table(action_set, env.unwrapped.buttons)
    return TransformAction(env, table.__getitem__, Discrete(len(table)))
