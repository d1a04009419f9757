"""The Super Mario Kart part of the env config: action set, view, reward weights, episode ends.

EnvConfig holds one as `mario_kart`; other games ignore it.
"""

from dataclasses import dataclass
from typing import Literal

from kart_lightning.envs.mario_kart.restarts import RestartFrom

ActionSetName = Literal["drive", "race", "drive_item"]
ViewName = Literal["driver", "full"]
ProgressName = Literal["net", "furthest"]


@dataclass
class MarioKartConfig:
    """How an agent plays Super Mario Kart and what it is rewarded for (RAM-based, see reward.py).

    Args:
        actions: 'drive': no-op, accelerate, accelerate left/right, power-slide left/right, brake;
            'race': drive's five that accelerate (no coasting, no brake);
            'drive_item': drive's and accelerate while using the item (GP races only).
        view: 'driver': the upper screen half, the kart's view without the minimap; 'full': both halves.
        progress_reward: per checkpoint passed (about 30-40 a lap); see `progress` for going back.
        progress: 'net': minus progress_reward per checkpoint driven back, or put back by the game
            (a jump that comes down on an earlier stretch of road), so the reward sums to the net
            checkpoints gained; 'furthest': paid only for checkpoints past the furthest the race
            has reached, so going back costs the time to regain it and nothing else (the
            wrong-way penalty still applies). Episode statistics count net checkpoints either way.
        lap_reward: per lap completed (each lap counts once, however often the line is recrossed).
        wrong_way_penalty: per agent step while Lakitu shows his wrong-way sign.
        fall_penalty: per fall off the track or into deep water or lava.
        lakitu_penalty: per Lakitu rescue; every fall ends in one, so this adds to fall_penalty.
        offroad_penalty: per agent step on ground other than the road the kart starts on (grass).
        speed_reward: per agent step at full speed (game.FULL_SPEED), in proportion to the kart's
            speed, while it is neither lost nor shown the wrong way: a reward for keeping speed
            at once, where the checkpoints pay for it only later.
        laps: the episode terminates once this many laps are completed; 5 is the game's whole race.
        stall_steps: agent steps without passing a new checkpoint before the episode is truncated
            (bootstrapped, like a time limit); None never cuts a stalled race.
        restart_share: the share of episodes that start where an earlier episode of the same env
            first passed a checkpoint of its track's first lap, one drawn uniformly, instead of on
            the grid (CheckpointRestarts): the far parts of a course get practised as often as its
            start. Such episodes train but are left out of the episode statistics. 0: every race
            starts on the grid, as `test` and evaluation always do.
        restart_from: where restarts start: 'anywhere', a checkpoint drawn uniformly; 'race_ends',
            up to 3 checkpoints before where one of the track's last 100 races ended, drawn
            uniformly among them (the grid if that race got past its first lap), so the places
            where races stop are practised most, and a track whose races get round is driven
            from the grid.
    """

    actions: ActionSetName = "drive"
    view: ViewName = "driver"
    progress_reward: float = 1.0
    progress: ProgressName = "net"
    lap_reward: float = 10.0
    wrong_way_penalty: float = 0.1
    fall_penalty: float = 5.0
    lakitu_penalty: float = 0.0
    offroad_penalty: float = 0.0
    speed_reward: float = 0.0
    laps: int = 5
    stall_steps: int | None = 150
    restart_share: float = 0.0
    restart_from: RestartFrom = "anywhere"
