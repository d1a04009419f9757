"""Throughput of one kart_lightning config in env frames/s: the env-bound limit E, the learner-bound
limit L, C = 1 / (1/E + 1/L), and the real trainer's steady state against them, in one run."""

import argparse
import inspect
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.multiprocessing as mp
from jsonargparse import ArgumentError
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import GradClipAlgorithmType

import kart_lightning
from kart_lightning.cli import ImpalaCLI, build_cli, fail
from kart_lightning.console import quiet_library_notices
from kart_lightning.data.datamodule import ImpalaDataModule
from kart_lightning.data.pool import ActorFailed
from kart_lightning.data.rollout import create_buffers, rollout_spec, stack_slots
from kart_lightning.envs import EnvConfig, make_env
from kart_lightning.errors import ConfigError
from kart_lightning.module import ImpalaModule
from kart_lightning.processes import parent_alive, stop_processes

# Big enough that the frame budget never ends the run; the probe callback does.
UNBOUNDED_FRAMES = 10**18
# Env construction (ROM loading, the child's imports under spawn) is not part of any window.
ENV_READY_TIMEOUT_S = 300.0
PARENT_CHECK_S = 1.0
JOIN_TIMEOUT_S = 5.0


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """This script's own options; everything else is handed to the kart_lightning CLI parser."""
    parser = argparse.ArgumentParser(
        usage="python benchmarks/throughput.py --config CONFIG [overrides...] [--seconds S] "
        "[--warmup_s S] [--out FILE]",
        description=" ".join(__doc__.split()),
        epilog="Every other argument (--config, --model.*, --data.*, --trainer.*) is parsed as by "
        "`python -m kart_lightning fit`, e.g. --model.torso shallow --data.batch_size 8.",
    )
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each measured window")
    parser.add_argument("--warmup_s", type=float, default=20.0, help="warm-up before each window")
    parser.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    return parser.parse_known_args(argv)


def build_timing_cli(cli_args: list[str], run_dir: str) -> ImpalaCLI:
    """Model, datamodule and trainer exactly as `fit` builds them, then made fit for timing: no
    frame budget, no validation, no checkpoint files, no logger, no progress bar."""
    timing_args = [
        "--model.max_frames", str(UNBOUNDED_FRAMES),
        "--trainer.limit_val_batches", "0",
        "--trainer.logger", "false",
        "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false",
        "--trainer.default_root_dir", run_dir,
        # The CLI always adds its ModelCheckpoint; with top-k 0 and no last it never writes.
        "--checkpoint.dirpath", run_dir,
        "--checkpoint.save_top_k", "0",
        "--checkpoint.save_last", "false",
        "--checkpoint.every_n_train_steps", "0",
        # Nor does the evaluation keep the checkpoints it scores.
        "--evaluation.save_best", "false",
    ]
    # Lightning warns when sys.argv and args are both given; ours are sys.argv minus this script's options.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    # Ours come last so they win over the config and the user's overrides.
    return build_cli([*cli_args, *timing_args], run=False, prog="python benchmarks/throughput.py",
                     save_config_callback=None)


# (a) E: the env-bound limit ------------------------------------------------------------------


def step_random_envs(
    env: EnvConfig, num_envs: int, seed: int, index: int, parent_pid: int, ready, steps, stop
) -> None:
    """Child process: step `num_envs` envs with uniform-random actions until told to stop, counting
    agent steps in steps[index]. Seeds follow the actor's (seed + k for env k)."""
    torch.set_num_threads(1)
    envs = [make_env(env, seed=seed + k) for k in range(num_envs)]
    try:
        ready[index] = 1
        count = 0
        next_parent_check = time.monotonic() + PARENT_CHECK_S
        while not stop.value:
            for instance in envs:
                _, _, terminated, truncated, _ = instance.step(instance.action_space.sample())
                if terminated or truncated:
                    instance.reset()
            count += num_envs
            steps[index] = count
            # An orphan would step forever if the parent was killed before it could stop us.
            if time.monotonic() > next_parent_check:
                if not parent_alive(parent_pid):
                    return
                next_parent_check = time.monotonic() + PARENT_CHECK_S
    except KeyboardInterrupt:
        # Ctrl-C reaches the whole process group; the parent reports it.
        pass
    finally:
        for instance in envs:
            instance.close()


