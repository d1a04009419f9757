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
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from kart_lightning.checkpointing import move_checkpoint, remove_checkpoint
from kart_lightning.envs import EnvConfig
from kart_lightning.errors import ConfigError
from kart_lightning.evaluation import held_out_envs, metric_names, play_tracks, scalar_metrics, summarize
from kart_lightning.models import load_script, script_bytes
from kart_lightning.processes import die_with_parent, parent_alive, stop_processes
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
            if not parent_alive(parent_pid):
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
            self.requests.put(None)  # asks it to stop; one still busy after 5 s is killed
        stop_processes([self.process], timeout_s=5.0, terminate=False)
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

    def __init__(
        self, name: str, section: str, every_n_steps: int | None, every_minutes: float | None, final_wait_s: float
    ) -> None:
        """`name` is the worker's, for its messages; `section` the config's (`evaluation`, `recorder`)."""
        if every_n_steps is not None and every_n_steps < 1:
            raise ConfigError(f"{section}.every_n_steps is {every_n_steps}: set it to 1 or more, or null for never.")
        if every_minutes is not None and every_minutes <= 0:
            raise ConfigError(f"{section}.every_minutes is {every_minutes:g}: set it above 0, or null for never.")
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
        # At the last step, wait for the job in flight: it played nearly the final weights, and the
        # last checkpoint (saved after this hook) should hold its score.
        reply = self.worker.poll(timeout_s=self.final_wait_s if _last_step(trainer) else None)
        due = self.enabled and self.worker.pending is None and self._due(trainer.global_step)
        # Rank 0 alone runs the worker; every rank takes its reply (so callback_metrics agree, which
        # EarlyStopping reads on every rank) and follows its decision, as a job may save a
        # checkpoint, which all ranks take part in. One broadcast per step carries both.
        reply, due = trainer.strategy.broadcast((reply, due))
        self._handle(trainer, reply)
        if due:
            self._last_step, self._last_time = trainer.global_step, time.monotonic()
            job = self.make_job(trainer, pl_module, script_bytes(pl_module.policy))
            if trainer.is_global_zero:
                self.worker.submit(job)

    def _due(self, step: int) -> bool:
        by_steps = self.every_n_steps and step - self._last_step >= self.every_n_steps
        by_time = self.every_minutes and time.monotonic() - self._last_time >= 60 * self.every_minutes
        return bool(by_steps or by_time)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The run's end (the stream of batches is one endless epoch), stopped in a way the last
        # step could not foresee (max_time, say).
        reply = self.worker.poll(timeout_s=self.final_wait_s) if self.worker.pending is not None else None
        self._handle(trainer, trainer.strategy.broadcast(reply))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.worker.close()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.worker.close()

    def _handle(self, trainer: Trainer, reply: dict[str, Any] | None) -> None:
        if reply is None:
            return
        if "error" in reply:
            if not trainer.is_global_zero:  # every rank has the reply; one says so
                return
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
    weights that played.

    With `save_best`, it keeps the checkpoint with the best `monitor` score as `best.ckpt` (and
    `best.policy.pt`) in the checkpoint folder (`checkpoint.dirpath`): each evaluation saves the
    checkpoint of the step it plays as `evaluated-step=STEP.ckpt`, and when its score comes back,
    some steps later, that file becomes `best.ckpt` if the score beats the best so far, or is
    deleted. So `best.ckpt` holds the weights that earned its score. The best score is saved in
    the checkpoints, so a resumed run goes on comparing with it.

    Args:
        every_n_steps: learner steps between evaluations; null for none by steps.
        every_minutes: minutes between evaluations; null for none by time.
        episodes: episodes per held-out track; null: data.eval_episodes.
        greedy: argmax actions; null: data.eval_greedy.
        seed: first episode seed; null: data.eval_seed.
        save_best: keep the checkpoint with the best `monitor` score as best.ckpt in the checkpoint folder.
        monitor: the score that ranks checkpoints: a metric of this evaluation (val/episode_return,
            val/episode_checkpoints for races, val/TRACK/return_mean, ...).
        mode: max: a higher score is better; min: a lower one.
        final_wait_s: at the last step, how long fit waits for the evaluation in flight.
    """

    BEST_NAME = "best.ckpt"
    EVALUATED_PREFIX = "evaluated-step="

    def __init__(
        self,
        every_n_steps: int | None = 1000,
        every_minutes: float | None = None,
        episodes: int | None = None,
        greedy: bool | None = None,
        seed: int | None = None,
        save_best: bool = True,
        monitor: str = "val/episode_return",
        mode: Literal["max", "min"] = "max",
        final_wait_s: float = 120.0,
    ) -> None:
        super().__init__("held-out evaluation", "evaluation", every_n_steps, every_minutes, final_wait_s)
        if not monitor.startswith("val/"):
            raise ConfigError(
                f"evaluation.monitor is {monitor}, which the held-out evaluation does not compute: name one of "
                "its metrics, such as val/episode_return."
            )
        self.episodes, self.greedy, self.seed = episodes, greedy, seed
        self.save_best, self.monitor, self.mode = save_best, monitor, mode
        self.best_score: float | None = None
        self.best_step: int | None = None
        self.evaluated: Path | None = None
        """The checkpoint of the evaluation in flight, waiting for its score."""

    def check_monitor(self, eval_env: EnvConfig) -> None:
        """Raise ConfigError, before fit starts, when `monitor` is none of the metrics an
        evaluation on `eval_env` gives (a track it does not evaluate, a stat its game lacks)."""
        if not (self.save_best and self.enabled):
            return
        names = metric_names("val", eval_env)
        if self.monitor in names:
            return
        tracks = list(dict.fromkeys(name for name, _ in held_out_envs(eval_env)))
        track = next((name for name in tracks if self.monitor.startswith(f"val/{name}/")), None)
        if track is None and self.monitor.count("/") > 1:
            other = self.monitor.split("/")[1]
            add = f", or add {other} to data.eval_env.retro_state" if eval_env.retro_state is not None else ""
            raise ConfigError(
                f"evaluation.monitor is {self.monitor}, but the evaluation plays {', '.join(tracks)} only "
                f"(data.eval_env): monitor a track it plays, such as val/{tracks[0]}/return_mean{add}."
            )
        # The overall means, and one track's own (the monitored track's, if it names one).
        shown = [name for name in names if name.startswith(("val/episode_", f"val/{track or tracks[0]}/"))]
        raise ConfigError(
            f"evaluation.monitor is {self.monitor}, which the evaluation does not compute: name one of its "
            f"metrics ({', '.join(shown)}{', ...' if len(tracks) > 1 else ''})."
        )

    def checkpoint_folder(self, trainer: Trainer) -> Path | None:
        """Where the best checkpoint goes: the checkpoint callback's folder, if there is one."""
        dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
        return Path(dirpath) if dirpath else None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        folder = self.checkpoint_folder(trainer)
        if self.save_best and folder is not None and trainer.is_global_zero:
            # Left behind by a run killed while it evaluated.
            for path in folder.glob(f"{self.EVALUATED_PREFIX}*.ckpt"):
                remove_checkpoint(path)

    def make_job(self, trainer: Trainer, pl_module: LightningModule, policy: bytes) -> EvaluationJob:
        folder = self.checkpoint_folder(trainer)
        if self.save_best and folder is not None:
            self.discard_evaluated(trainer)  # a failed evaluation's
            self.evaluated = folder / f"{self.EVALUATED_PREFIX}{trainer.global_step}.ckpt"
            trainer.save_checkpoint(self.evaluated, weights_only=False)
        data = trainer.datamodule
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
        # What EarlyStopping reads.
        trainer.callback_metrics.update({name: torch.tensor(value) for name, value in metrics.items()})
        if self.evaluated is not None and trainer.is_global_zero:
            self.keep_if_best(self.evaluated, reply["step"], metrics)
        self.evaluated = None

    def keep_if_best(self, evaluated: Path, step: int, metrics: dict[str, float]) -> None:
        """Make `evaluated` (the checkpoint of `step`) the best checkpoint if its score beats the best."""
        if self.monitor not in metrics:
            remove_checkpoint(evaluated)
            # fit checked the name at its start (check_monitor): no episode of this evaluation gave
            # the stat (a race time where no race finished), or the callback runs outside the CLI.
            warnings.warn(
                f"evaluation.monitor {self.monitor} has no value in the evaluation of step {step}, so its "
                "checkpoint is not kept as the best: monitor a metric every evaluation gives, such as "
                "val/episode_return or val/TRACK/return_mean.", stacklevel=1,
            )
            return
        score = metrics[self.monitor]
        better = self.best_score is None or (score > self.best_score if self.mode == "max" else score < self.best_score)
        if better:
            move_checkpoint(evaluated, evaluated.with_name(self.BEST_NAME))
            self.best_score, self.best_step = score, step
        else:
            remove_checkpoint(evaluated)

    def discard_evaluated(self, trainer: Trainer) -> None:
        if self.evaluated is not None and trainer.is_global_zero:
            remove_checkpoint(self.evaluated)
        self.evaluated = None

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        self.discard_evaluated(trainer)  # its score never came back

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        self.discard_evaluated(trainer)

    def state_dict(self) -> dict[str, Any]:
        return {
            "monitor": self.monitor, "mode": self.mode, "best_score": self.best_score, "best_step": self.best_step
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A best score by another measure says nothing about this one's.
        if (state_dict.get("monitor"), state_dict.get("mode")) == (self.monitor, self.mode):
            self.best_score, self.best_step = state_dict["best_score"], state_dict["best_step"]


class EpisodeRecorder(_PeriodicPolicyCallback):
    """Records an episode of the current policy in its own process: a GIF at the emulator's full
    resolution and, for races, the trajectory over the track's map. Files go to
    `LOG_DIR/recordings/step_STEP-TRACK.gif` (and `.png`); both are logged to TensorBoard under
    `record/`. Off unless every_n_steps or every_minutes is set.

    Args:
        every_n_steps: learner steps between recordings; null for none by steps.
        every_minutes: minutes between recordings; null for none by time.
        track: the state to record (a stable-retro state name or file); null: the first of data.eval_env.retro_state.
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
        super().__init__("episode recorder", "recorder", every_n_steps, every_minutes, final_wait_s)
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


class StopAtThreshold(Callback):
    """Ends fit after the first learner step at which a logged metric reaches a threshold, as
    RLlib's stopping criteria do: `--stop.monitor train/episode_return --stop.threshold 400`.

    Lightning's EarlyStopping (`stopping_threshold`) checks at the end of an epoch or of its own
    validation loop, neither of which comes in this endless stream of batches; this checks after
    every step. Any metric fit logs works: the training means (`train/episode_return`, the mean of
    the last 100 episodes), or a held-out score (`val/...`), which counts once its evaluation
    reports. The run ends as at its frame budget: `last.ckpt` is saved, and `--ckpt_path last`
    with a higher threshold goes on. Off unless `monitor` is set.

    Args:
        monitor: the metric to watch; null: never stop early.
        threshold: the value that ends the run.
        mode: max: stop when the metric is at or above the threshold; min: at or below.
    """

    def __init__(
        self, monitor: str | None = None, threshold: float | None = None, mode: Literal["max", "min"] = "max"
    ) -> None:
        if monitor is not None and threshold is None:
            raise ConfigError(
                f"stop.monitor is {monitor} but stop.threshold is not set: set --stop.threshold, or --stop.monitor null."
            )
        if monitor is None and threshold is not None:
            raise ConfigError(
                f"stop.threshold is {threshold:g} but stop.monitor is not set: set --stop.monitor (train/episode_return, "
                "say), or --stop.threshold null."
            )
        self.monitor, self.threshold, self.mode = monitor, threshold, mode
        self.seen = False

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        if self.monitor is None:
            return
        value = trainer.callback_metrics.get(self.monitor)
        self.seen = self.seen or value is not None
        reached = value is not None and (value >= self.threshold if self.mode == "max" else value <= self.threshold)
        # Every rank stops after the same step (the training means are the job's, the same on each).
        if trainer.strategy.reduce_boolean_decision(bool(reached), all=False):
            trainer.should_stop = True
            if value is not None:
                rank_zero_info(f"{self.monitor} is {float(value):g} at step {trainer.global_step}, past "
                               f"stop.threshold {self.threshold:g}: fit ends here.")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.monitor is not None and not self.seen and trainer.is_global_zero:
            warnings.warn(
                f"stop.monitor is {self.monitor}, which fit never logged: name one of its metrics, "
                "such as train/episode_return.", stacklevel=1,
            )
