"""Child processes (actors, evaluation and recording workers): they end with the learner that
started them, and the learner stops them the same way everywhere."""

import ctypes
import os
import signal
import sys
import time
from collections.abc import Iterable

PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal this process gets when its parent dies."""


def die_with_parent(parent_pid: int) -> None:
    """Linux: have the kernel SIGKILL this process when the learner (`parent_pid`) dies, whatever it
    is doing then: waiting on a slot, playing an episode, or flushing a queue at exit. Elsewhere the
    children's own checks of `parent_alive` are the only ones."""
    if sys.platform == "linux":
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    # The parent may have died before the request took effect.
    if not parent_alive(parent_pid):
        os._exit(0)


def parent_alive(parent_pid: int) -> bool:
    """Whether the learner that started this process is still its parent (an orphan is adopted)."""
    return os.getppid() == parent_pid


def stop_processes(processes: Iterable, timeout_s: float = 5.0, terminate: bool = True) -> None:
    """Stop multiprocessing `processes` (None entries skipped): SIGTERM each live one (unless
    `terminate` is False, for processes already asked to stop), wait up to `timeout_s` in all,
    then SIGKILL and reap whatever is left."""
    processes = [process for process in processes if process is not None]
    if terminate:
        for process in processes:
            if process.is_alive():
                process.terminate()
    deadline = time.monotonic() + timeout_s
    for process in processes:
        process.join(timeout=max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
            process.join()
