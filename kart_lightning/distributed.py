"""Several ranks (Lightning's DDP, one learner per GPU or CPU process, each with its own actor pool):
where this process stands in the job, and the watch that ends the whole job, with one sentence
naming the rank, when one rank fails or vanishes.

Only gradients and a few counters cross between ranks (see ImpalaModule.training_step); frames
stay with the rank whose actors made them. A rank that fails or dies would leave the others
waiting in their next collective until the backend gives up (gloo sees a closed connection, NCCL
waits out its timeout, 10 minutes): RankWatch ends them within `silent_timeout_s` at most, naming
the rank. A rank that hangs with its process alive is the backend's timeout to catch.
"""

import contextlib
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException

from kart_lightning.errors import ConfigError

PREFIX = "kart_lightning/watch"
RESUME_HINT = "resume with --ckpt_path last once every rank can run"

_place: tuple[int, int] | None = None
"""(rank, world size) of this process while a multi-rank fit runs, for the error sentences."""
_stop_requested = False
"""Ctrl-C during a multi-rank fit: every rank stops after the same step (see ImpalaModule._job_step)."""


def stop_requested() -> bool:
    """Whether Ctrl-C asked this rank to stop (a multi-rank fit stops where any rank was asked)."""
    return _stop_requested


def _on_ctrl_c(signum, frame) -> None:
    """SIGINT with several ranks: Ctrl-C reaches every rank on this host wherever it is (one may be
    inside a collective, another between two), so none raises KeyboardInterrupt there: each notes
    the request, the ranks agree on it in their next step's gather and all stop after that step,
    saving last.ckpt as at any end. A second Ctrl-C ends the process at once, without saving."""
    global _stop_requested
    if _stop_requested:
        os._exit(130)
    _stop_requested = True
    if _place is not None and _place[0] == 0:
        print("\nkart_lightning: Ctrl-C: every rank stops after this step and saves last.ckpt (Ctrl-C again stops "
              "at once, without saving).", file=sys.stderr, flush=True)


def rank_prefix() -> str:
    """`rank R: ` while a fit with several ranks runs in this process, else nothing."""
    return f"rank {_place[0]}: " if _place is not None else ""


def process_state(pid: int) -> str | None:
    """The state letter of process `pid` on this host (R, S, Z, ...), None when there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        if sys.platform == "linux":
            return None
        try:  # elsewhere: whether a signal could reach it
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        except PermissionError:
            pass
        return "R"
    return stat.rsplit(")", 1)[1].split()[0]


def host_key() -> str:
    """This host as far as process ids go: the hostname and the pid namespace (containers that
    share a hostname, say under --network host, each have their own process ids)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{socket.gethostname()}:{namespace}"


def alive(pid: int) -> bool:
    """Whether process `pid` on this host is running (a zombie is not: it has died unreaped)."""
    return process_state(pid) not in (None, "Z", "X")


