"""`launch`: run one job on Ray Train, from a laptop (embedded Ray on 127.0.0.1) to an existing cluster.

The driver resolves the run directory, writes the resolved spec, makes relative paths absolute (workers do not
share the driver's working directory), starts or joins Ray, and runs a `TorchTrainer` whose `ScalingConfig` and
`RunConfig` come from the spec. Checkpoints live in RUN_DIR/checkpoints (written by the workers, atomically);
every attempt of the worker group, a re-run of the same job, and `--resume` continue from the latest one.
While it waits, the driver shows a rich progress bar (followed from metrics.jsonl) or, without a terminal, the
workers' plain log lines; SIGINT/SIGTERM/SIGUSR1 make the workers checkpoint and exit cleanly (train/signals.py),
and an embedded Ray is shut down before `launch` returns. A collective that times out (a rank stopped answering)
fails the run with an error naming the rank(s) that waited and the one(s) that did not answer.
"""

import json
import os
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from hepml_dist import runs
from hepml_dist.data.loader import open_stream
from hepml_dist.data.reader import is_local
from hepml_dist.data.shards import ShardResolver
from hepml_dist.errors import UserError
from hepml_dist.models import get_family
from hepml_dist.precision import CPU_FP16_NOTE, require_precision
from hepml_dist.spec import JobSpec, load_job
from hepml_dist.spec.parallel import ACCELERATORS, ParallelSpec
from hepml_dist.track.tracker import run_info
from hepml_dist.train.distributed import CollectiveTimeoutError, is_collective_timeout
from hepml_dist.train.loop import train_loop_per_worker
from hepml_dist.train.ray_setup import WORKER_SETUP_HOOK
from hepml_dist.train.session import clear_stop
from hepml_dist.train.signals import StopOnSignals
from hepml_dist.train.startup import StartupClock

RAY_DIR = "ray"  # Ray Train's own bookkeeping inside the run directory
WORKER_ENV = {
    # Comet must not probe the machine or the network (see track/tracker.py).
    "COMET_AUTO_LOG_ENV_DETAILS": "false",
    "COMET_AUTO_LOG_ENV_HOST": "false",
    "COMET_AUTO_LOG_GIT_METADATA": "false",
    "COMET_AUTO_LOG_GIT_PATCH": "false",
    "COMET_ERROR_TRACKING_ENABLE": "false",
    "PYTHONUNBUFFERED": "1",
}


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    finished: bool
    stopped: bool
    metrics: dict[str, Any]
    stop_signal: str | None = None
    """The signal that asked the run to stop (SIGINT, SIGTERM, SIGUSR1), if one did."""


SAFE_TO_CHANGE = ("training.epochs", "training.steps", "training.eval_interval", "training.log_interval",
                  "training.nan_policy", "checkpoint", "tracking", "cluster", "description", "parallel.cpus_per_worker",
                  "parallel.collective_timeout_s")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def check_resumable(spec: JobSpec, run_dir: Path) -> int | None:
    """If the run directory has checkpoints, the step it resumes from; refuses a changed model or data setup."""
    latest = runs.latest_checkpoint(run_dir)
    if latest is None:
        return None
    old = _flatten(load_job(latest / "spec.yaml").model_dump(mode="json"))
    new = _flatten(spec.model_dump(mode="json"))
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and not k.startswith(SAFE_TO_CHANGE))
    if changed:
        raise UserError(
            f"{run_dir} holds checkpoints of a different job (changed: {', '.join(changed[:8])}); "
            "train into a new run directory (--run-dir DIR or --set name=...) or restore those fields"
        )
    return int(runs.read_state(latest).get("step", 0))


