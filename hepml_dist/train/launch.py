"""`launch`: run one job, from a laptop to an existing Ray cluster.

The driver resolves the run directory, writes the resolved spec, makes relative paths absolute (workers do not
share the driver's working directory), and starts the workers with the job's launcher (`cluster.launcher`; `auto`
picks one in hepml_dist.train.environment.choose_launcher): Ray Train (hepml_dist.train.ray_workers: an embedded Ray
on 127.0.0.1, or a cluster), or plain processes on this machine (hepml_dist.train.process_workers: no Ray, a start
in seconds). Checkpoints live in RUN_DIR/checkpoints (written by the workers, atomically); every attempt of the
worker group, a re-run of the same job, and `--resume` continue from the latest one. While it waits, the driver
shows a rich progress bar (followed from metrics.jsonl) or, without a terminal, the workers' plain log lines;
SIGINT/SIGTERM/SIGUSR1 make the workers checkpoint and exit cleanly (train/signals.py), and an embedded Ray is shut
down before `launch` returns.
"""

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hepml_dist import runs
from hepml_dist.data.loader import open_stream
from hepml_dist.data.reader import is_local
from hepml_dist.data.shards import ShardResolver
from hepml_dist.errors import UserError
from hepml_dist.precision import CPU_FP16_NOTE, require_precision
from hepml_dist.run_files import clear_stop
from hepml_dist.spec import JobSpec, load_job
from hepml_dist.train import process_workers
from hepml_dist.train.environment import choose_launcher, start_fork_server
from hepml_dist.train.startup import StartupClock


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


def launch(
    spec: JobSpec,
    *,
    address: str | None = None,
    run_dir: Path | None = None,
    progress: bool | None = None,
    callbacks: list | None = None,
    startup: StartupClock | None = None,
) -> TrainResult:
    """Train `spec` with its launcher; returns where the run stands (finished, or stopped by a signal)."""
    launcher, address, reason = choose_launcher(spec, address, tune=bool(callbacks))
    print(f"[hepml] launcher {launcher} ({reason})", flush=True)
    local = address is None
    if launcher == "processes":
        process_workers.check_launch(spec, address, callbacks)
        # the workers' imports start now, on the core that the checks and the data planning below leave free
        start_fork_server(spec)  # started already by `hepml train`; a caller of launch() starts it here
    if local:
        check_local_gpus(spec)
        check_local_precision(spec)
    spec = resolve_steps_per_epoch(runs.absolute_paths(spec))
    run_dir = (run_dir or runs.default_run_dir(spec)).resolve()
    resume_step = check_resumable(spec, run_dir)
    if local:
        check_local_data(spec)
    run_dir.mkdir(parents=True, exist_ok=True)
    runs.remove_stale_temp_folders(run_dir)
    clear_stop(run_dir)
    runs.clear_failure(run_dir)
    runs.write_run_spec(run_dir, spec)
    if resume_step is not None:
        print(f"[hepml] {run_dir}: resuming from step {resume_step}", flush=True)
    if startup is not None:
        startup.mark("plan")

    if launcher == "processes":
        stop_signal = process_workers.fit(spec, run_dir, progress, startup)
    else:
        stop_signal = _fit_on_ray(spec, address, run_dir, progress, callbacks, startup)
    failure = runs.read_failure(run_dir)
    if failure:
        raise UserError(failure)
    latest = runs.latest_checkpoint(run_dir)
    state = runs.read_state(latest) if latest else {}
    # Ray V2 keeps no metrics reported without a checkpoint: the run directory is the record of where the run stands.
    return TrainResult(run_dir, int(state.get("step", 0)), bool(state.get("finished")), bool(state.get("stopped")),
                       state.get("metrics", {}), stop_signal)


def _fit_on_ray(spec: JobSpec, address: str | None, run_dir: Path, progress: bool | None, callbacks: list | None,
                startup: StartupClock | None) -> str | None:
    import hepml_dist.train.ray_workers as ray_workers  # Ray Train takes seconds to import: a processes run never loads it

    embedded = ray_workers.start_ray(spec, address)
    if startup is not None:
        startup.mark("ray")
    try:
        return ray_workers.fit(spec, run_dir, embedded, progress, callbacks, startup)
    finally:  # also after a second Ctrl-C (signals.StoppedAtOnce)
        if embedded:
            ray_workers.ray.shutdown()  # stop what we started before saying the run is over (and how to resume it)