class Watch:
    """The watch of one rank: a thread that beats this rank's heart in the job's TCPStore (the one
    torch.distributed rendezvoused through: MASTER_ADDR:MASTER_PORT) and checks the other ranks.

    A peer is lost when it says it failed (`report_failure`), when its process is gone (peers on
    this host, checked every `poll_s`), when its heart has not beaten for `silent_timeout_s`
    (its host went down, or the network cut it off), or when the store itself is gone (its host,
    rank 0 or the launcher, died). A peer that said it finished (`finish`) is never lost. On a loss
    `on_lost(sentence)` runs in the watch's thread; it is expected to end the process. The heart
    beats in a thread of its own: a rank whose main thread hangs still beats (that is the
    backend's timeout to catch).
    """

    STORE_POLL_S = 0.5

    def __init__(self, store, rank: int, world_size: int, silent_timeout_s: float, poll_s: float, on_lost) -> None:
        self.store, self.rank, self.world_size = store, rank, world_size
        self.silent_timeout_s, self.poll_s, self.on_lost = silent_timeout_s, poll_s, on_lost
        self.host, self.pid = host_key(), os.getpid()
        self.peers = [r for r in range(world_size) if r != rank]
        self.places: dict[int, tuple[str, int]] = {}
        self.beats = {r: (-1, time.monotonic()) for r in self.peers}
        self.finished: set[int] = set()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="kart-rank-watch", daemon=True)
        store.set(f"place/{rank}", f"{self.host} {self.pid}")
        store.add(f"beat/{rank}", 1)

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> None:
        """Say this rank has finished (its end is no loss) and stop watching."""
        self.stopping.set()
        # The store may be gone at the very end; nobody is left to tell then.
        with contextlib.suppress(Exception):
            self.store.set(f"done/{self.rank}", "1")

    def report_failure(self, sentence: str) -> None:
        """Tell the other ranks why this one stops, and stop watching them."""
        self.stopping.set()
        # Without the store the others see this rank vanish instead.
        with contextlib.suppress(Exception):
            self.store.set(f"failed/{self.rank}", sentence)
            self.store.add("failures", 1)

    def _run(self) -> None:
        next_beat = 0.0
        store_lost_at: float | None = None
        while not self.stopping.wait(self.poll_s):
            sentence = self._local_losses()
            now = time.monotonic()
            if sentence is not None:
                # A peer here ended: if it ended because a third one failed, name that one.
                with contextlib.suppress(Exception):
                    sentence = self._reported_failure() or sentence
            elif now >= next_beat:
                next_beat = now + self.STORE_POLL_S
                try:
                    sentence = self._store_losses(now)
                    store_lost_at = None
                except Exception as error:  # noqa: BLE001 - any failure to reach the store is one
                    store_lost_at = store_lost_at or now
                    # Rank 0 hosts the store under Lightning's launcher: at the very end it may exit
                    # just before this rank stops watching. A grace period tells the two apart.
                    if now - store_lost_at >= min(5.0, self.silent_timeout_s) and not self.stopping.is_set():
                        sentence = (
                            f"lost the job's rendezvous store ({' '.join(str(error).split())[:120]}): the process "
                            "that held it (rank 0, or the launcher of this host) has died"
                        )
            if sentence is not None and not self.stopping.is_set():
                self.on_lost(sentence)
                return

    def _local_losses(self) -> str | None:
        for peer, (host, pid) in self.places.items():
            if host == self.host and peer not in self.finished and not alive(pid):
                if self._said_done(peer):
                    continue
                return f"rank {peer} (process {pid} on this host) ended without a word: it was killed or crashed"
        return None

    def _said_done(self, peer: int) -> bool:
        with contextlib.suppress(Exception):  # a store that is gone cannot say so
            if self.store.check([f"done/{peer}"]):
                self.finished.add(peer)
                return True
        return False

    def _reported_failure(self) -> str | None:
        if int(self.store.add("failures", 0)):
            for peer in self.peers:
                if self.store.check([f"failed/{peer}"]):
                    said = self.store.get(f"failed/{peer}").decode(errors="replace")
                    return f"rank {peer} failed: {said}"
        return None

    def _store_losses(self, now: float) -> str | None:
        failure = self._reported_failure()
        if failure is not None:
            return failure
        self.store.add(f"beat/{self.rank}", 1)
        for peer in self.peers:
            if peer in self.finished:
                continue
            if peer not in self.places and self.store.check([f"place/{peer}"]):
                host, pid = self.store.get(f"place/{peer}").decode().rsplit(" ", 1)
                self.places[peer] = (host, int(pid))
            count = int(self.store.add(f"beat/{peer}", 0))
            last_count, since = self.beats[peer]
            if count != last_count:
                self.beats[peer] = (count, now)
            elif now - since > self.silent_timeout_s and not self._said_done(peer):
                host = self.places.get(peer, ("an unknown host", 0))[0].rsplit(":", 1)[0]
                return (f"rank {peer} on {host} has not been heard from for {self.silent_timeout_s:.0f} s: its host went "
                        "down or the network cut it off")
        return None


def connect_store(timeout_s: float):
    """A client of the job's TCPStore (MASTER_ADDR:MASTER_PORT), under this project's prefix and,
    with torchrun, the restart count (its store outlives the workers it restarts)."""
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
        timeout=timedelta(seconds=timeout_s),
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"{PREFIX}/{attempt}/", store)