def scaling_config(parallel: ParallelSpec):
    """Workers, GPUs and CPUs per worker, and the accelerator type to place them on."""
    use_gpu = parallel.gpus_per_worker > 0
    resources = {"CPU": parallel.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = parallel.gpus_per_worker
    types = [ACCELERATORS[a].ray_type for a in parallel.accelerators]
    # One type can be required; for a list of types (one vendor) placement is left to the cluster.
    accelerator_type = types[0] if len(types) == 1 else None
    return ScalingConfig(
        num_workers=parallel.num_workers, use_gpu=use_gpu, resources_per_worker=resources, accelerator_type=accelerator_type
    )


EMBEDDED_RAY_ENV = {
    # One machine that nobody drains: no preemption-watcher actor (a process of its own), no Prometheus metrics
    # of Ray Train (nothing scrapes an embedded Ray). Set only where unset, so a user can turn either back on.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
}


def start_ray(spec: JobSpec, address: str | None) -> bool:
    """Join the cluster at `address`, or start an embedded Ray bound to 127.0.0.1. Returns whether we started it."""
    if ray.is_initialized():
        return False
    if address and address != "local":
        ray.init(address=address, log_to_driver=True)
        return False
    for name, value in EMBEDDED_RAY_ENV.items():  # read by the Train controller, which inherits our environment
        os.environ.setdefault(name, value)
    p = spec.parallel
    needed = p.num_workers * p.cpus_per_worker + 1  # + the Train controller
    ray.init(
        num_cpus=int(max(needed, os.cpu_count() or 1, 4)),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
        runtime_env={"worker_process_setup_hook": WORKER_SETUP_HOOK},
    )
    return True


def check_local_gpus(spec: JobSpec) -> None:
    """An embedded Ray has this machine's GPUs only: a job asking for more would wait for them forever (Ray Train
    retries an infeasible worker group), so say so before starting."""
    p = spec.parallel
    wanted = p.num_workers * p.gpus_per_worker
    if wanted <= 0:
        return
    have = torch.cuda.device_count()  # CUDA and ROCm builds alike
    if have < wanted:
        raise UserError(
            f"parallel: {p.num_workers} worker(s) x {p.gpus_per_worker:g} GPU ({', '.join(p.accelerators)}) need "
            f"{wanted:g} GPU(s), and this machine has {have}. Run it on a GPU node (hepml submit / SLURM, "
            "docs/ray.md), or train on CPU here: --set parallel.accelerator=cpu --set parallel.gpus_per_worker=0"
        )


def check_local_data(spec: JobSpec) -> None:
    """An embedded Ray's workers read the shards from this machine: a local shard path that training reads and
    that does not resolve here (no such folder, no manifest, a glob matching nothing) fails now, naming the field,
    instead of in every worker after the start-up. `data.test` is left alone (training never reads it: the test
    split may not exist yet), and so are URLs (no network traffic from this check)."""
    fields = [(f"data.{split}", getattr(spec.data, split)) for split in ("train", "val")]
    fields += [(f"data.groups[{i}].train", group.train) for i, group in enumerate(spec.data.groups or [])]
    resolver = ShardResolver()
    for field, patterns in fields:
        items = [] if patterns is None else [patterns] if isinstance(patterns, str) else list(patterns)
        local = [str(item) for item in items if is_local(str(item))]
        if not local:
            continue
        try:
            resolver.resolve(local)
        except UserError as err:
            raise UserError(f"{field}: {str(err).removeprefix('data: ')}") from None


def resolve_steps_per_epoch(spec: JobSpec) -> JobSpec:
    """`data.steps_per_epoch` as the loader will derive it (one pass over the training split on the job's ranks),
    filled in so that the run's spec.yaml, the progress bar and a later resume all see the number. Where this
    machine cannot open the training data (a cluster path), it is left for the workers to derive."""
    if spec.data.steps_per_epoch is not None or spec.training.epochs is None or spec.data.train is None:
        return spec
    try:
        with warnings.catch_warnings():  # layout advice (few shards, ...) is given by the workers' rank 0
            warnings.simplefilter("ignore")
            stream = open_stream(spec.data, "train", rank=0, world_size=spec.parallel.num_workers,
                                 seed=spec.training.seed, training=True)
    except (UserError, OSError):
        return spec
    data = spec.data.model_copy(update={"steps_per_epoch": stream.steps_per_epoch})
    return spec.model_copy(update={"data": data})


def check_local_precision(spec: JobSpec) -> None:
    """A CPU job in a precision this torch cannot run on CPU fails here, before Ray starts; fp16 on CPU runs, with
    a note that it is a test of the fp16 path."""
    if spec.parallel.accelerators != ["cpu"]:
        return  # GPU workers check their own device (make_engine)
    require_precision(torch.device("cpu"), spec.training.precision)
    if spec.training.precision == "fp16-mixed":
        print(f"[hepml] note: {CPU_FP16_NOTE}", flush=True)


def worker_env(spec: JobSpec, embedded: bool) -> dict[str, str]:
    env = dict(WORKER_ENV)
    if spec.parallel.accelerators == ["cpu"]:
        env["DS_ACCELERATOR"] = "cpu"
        env["OMP_NUM_THREADS"] = str(max(1, int(spec.parallel.cpus_per_worker)))
        # Ray Train runs the loop in a thread of its own, which gets a glibc malloc arena of its own: 64 MiB heaps
        # that are unmapped when a step frees its activations and mapped again by the next step. With one arena
        # the step's memory stays on the main heap (tuned by hepml_dist.data.handover.tune_malloc). Measured on a
        # ParT CPU worker: munmap 2,871 -> 249 and madvise 1,672 -> 0 calls in 6 s (benchmarks/results.md).
        env["MALLOC_ARENA_MAX"] = os.environ.get("MALLOC_ARENA_MAX", "1")
    if not embedded and os.environ.get("COMET_API_KEY"):
        # Workers of an embedded Ray inherit it; on a cluster it travels in the runtime environment (memory only).
        env["COMET_API_KEY"] = os.environ["COMET_API_KEY"]
    return env


def launch(
    spec: JobSpec,
    *,
    address: str | None = None,
    run_dir: Path | None = None,
    progress: bool | None = None,
    callbacks: list | None = None,
    startup: StartupClock | None = None,
) -> TrainResult:
    """Train `spec` on Ray; returns where the run stands (finished, or stopped by a signal)."""
    address = address or (spec.cluster.address if spec.cluster.address != "local" else None)
    if not address or address == "local":
        check_local_gpus(spec)
        check_local_precision(spec)
    spec = resolve_steps_per_epoch(runs.absolute_paths(spec))
    run_dir = (run_dir or runs.default_run_dir(spec)).resolve()
    resume_step = check_resumable(spec, run_dir)
    if not address or address == "local":
        check_local_data(spec)
    run_dir.mkdir(parents=True, exist_ok=True)
    runs.remove_stale_temp_folders(run_dir)
    clear_stop(run_dir)
    runs.clear_failure(run_dir)
    runs.write_run_spec(run_dir, spec)
    if resume_step is not None:
        print(f"[hepml] {run_dir}: resuming from step {resume_step}", flush=True)

    embedded = start_ray(spec, address)
    if startup is not None:
        startup.mark("ray")
    try:
        stop_signal = _fit(spec, run_dir, embedded, progress, callbacks, startup)
    finally:  # also after a second Ctrl-C (signals.StoppedAtOnce)
        if embedded:
            ray.shutdown()  # stop what we started before saying the run is over (and how to resume it)
    failure = runs.read_failure(run_dir)
    if failure:
        raise UserError(failure)
    latest = runs.latest_checkpoint(run_dir)
    state = runs.read_state(latest) if latest else {}
    # Ray V2 keeps no metrics reported without a checkpoint: the run directory is the record of where the run stands.
    return TrainResult(run_dir, int(state.get("step", 0)), bool(state.get("finished")), bool(state.get("stopped")),
                       state.get("metrics", {}), stop_signal)


class _Trainer(TorchTrainer):
    """Ray Train's trainer without its Ctrl-C handler, which aborts the workers before they checkpoint: SIGINT is
    handled like SIGTERM (`StopOnSignals`); and without its Ray Data callback, since the shards are read by our own
    loader: that callback starts a DatasetManager actor and imports Ray Data into the controller and every worker,
    seconds of start-up on a small machine for nothing.

    On an embedded Ray (`embedded=True`) it also leaves out two actors that only matter on a shared, autoscaling
    cluster, each a process of its own that imports Ray Train and Ray Data (2.4-2.9 s of CPU each on a 2-core
    machine, on the start-up's critical path): the placement-group cleaner, which removes the workers' placement
    group if the controller dies (an embedded Ray goes away with the run), and the autoscaling coordinator, which
    tells an autoscaler what the workers need (an embedded Ray has one fixed node)."""

    def __init__(self, *args, embedded: bool = False, **kwargs):
        self.embedded = embedded
        super().__init__(*args, **kwargs)

    def _register_sigint_handler(self, controller) -> None:
        return None

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if not self.datasets:
            callbacks = [c for c in callbacks if not isinstance(c, DatasetsCallback)]
        if self.embedded:
            callbacks = [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]
        return callbacks

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        if self.embedded and type(controller_init_kwargs.get("scaling_policy")) is FixedScalingPolicy:
            controller_init_kwargs["scaling_policy"] = FixedSizeOnOneMachine(self.scaling_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)


class FixedSizeOnOneMachine(FixedScalingPolicy):
    """Ray Train's fixed-size policy without the autoscaling coordinator it registers the workers' resources with
    (an actor of Ray Data's): on an embedded Ray nothing scales, and the placement group alone asks for the CPUs."""

    def after_controller_start(self, train_run_context) -> None:
        return None

    def _maybe_send_resource_request(self) -> None:
        return None

    def _send_resource_request(self) -> None:
        return None

    def _cancel_resource_request(self) -> None:
        return None


def _fit(spec: JobSpec, run_dir: Path, embedded: bool, progress: bool | None, callbacks: list | None,
         startup: StartupClock | None = None) -> str | None:
    """Run the worker group to its end; returns the signal that stopped it, if one did."""
    interactive = sys.stdout.isatty() if progress is None else progress
    trainer = _Trainer(
        train_loop_per_worker,
        embedded=embedded,
        train_loop_config={
            "spec": spec.model_dump(mode="json"),
            "run_dir": str(run_dir),
            "ray": True,
            "plain_logs": not interactive,
            "info": run_info(spec),
            "startup": startup.marks if startup is not None else None,  # rank 0 adds its marks, logs the phases
        },
        torch_config=TorchConfig(timeout_s=spec.parallel.collective_timeout_s),
        scaling_config=scaling_config(spec.parallel),
        run_config=RunConfig(
            name=RAY_DIR,
            storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=spec.cluster.max_failures),
            # Checkpoints are kept by the workers (last K + best, atomic folders); Ray only tracks reports.
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            worker_runtime_env={"env_vars": worker_env(spec, embedded)},
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,  # e.g. Tune's TuneReportCallback when a `hepml tune` trial runs this
        ),
    )
    with StopOnSignals(run_dir) as signals, ProgressBar(spec, run_dir, interactive):
        try:
            trainer.fit()
        except KeyboardInterrupt as err:  # a second signal; inside ray.get it arrives as a plain KeyboardInterrupt
            raise (signals.at_once or err) from None
        except Exception as err:  # noqa: BLE001 - turn worker errors we understand into clear messages
            raise _explain(err, spec.parallel) from None
    return signals.first