def measure_env_bound(data: ImpalaDataModule, warmup_s: float, seconds: float, ranks: int = 1) -> dict:
    """E: env frames/s of data.num_actors processes × data.envs_per_actor envs under a random
    policy, for each of the `ranks` on this machine."""
    hp = data.hparams
    num_actors = hp.num_actors * ranks  # the ranks' actors are numbered one after the other
    context = mp.get_context(hp.start_method)
    ready = context.RawArray("b", num_actors)
    steps = context.RawArray("q", num_actors)
    stop = context.RawValue("b", 0)
    processes = [
        context.Process(
            target=step_random_envs,
            args=(data.env, hp.envs_per_actor, hp.seed + 10_000 * index, index, os.getpid(),
                  ready, steps, stop),
            name=f"kart-random-actor-{index}",
            daemon=True,
        )
        for index in range(num_actors)
    ]
    try:
        for process in processes:
            process.start()
        if not wait_alive(processes, ENV_READY_TIMEOUT_S, until=lambda: all(ready)):
            raise TimeoutError(f"the random-policy processes built no envs in {ENV_READY_TIMEOUT_S:.0f} s.")
        wait_alive(processes, warmup_s)
        start_s, start_steps = time.monotonic(), sum(steps)
        wait_alive(processes, seconds)
        end_s, end_steps = time.monotonic(), sum(steps)
    finally:
        stop.value = 1
        # Asked to stop above; the ones that never started have nothing to join.
        stop_processes([process for process in processes if process.pid is not None], JOIN_TIMEOUT_S, terminate=False)
    agent_steps_per_s = (end_steps - start_steps) / (end_s - start_s)
    return {
        "env_frames_per_s": agent_steps_per_s * data.env_frames_per_step,
        "agent_steps_per_s": agent_steps_per_s,
        "processes": num_actors,
        "envs_per_process": hp.envs_per_actor,
        "torch_threads_per_process": 1,
        "window_s": end_s - start_s,
    }


def wait_alive(processes: list, timeout_s: float, until: Callable[[], bool] = lambda: False) -> bool:
    """Wait up to `timeout_s` for `until()` (by default the whole time) and return it; raise if a
    process dies meanwhile, as a dead process would silently lower E."""
    deadline = time.monotonic() + timeout_s
    while not until() and time.monotonic() < deadline:
        for process in processes:
            if not process.is_alive():
                raise RuntimeError(
                    f"{process.name} exited with code {process.exitcode} (its traceback is above)."
                )
        time.sleep(0.05)
    return until()


# (b) the trainer in steady state ---------------------------------------------------------------


class SteadyStateProbe(Callback):
    """Samples (time, env frames, learner step) at each batch end; the window opens `warmup_s` after
    the first batch (so actor start-up is excluded) and stops the trainer `seconds` later.

    Policy lag is the module's own: learner step minus the mean version of the weights that acted
    on the batch's fresh unrolls, taken as each batch starts, kept on the device to add no
    synchronisation.
    """

    def __init__(self, warmup_s: float, seconds: float) -> None:
        self.warmup_s, self.seconds = warmup_s, seconds
        self.first_batch_s: float | None = None
        self.start: tuple[float, int, int] | None = None
        self.end: tuple[float, int, int] | None = None
        self.lags: list[torch.Tensor] = []
        self.learner_threads = 0

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The datamodule's setup has given the learner its share of the cores by now.
        self.learner_threads = torch.get_num_threads()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.start is not None:
            # Of the fresh unrolls, as the module logs it (replayed ones are older on purpose).
            fresh = (~batch["replayed"]).to(batch["policy_version"].device).float()
            versions = (batch["policy_version"].float() * fresh).sum() / fresh.sum()
            self.lags.append(trainer.global_step - versions)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        sample = (time.monotonic(), int(pl_module.env_frames), trainer.global_step)
        if self.first_batch_s is None:
            self.first_batch_s = sample[0]
        opens = self.start is None and sample[0] - self.first_batch_s >= self.warmup_s
        closes = self.start is not None and sample[0] - self.start[0] >= self.seconds
        # Rank 0's clock decides for every rank, at every step: ranks that opened or closed the
        # window on different steps would call different collectives, or stop apart, and hang.
        opens, closes = trainer.strategy.broadcast((opens, closes))
        if opens:
            self.start = sample
        elif closes:
            self.end = sample
            trainer.should_stop = True


