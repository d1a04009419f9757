"""Child processes (actors, evaluation and recording workers) end with the learner that started them."""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal this process gets when its parent dies."""


def die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel SIGKILL this process when the learner (`parent_pid`) dies, whatever it
    is doing then: waiting on a slot, playing an episode, or flushing a queue at exit. Elsewhere the
    children's own checks of the parent are the only ones."""
    if sys.platform == "linux":
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    # The parent may have died before the request took effect.
    if os.getppid() != parent_pid:
        os._exit(0)