def _explain(err: Exception, parallel: ParallelSpec) -> Exception:
    """A collective timeout names the ranks that waited and the ones that did not answer; a worker's UserError (bad
    data, non-finite loss, ...) becomes that message; anything else stays as it is."""
    failures = getattr(err, "worker_failures", None) or {}
    timed_out = {rank: f for rank, f in failures.items() if is_collective_timeout(f)}
    if timed_out:
        return _collective_timeout(timed_out, parallel)
    for rank, failure in sorted(failures.items()):
        if isinstance(failure, UserError):
            text = str(failure).strip().splitlines()
            return UserError(f"worker {rank}: {text[-1] if text else failure}")
    return err


def _collective_timeout(timed_out: dict[int, Exception], parallel: ParallelSpec) -> UserError:
    """The ranks whose collective timed out waited for the others; those that reported nothing (still inside their
    step when Ray stopped the group) are the likely cause."""
    waited = sorted(timed_out)
    silent = [r for r in range(parallel.num_workers) if r not in timed_out]
    steps = sorted({f.step for f in timed_out.values() if isinstance(f, CollectiveTimeoutError)})
    where = f" after step {steps[0]}" if steps else ""
    head = (f"collective timed out{where}: rank(s) {_ranks(waited)} waited {parallel.collective_timeout_s} s "
            "(parallel.collective_timeout_s) for the others")
    if not silent:
        return UserError(f"{head}, and every rank did: the ranks were too slow for the timeout or lost their "
                         "connection; raise parallel.collective_timeout_s, or check the network between the nodes")
    return UserError(
        f"{head}; rank(s) {_ranks(silent)} never joined: likely hung. Check the node of rank {silent[0]} (its worker "
        "log above: a stuck file system, a GPU fault, a deadlock), or raise parallel.collective_timeout_s if a rank "
        "legitimately works alone that long (checkpointing, validation metrics, compiling)"
    )