def measure_trainer(cli: ImpalaCLI, warmup_s: float, seconds: float) -> dict:
    """The real Trainer.fit: env frames/s, learner steps/s and policy lag over the steady window."""
    probe = SteadyStateProbe(warmup_s, seconds)
    cli.trainer.callbacks.append(probe)
    try:
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    finally:
        # Lightning tears the pool down itself; this covers an exception it did not see.
        cli.datamodule.teardown("fit")
    if probe.end is None:
        raise RuntimeError(
            "the trainer stopped before the measured window ended (a max_steps or max_time in the "
            "config?): remove the limit or shorten --seconds/--warmup_s."
        )
    (start_s, start_frames, start_step), (end_s, end_frames, end_step) = probe.start, probe.end
    window_s = end_s - start_s
    return {
        "env_frames_per_s": (end_frames - start_frames) / window_s,
        "learner_steps_per_s": (end_step - start_step) / window_s,
        "policy_lag": float(torch.stack(probe.lags).mean()),
        "learner_threads": probe.learner_threads,
        "window_s": window_s,
    }


# (c) L: the learner-bound limit ------------------------------------------------------------------


def synthetic_batch(module: ImpalaModule, data: ImpalaDataModule) -> dict[str, torch.Tensor]:
    """A learner batch of the rollout spec's fields, shapes and dtypes ([T+1, B, ...]), filled with
    plausible random values: actions in range, rewards in {-1, 0, 1}, 1% episode ends."""
    hp = data.hparams
    core_state_size = module.policy.initial_state(1)[0].shape[-1]
    spec = rollout_spec(data.obs_shape, data.obs_dtype, data.num_actions, hp.unroll_length, core_state_size,
                        tuple(data.extra_stats))
    buffers = create_buffers(spec, hp.batch_size)
    obs = buffers["obs"]
    if obs.dtype == torch.uint8:
        obs.copy_(torch.randint(0, 256, obs.shape, dtype=torch.uint8))
    else:
        obs.normal_()
    for name in ("action", "prev_action"):
        buffers[name].random_(0, data.num_actions)
    buffers["reward"].random_(-1, 2)
    buffers["done"].copy_(torch.rand(buffers["done"].shape) < 0.01)
    buffers["behaviour_logits"].normal_()
    return stack_slots(buffers, list(range(hp.batch_size)))


def fresh_module(module: ImpalaModule) -> ImpalaModule:
    """A new module with the same hyperparameters, untouched by the trainer's run."""
    init_args = inspect.signature(type(module)).parameters
    # hparams also holds what the CLI adds for load_from_checkpoint (`_instantiator`).
    return type(module)(**{name: value for name, value in module.hparams.items() if name in init_args})


def measure_learner_bound(
    module: ImpalaModule, data: ImpalaDataModule, trainer: Trainer, warmup_s: float, seconds: float
) -> dict:
    """L: learner steps/s on one resident synthetic batch with every core: forward, compute_loss,
    backward, the trainer's gradient clipping, the module's optimizer and lr scheduler."""
    torch.set_num_threads(os.cpu_count() or 1)
    device = trainer.strategy.root_device
    precision = trainer.precision_plugin
    batch = synthetic_batch(module, data)
    module = precision.convert_module(module).to(device).train()
    batch = precision.convert_input({name: tensor.to(device) for name, tensor in batch.items()})
    optimizer, scheduler = optimizer_and_scheduler(module.configure_optimizers())
    clip_val = trainer.gradient_clip_val or 0.0
    clip_algorithm = trainer.gradient_clip_algorithm or GradClipAlgorithmType.NORM

    def learner_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        # The trainer's precision context (autocast under mixed precision); 16-mixed loss scaling
        # is left out, it costs little next to the forward and backward passes.
        with precision.train_step_context():
            loss = module.compute_loss(module.augment(batch))["loss"]
        loss.backward()
        precision.clip_gradients(optimizer, clip_val, clip_algorithm)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()

    steps, window_s = time_steps(learner_step, device, warmup_s, seconds)
    hp = data.hparams
    steps_per_s = steps / window_s
    return {
        # Env frames are fresh ones: with replay, part of each batch is replayed.
        "env_frames_per_s": steps_per_s * hp.unroll_length * data.fresh_per_batch * data.env_frames_per_step,
        "learner_steps_per_s": steps_per_s,
        "learner_threads": torch.get_num_threads(),
        "window_s": window_s,
    }


