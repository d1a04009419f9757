"""Callbacks that play the current policy during fit without stalling it: evaluation on the
held-out tracks and episode recording (GIF and trajectory), each in its own process.

The learner sends a snapshot of the scripted policy (TorchScript bytes, a few MB) to a worker
process and goes on training; the results are logged when they come back, at the learner step of
the weights that played. One job is in flight at a time: a trigger while the worker is busy is
skipped, never queued. Frames never cross processes.
"""

import multiprocessing
import os
import queue
import signal
import time
import traceback
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from kart_lightning.envs.factory import EnvConfig
from kart_lightning.evaluation import held_out_envs, play_tracks, scalar_metrics, summarize
from kart_lightning.export import KartCheckpoint, Snapshot, take_snapshot
from kart_lightning.models import load_script, script_bytes
from kart_lightning.processes import die_with_parent
from kart_lightning.recording import RecordOptions, log_recording, record_episode

WORKER_POLL_S = 1.0
"""How often an idle worker checks that the learner that started it is still alive."""


@dataclass
class EvaluationJob:
    step: int
    policy: bytes
    env: EnvConfig
    episodes: int
    seed: int
    greedy: bool

    def run(self) -> dict[str, Any]:
        policy = load_script(self.policy)
        return {"results": list(play_tracks(policy, self.env, self.episodes, self.seed, self.greedy))}


@dataclass
class RecordingJob:
    step: int
    policy: bytes
    env: EnvConfig
    gif_path: Path
    options: RecordOptions

    def run(self) -> dict[str, Any]:
        return {"result": record_episode(load_script(self.policy), self.env, self.gif_path, self.options)}


def _serve(requests, replies, parent_pid: int) -> None:
    """The worker process: run jobs until told to stop (None) or the learner is gone."""
    # Ctrl-C reaches the whole process group: the learner decides when the worker stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent_pid)
    torch.set_num_threads(1)
    while True:
        try:
            job = requests.get(timeout=WORKER_POLL_S)
        except queue.Empty:
            if os.getppid() != parent_pid:
                return
            continue
        if job is None:
            return
        try:
            reply = job.run()
        except Exception:  # noqa: BLE001 - reported to the learner, which logs it and goes on
            reply = {"error": traceback.format_exc()}
        replies.put({"step": job.step, "pid": os.getpid(), **reply})