def _ranks(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)


class ProgressBar:
    """A rich progress bar (step, epoch, jets/s or events/s, loss, ETA) fed from RUN_DIR/metrics.jsonl while fit() runs."""

    def __init__(self, spec: JobSpec, run_dir: Path, enabled: bool, console: Console | None = None):
        self.spec, self.path, self.enabled, self.console = spec, run_dir / "metrics.jsonl", enabled, console
        self.examples = get_family(spec.model.family).examples
        self.done = threading.Event()

    def __enter__(self):
        if not self.enabled:
            return self
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TimeRemainingColumn(), transient=False, redirect_stdout=True, redirect_stderr=True,
            console=self.console,
        )
        total = self.spec.training.steps or ((self.spec.training.epochs or 1) * (self.spec.data.steps_per_epoch or 1)
                                            // self.spec.training.grad_accum)
        self.task = self.progress.add_task(self.spec.name, total=total, info="starting workers")
        self.progress.start()
        self.offset = self.path.stat().st_size if self.path.is_file() else 0
        self.thread = threading.Thread(target=self._follow, daemon=True)
        self.thread.start()
        return self

    def _follow(self):
        while not self.done.wait(0.5):
            if not self.path.is_file():
                continue
            with self.path.open() as f:
                f.seek(min(self.offset, self.path.stat().st_size))
                lines = f.readlines()
                self.offset = f.tell()
            for line in lines:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                info = f"epoch {(record.get('epoch') or 0) + 1}"
                if "train_loss" in record:
                    info += f"  loss {record['train_loss']:.4f}  {record.get('jets_per_s', 0):.0f} {self.examples}/s"
                if "val_loss" in record:
                    info += f"  val_loss {record['val_loss']:.4f}"
                self.progress.update(self.task, completed=record.get("step", 0), info=info)

    def __exit__(self, *exc):
        if self.enabled:
            self.done.set()
            self.thread.join(timeout=2)
            self.progress.stop()