def optimizer_and_scheduler(configured) -> tuple[torch.optim.Optimizer, object | None]:
    """The optimizer and optional scheduler from configure_optimizers' plain or dict form."""
    if not isinstance(configured, dict):
        return configured, None
    scheduler = configured.get("lr_scheduler")
    if isinstance(scheduler, dict):
        scheduler = scheduler["scheduler"]
    return configured["optimizer"], scheduler


def time_steps(step: Callable[[], None], device: torch.device, warmup_s: float, seconds: float):
    """Run `step` for `warmup_s`, then a fixed number of steps filling about `seconds`, synchronising
    the device only around the timed block so GPU work overlaps the Python that issues it.
    Returns (steps, elapsed seconds)."""

    def synchronize() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    durations = []
    warmup_end = time.monotonic() + warmup_s
    while len(durations) < 2 or time.monotonic() < warmup_end:
        begin = time.monotonic()
        step()
        synchronize()
        durations.append(time.monotonic() - begin)
    # The first steps pay for allocation and autotuning; the median of the rest is the step time.
    steps = max(1, math.ceil(seconds / statistics.median(durations[1:])))
    synchronize()
    begin = time.monotonic()
    for _ in range(steps):
        step()
    synchronize()
    return steps, time.monotonic() - begin


# (d) report ------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores)"


def config_name(cli_args: list[str]) -> str:
    """The config file's name and the overrides, as the README's table shows them."""
    return " ".join(Path(arg).name if arg.endswith((".yaml", ".yml")) else arg
                    for arg in cli_args if arg != "--config")


def inference_mode(data: ImpalaDataModule, device: torch.device) -> str:
    """Where the actors' actions were computed: data.inference, with `auto` resolved."""
    configured = data.hparams.inference
    return f"auto: {data.inference_mode(device)}" if configured == "auto" else configured


def summarize(cli_args: list[str], cli: ImpalaCLI, env_bound: dict, trainer: dict, learner: dict) -> dict:
    hp = cli.datamodule.hparams
    E, L, trained = env_bound["env_frames_per_s"], learner["env_frames_per_s"], trainer["env_frames_per_s"]
    C = 1.0 / (1.0 / E + 1.0 / L)
    device = cli.trainer.strategy.root_device
    return {
        "config": config_name(cli_args),
        "args": cli_args,
        "device": device_name(device),
        "inference": inference_mode(cli.datamodule, device),
        "env": cli.datamodule.env.id,
        "torso": cli.model.hparams.torso,
        "num_actors": hp.num_actors,
        "envs_per_actor": hp.envs_per_actor,
        "unroll_length": hp.unroll_length,
        "batch_size": hp.batch_size,
        "replay_ratio": cli.datamodule.replay.ratio,
        "ranks": cli.trainer.world_size,
        "env_frames_per_step": cli.datamodule.env_frames_per_step,
        "E": E,
        "L": L,
        "C": C,
        "trainer": trained,
        "trainer_over_E": trained / E,
        "trainer_over_L": trained / L,
        "trainer_over_C": trained / C,
        "learner_steps_per_s": trainer["learner_steps_per_s"],
        "policy_lag": trainer["policy_lag"],
        "env_bound": env_bound,
        "trainer_run": trainer,
        "learner_bound": learner,
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "accelerator": device.type,
            "precision": str(cli.trainer.precision),
            "kart_lightning": str(Path(kart_lightning.__file__).parent),
        },
    }


MARKDOWN_HEADER = (
    "| config | device | inference | E | L | C | trainer | trainer/C | learner steps/s | lag |\n"
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"
)