class RankWatch(Callback):
    """With several ranks, ends the whole job when one rank fails or vanishes, within
    `silent_timeout_s` at most, each surviving rank printing one sentence that names the lost rank
    (exit code 1), so no rank waits in a collective for its backend's timeout. Its processes end
    with it: the actors and workers of a rank die with their learner. Nothing happens with one rank.

    Args:
        silent_timeout_s: a rank on another host whose heart has not beaten for this long is taken
            for dead (ranks on the same host are checked by their process, several times a second).
        poll_s: how often the ranks on this host are checked.
    """

    def __init__(self, silent_timeout_s: float = 30.0, poll_s: float = 0.2) -> None:
        for option, value in (("silent_timeout_s", silent_timeout_s), ("poll_s", poll_s)):
            if value <= 0:
                raise ConfigError(f"ranks.{option} is {value:g}: set it to a number of seconds above 0.")
        self.silent_timeout_s, self.poll_s = silent_timeout_s, poll_s
        self.watch: Watch | None = None
        self.trainer: Trainer | None = None
        self.previous_handler = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        global _place
        if stage != "fit" or trainer.world_size < 2 or "MASTER_ADDR" not in os.environ:
            return
        # Kept after teardown: the sentence of an error that ends fit is printed after it.
        _place = (trainer.global_rank, trainer.world_size)
        if threading.current_thread() is threading.main_thread():
            self.previous_handler = signal.signal(signal.SIGINT, _on_ctrl_c)
        self.trainer = trainer
        store = connect_store(max(10.0, self.silent_timeout_s))
        self.watch = Watch(store, trainer.global_rank, trainer.world_size, self.silent_timeout_s, self.poll_s, self._lost)
        self.watch.start()

    def _lost(self, sentence: str) -> None:
        """In the watch's thread: say so, keep what the loggers hold, and end this process now (the
        main thread may be blocked in a collective that will never return). The actors and workers
        of this rank die with it (see processes.die_with_parent)."""
        print(f"kart_lightning: error: {rank_prefix()}{sentence}; the whole job stops ({RESUME_HINT}).",
              file=sys.stderr, flush=True)
        if self.trainer is not None and self.trainer.global_rank == 0 and "failed:" in sentence:
            # Under Lightning's launcher rank 0 holds the store: the other ranks read the failure
            # there (every STORE_POLL_S) before it goes, or they would name rank 0 instead.
            time.sleep(2 * Watch.STORE_POLL_S + self.poll_s)
        for logger in getattr(self.trainer, "loggers", []):
            with contextlib.suppress(Exception):  # best effort on the way out
                logger.save()
                experiment = getattr(logger, "experiment", None)
                if hasattr(experiment, "flush"):
                    experiment.flush()
        sys.stdout.flush()
        os._exit(1)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._finish()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self.watch is None:
            return
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)):  # every rank stops: none is lost
            self._finish()
            return
        if is_collective_failure(exception):
            # Another rank is gone: the watch names it and ends this process within its bounds.
            time.sleep(self.silent_timeout_s + 5.0)
            return
        self.watch.report_failure(first_line(f"{exception}") or type(exception).__name__)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._finish()
        if self.previous_handler is not None:
            signal.signal(signal.SIGINT, self.previous_handler)
            self.previous_handler = None

    def _finish(self) -> None:
        if self.watch is not None:
            self.watch.finish()
            self.watch = None


def is_collective_failure(exception: BaseException) -> bool:
    """Whether `exception` (or one it came from) is a collective that failed because another rank
    is gone, as gloo and NCCL report it."""
    while exception is not None:
        if isinstance(exception, dist.DistError):
            return True
        text = str(exception)
        if isinstance(exception, RuntimeError) and any(
            mark in text for mark in ("Connection closed by peer", "Connection reset by peer", "Gloo", "NCCL", "ProcessGroup")
        ):
            return True
        exception = exception.__cause__ or exception.__context__
    return False


def first_line(text: str) -> str:
    """The first line of an error message, less a trailing clause that introduces the lines after
    it (`...; last error:`)."""
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if line.endswith(":") and "; " in line:
        line = line.rsplit("; ", 1)[0]
    return line