class PolicyWorker:
    """One worker process that runs jobs one at a time, started on first use."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.process = None
        self.pending: int | None = None
        """The learner step of the job in flight, if any."""

    def submit(self, job) -> None:
        if self.process is None or not self.process.is_alive():
            self._start()
        self.requests.put(job)
        self.pending = job.step

    def poll(self, timeout_s: float | None = None) -> dict[str, Any] | None:
        """The finished job's reply, if there is one (waiting up to timeout_s for it)."""
        if self.pending is None:
            return None
        try:
            reply = self.replies.get(timeout=timeout_s) if timeout_s else self.replies.get_nowait()
        except queue.Empty:
            if not self.process.is_alive():
                reply = {"step": self.pending, "error": f"the {self.name} process died (exit code {self.process.exitcode})"}
            else:
                return None
        self.pending = None
        return reply

    def _start(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.requests, self.replies = context.Queue(), context.Queue()
        self.process = context.Process(
            target=_serve, args=(self.requests, self.replies, os.getpid()), name=self.name, daemon=True
        )
        self.process.start()

    def close(self) -> None:
        if self.process is None:
            return
        if self.process.is_alive():
            self.requests.put(None)
            self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        # A job nobody read would otherwise keep this process from exiting: queues flush at exit.
        for channel in (self.requests, self.replies):
            channel.cancel_join_thread()
            channel.close()
        self.process = None
        self.pending = None


def _last_step(trainer: Trainer) -> bool:
    """Whether the step just taken ends fit: the frame budget (should_stop) or max_steps."""
    return trainer.should_stop or 0 <= trainer.max_steps <= trainer.global_step


class _PeriodicPolicyCallback(Callback):
    """Sends a job every `every_n_steps` learner steps and/or `every_minutes`, and handles replies."""

    def __init__(self, name: str, every_n_steps: int | None, every_minutes: float | None, final_wait_s: float) -> None:
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(f"{name}: every_n_steps must be at least 1 (or null for never), not {every_n_steps}.")
        self.every_n_steps = every_n_steps
        self.every_minutes = every_minutes
        self.final_wait_s = final_wait_s
        self.worker = PolicyWorker(name)
        self._last_step = 0
        self._last_time = time.monotonic()

    @property
    def enabled(self) -> bool:
        return bool(self.every_n_steps or self.every_minutes)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._last_step = trainer.global_step
        self._last_time = time.monotonic()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        # At the last step, wait for the job in flight: it played nearly the final weights, and
        # ModelCheckpoint's last save (after this hook) should see its metrics.
        self._handle(trainer, self.worker.poll(timeout_s=self.final_wait_s if _last_step(trainer) else None))
        if self.enabled and self.worker.pending is None and self._due(trainer.global_step):
            self._last_step, self._last_time = trainer.global_step, time.monotonic()
            if trainer.is_global_zero:
                self.worker.submit(self.make_job(trainer, pl_module, script_bytes(pl_module.policy)))

    def _due(self, step: int) -> bool:
        by_steps = self.every_n_steps and step - self._last_step >= self.every_n_steps
        by_time = self.every_minutes and time.monotonic() - self._last_time >= 60 * self.every_minutes
        return bool(by_steps or by_time)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The run's end (the stream of batches is one endless epoch), stopped in a way the last
        # step could not foresee (max_time, say).
        if self.worker.pending is not None:
            self._handle(trainer, self.worker.poll(timeout_s=self.final_wait_s))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.worker.close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.worker.close()

    def _handle(self, trainer: Trainer, reply: dict[str, Any] | None) -> None:
        if reply is None:
            return
        if "error" in reply:
            warnings.warn(f"{self.worker.name} of step {reply['step']} failed; training goes on:\n{reply['error']}", stacklevel=1)
            return
        self.handle_reply(trainer, reply)

    def make_job(self, trainer: Trainer, pl_module: LightningModule, policy: bytes):
        raise NotImplementedError

    def handle_reply(self, trainer: Trainer, reply: dict[str, Any]) -> None:
        raise NotImplementedError


class HeldOutEvaluation(_PeriodicPolicyCallback):
    """Evaluates the current policy on the held-out tracks (`data.eval_env`) in its own process.

    Logs `val/episode_return`, `val/episode_length` (and for races `val/episode_checkpoints`,
    `val/episode_laps`) over all tracks and `val/TRACK/...` per track, at the learner step of the
    weights that played. The checkpoint callback can monitor them (`checkpoint.monitor:
    val/episode_return`, `checkpoint.mode: max`): each evaluation keeps a copy of the checkpoint
    at its step (a few MB in memory) and hands it over with the score, so the best checkpoint holds
    the weights that earned it (`epoch=0-step=STEP.ckpt`, STEP the evaluated step). A plain
    ModelCheckpoint monitoring them saves the weights current when the score comes back instead.

    Args:
        every_n_steps: learner steps between evaluations; null for none by steps.
        every_minutes: minutes between evaluations; null for none by time.
        episodes: episodes per held-out track; null: data.eval_episodes.
        greedy: argmax actions; null: data.eval_greedy.
        seed: first episode seed; null: data.eval_seed.
        final_wait_s: at the last step, how long fit waits for the evaluation in flight.
    """

    def __init__(
        self,
        every_n_steps: int | None = 1000,
        every_minutes: float | None = None,
        episodes: int | None = None,
        greedy: bool | None = None,
        seed: int | None = None,
        final_wait_s: float = 120.0,
    ) -> None:
        super().__init__("held-out evaluation", every_n_steps, every_minutes, final_wait_s)
        self.episodes, self.greedy, self.seed = episodes, greedy, seed
        self._snapshot: Snapshot | None = None

    def scored_checkpoints(self, trainer: Trainer) -> list[KartCheckpoint]:
        """The checkpoint callbacks that monitor a metric of this evaluation."""
        if not self.enabled:
            return []
        return [
            callback for callback in trainer.checkpoint_callbacks
            if isinstance(callback, KartCheckpoint) and (callback.monitor or "").startswith("val/")
        ]

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        for callback in self.scored_checkpoints(trainer):
            callback.scored_elsewhere = True

    def make_job(self, trainer: Trainer, pl_module: LightningModule, policy: bytes) -> EvaluationJob:
        data = trainer.datamodule
        if checkpoints := self.scored_checkpoints(trainer):
            self._snapshot = take_snapshot(trainer, policy, all(callback.save_weights_only for callback in checkpoints))
        return EvaluationJob(
            step=trainer.global_step,
            policy=policy,
            env=data.eval_env,
            episodes=self.episodes or data.hparams.eval_episodes,
            seed=data.hparams.eval_seed if self.seed is None else self.seed,
            greedy=data.hparams.eval_greedy if self.greedy is None else self.greedy,
        )

    def handle_reply(self, trainer: Trainer, reply: dict[str, Any]) -> None:
        metrics = scalar_metrics("val", summarize(reply["results"]))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=reply["step"])
        # What ModelCheckpoint's monitor and EarlyStopping read.
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in metrics.items()})
        snapshot, self._snapshot = self._snapshot, None
        if snapshot is not None and snapshot.step == reply["step"]:
            for callback in self.scored_checkpoints(trainer):
                callback.keep_evaluated(trainer, snapshot, metrics)


class EpisodeRecorder(_PeriodicPolicyCallback):
    """Records an episode of the current policy in its own process: a GIF at the emulator's full
    resolution and, for races, the trajectory over the track's map. Files go to
    `LOG_DIR/recordings/step_STEP-TRACK.gif` (and `.png`); both are logged to TensorBoard under
    `record/`. Off unless every_n_steps or every_minutes is set.

    Args:
        every_n_steps: learner steps between recordings; null for none by steps.
        every_minutes: minutes between recordings; null for none by time.
        track: the state to record (a stable-retro state name or file); null: the first held-out track.
        fps, max_frames, greedy, seed: see RecordOptions.
        final_wait_s: at the last step, how long fit waits for the recording in flight.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        every_minutes: float | None = None,
        track: str | None = None,
        fps: float = 15.0,
        max_frames: int = 900,
        greedy: bool = False,
        seed: int = 1_000_000,
        final_wait_s: float = 300.0,
    ) -> None:
        super().__init__("episode recorder", every_n_steps, every_minutes, final_wait_s)
        self.track = track
        self.options = RecordOptions(fps=fps, max_frames=max_frames, greedy=greedy, seed=seed)

    def make_job(self, trainer: Trainer, pl_module: LightningModule, policy: bytes) -> RecordingJob:
        name, env = held_out_envs(trainer.datamodule.eval_env)[0]
        if self.track is not None:
            name, env = self.track, replace(env, retro_state=self.track)
        folder = Path(trainer.log_dir or ".") / "recordings"
        gif_path = folder / f"step_{trainer.global_step}-{name.replace('/', '_')}.gif"
        return RecordingJob(step=trainer.global_step, policy=policy, env=env, gif_path=gif_path, options=self.options)

    def handle_reply(self, trainer: Trainer, reply: dict[str, Any]) -> None:
        for logger in trainer.loggers:
            log_recording(logger, "record", reply["result"], reply["step"])