def markdown_row(result: dict) -> str:
    cells = [
        f"`{result['config']}`", result["device"], result["inference"],
        *(f"{result[key]:,.0f}" for key in ("E", "L", "C", "trainer")),
        f"{result['trainer_over_C']:.2f}", f"{result['learner_steps_per_s']:.2f}",
        f"{result['policy_lag']:.2f}",
    ]
    return "| " + " | ".join(cells) + " |"


def print_report(result: dict) -> None:
    env_bound, trainer, learner = result["env_bound"], result["trainer_run"], result["learner_bound"]
    print(f"\n{result['config']} on {result['device']}, inference: {result['inference']}, "
          f"T={result['unroll_length']} B={result['batch_size']}, "
          f"{result['env_frames_per_step']} env frames per agent step, "
          f"load average before {result['machine']['load_average_1min_before']:.2f}")
    print(f"  E        {result['E']:>12,.0f} env frames/s  random policy, {env_bound['processes']} "
          f"processes x {env_bound['envs_per_process']} envs, 1 torch thread each")
    print(f"  L        {result['L']:>12,.0f} env frames/s  learner alone, "
          f"{learner['learner_steps_per_s']:.2f} steps/s, torch threads {learner['learner_threads']}"
          f"{', one rank' if result['ranks'] > 1 else ''}")
    print(f"  C        {result['C']:>12,.0f} env frames/s  1 / (1/E + 1/L)")
    print(f"  trainer  {result['trainer']:>12,.0f} env frames/s  {trainer['learner_steps_per_s']:.2f} "
          f"steps/s, policy lag {trainer['policy_lag']:.2f}, learner threads {trainer['learner_threads']}")
    print(f"  trainer/E {result['trainer_over_E']:.2f}  trainer/L {result['trainer_over_L']:.2f}  "
          f"trainer/C {result['trainer_over_C']:.2f}   (windows: E {env_bound['window_s']:.1f} s, "
          f"trainer {trainer['window_s']:.1f} s, L {learner['window_s']:.1f} s)")
    print(f"\n{MARKDOWN_HEADER}\n{markdown_row(result)}")


def launched_rank() -> bool:
    """Whether this process is a rank other than 0 that a launcher started: Lightning's DDP runs
    this script again for each further rank on the machine, torchrun starts every rank. Such a
    rank only trains (b), following rank 0's window; rank 0 measures and reports."""
    return any(int(os.environ.get(name, "0")) > 0 for name in ("RANK", "LOCAL_RANK", "NODE_RANK"))


def main(argv: list[str] | None = None) -> None:
    options, cli_args = parse_args(sys.argv[1:] if argv is None else argv)
    quiet_library_notices()
    if launched_rank():
        with tempfile.TemporaryDirectory(prefix="kart-throughput-") as run_dir:
            measure_trainer(build_timing_cli(cli_args, run_dir), options.warmup_s, options.seconds)
        return
    # Other work on the cores skews every number, L most: its threads wait on each other when one
    # is preempted. The load before the run makes a busy machine visible in the results.
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="kart-throughput-") as run_dir:
        try:
            cli = build_timing_cli(cli_args, run_dir)
        except ArgumentError as error:
            fail(f"{' '.join(str(error).split())} (see `python -m kart_lightning fit --help`).")
        except ConfigError as error:
            fail(str(error))
        print(f"(a) env-bound limit: {options.warmup_s:g} s warm-up, {options.seconds:g} s measured",
              flush=True)
        # With several ranks on this machine, E steps all their actors.
        env_bound = measure_env_bound(cli.datamodule, options.warmup_s, options.seconds, ranks=cli.trainer.num_devices)
        print("(b) trainer with learning", flush=True)
        try:
            trainer = measure_trainer(cli, options.warmup_s, options.seconds)
        except ActorFailed as error:
            fail(str(error), exit_code=1)
        print("(c) learner-bound limit", flush=True)
        learner = measure_learner_bound(fresh_module(cli.model), cli.datamodule, cli.trainer,
                                        options.warmup_s, options.seconds)
    result = summarize(cli_args, cli, env_bound, trainer, learner)
    result["machine"]["load_average_1min_before"] = load_before
    print_report(result)
    if options.out is not None:
        options.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {options.out}")


if __name__ == "__main__":
    main()
