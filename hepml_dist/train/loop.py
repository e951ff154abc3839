"""`train_loop_per_worker`: the code every training worker runs, top to bottom.

model (registry) -> pretrained weights -> frozen modules -> data streams -> resume point -> engine (DDP, PCGrad or
DeepSpeed) -> for each optimizer step: `train_step` (micro-batches, one all-reduce of the step flags each, the
optimizer step), then what the `Cadence` says is due: a log line, validation on all ranks, a checkpoint, one
report to Ray. A stop request (SIGTERM/SIGUSR1, or the driver's stop file) checkpoints and returns; a collective
that times out (another rank stopped answering) fails with a `CollectiveTimeoutError` naming this rank and step.
"""

import warnings
from collections.abc import Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hepml_dist import runs
from hepml_dist.data.loader import open_stream
from hepml_dist.data.stream import Stream
from hepml_dist.errors import UserError
from hepml_dist.evaluate.loop import evaluate_batches
from hepml_dist.models import build_model, get_family
from hepml_dist.spec import JobSpec, parse_spec
from hepml_dist.track.tracker import Tracker, make_tracker
from hepml_dist.train.cadence import Cadence
from hepml_dist.train.checkpoint import ResumePoint, save_checkpoint
from hepml_dist.train.distributed import naming_collective_timeouts
from hepml_dist.train.engine import Engine, make_engine
from hepml_dist.train.finetune import freeze, load_pretrained, phase_at, restrict_to
from hepml_dist.train.profile import StepProfiler
from hepml_dist.train.session import StopRequest, WorkerContext, process_group_context
from hepml_dist.train.startup import StartupClock
from hepml_dist.train.step import LogWindow, format_record, log, train_step


class NonFiniteLossError(UserError):
    """A task loss became NaN or infinite (training.nan_policy: raise)."""


def train_loop_per_worker(config: dict[str, Any], ctx: WorkerContext | None = None) -> dict[str, Any]:
    """One worker's whole run. `ctx`: where it runs (Ray Train passes its own); None: a plain process group."""
    startup = StartupClock(config.get("startup"))  # the driver's marks; logged once the first step is done
    startup.mark("workers")
    spec = parse_spec(config["spec"], source="train_loop_config")
    run_dir = Path(config["run_dir"])
    ctx = ctx or process_group_context()
    torch.manual_seed(spec.training.seed)  # identical initial weights on every rank
    family = get_family(spec.model.family)
    model = initial_model(spec, ctx)
    startup.mark("model")
    train_data, val_data = open_data(spec, ctx)
    startup.mark("data")
    steps_per_epoch = optimizer_steps_per_epoch(spec, train_data.steps_per_epoch)
    total_steps = spec.training.steps or (spec.training.epochs or 1) * steps_per_epoch

    # Resume point: the latest complete checkpoint of this run directory (a restart by Ray, a re-run, --resume).
    resume = ResumePoint.latest(run_dir)
    step = resume.step
    epoch = step // steps_per_epoch
    phase = phase_at(spec, epoch)
    engine = build_engine(model, spec, ctx, total_steps, steps_per_epoch, phase)
    if resume.folder:
        resume.restore(engine, ctx)
        log(ctx, f"resumed from {resume.folder.name} (step {step} of {total_steps})")
    tracker = make_rank0_tracker(spec, run_dir, ctx, config, resume_step=step if resume.folder else None)
    if resume.folder:
        tracker.log_metrics({"resumed_from": step}, step=step, epoch=epoch)
    startup.mark("engine")
    if ctx.device.type == "cpu":
        slots, slot_bytes = train_data.shared_slots()
        log(ctx, f"{torch.get_num_threads()} torch threads per worker (parallel.cpus_per_worker "
                 f"{spec.parallel.cpus_per_worker:g}), {spec.data.loader_workers} loader process(es)"
                 + (f" with {slots} shared batch slots of {slot_bytes / 2**20:.1f} MiB" if slots else ""))

    profiler = StepProfiler(spec.training.profile, run_dir, ctx.rank, ctx.device, step)
    cadence = Cadence(spec.training, spec.checkpoint, total_steps, validates=val_data is not None)
    window = LogWindow(ctx.world_size)
    position = resume.state.get("data_position") if resume.folder and step % steps_per_epoch else None
    plain_logs = config.get("plain_logs", True)
    stopped, failure = False, None  # failure: a non-finite loss under nan_policy raise, seen by every rank at once
    skipped = 0  # micro-batches skipped under nan_policy skip in this process's life
    timeouts_named = naming_collective_timeouts(ctx.rank, spec.parallel.collective_timeout_s, lambda: step)
    # the loader processes of both splits live as long as the loop, not one epoch or one validation each
    val_loaders = val_data.kept_loader_processes() if val_data else nullcontext()
    with StopRequest(run_dir) as stop, timeouts_named, train_data.kept_loader_processes(), val_loaders:
        while step < total_steps and not stopped and not failure:
            if phase_at(spec, epoch) != phase:
                phase = phase_at(spec, epoch)
                engine = enter_phase(engine, spec, ctx, total_steps, steps_per_epoch, phase)
                log(ctx, f"epoch {epoch + 1}: phase {phase + 1}, training {spec.training.phases[phase].trainable}")
            batches = rng_neutral(train_data.batches(epoch, start=position))
            position = None
            for micro_batches in window.timed(optimizer_steps(batches, spec.training.grad_accum)):
                result = train_step(engine, family, spec, micro_batches, step, epoch, ctx, stop,
                                    logged=cadence.logs_at(step + 1))
                skipped += result.skipped
                if result.failure or skipped > spec.training.nan_skip_limit:
                    failure = result.failure or (
                        f"{skipped} micro-batches skipped for non-finite losses (training.nan_skip_limit = "
                        f"{spec.training.nan_skip_limit}); the last one: {result.last_skip_reason}")
                    break
                step += 1
                window.add(result)
                if profiled := profiler.after_step(step):
                    log(ctx, profiled)
                if "first_step" not in startup.marks:
                    startup.mark("first_step")
                    if config.get("startup"):  # `hepml train` measured from its process start
                        tracker.log_metrics(startup.record(), step=step, epoch=epoch)
                due = cadence.at(step, result.stop_requested)
                if due.log:
                    record = window.flush(engine)
                    tracker.log_metrics(record, step=step, epoch=epoch)
                    if plain_logs:
                        log(ctx, format_record(step, total_steps, epoch, record, family.examples))
                metrics = validate(engine, val_data, spec, ctx) if due.evaluate else {}
                if due.evaluate:
                    tracker.log_metrics(metrics, step=step, epoch=epoch)
                    log(ctx, f"validation at step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
                if due.checkpoint:
                    mid_epoch = train_data.position.to_dict() if step % steps_per_epoch else None
                    save_checkpoint(engine, spec, run_dir, ctx, step, epoch, phase, mid_epoch, metrics,
                                    finished=due.end, stopped=due.stop)
                if due.report:
                    ctx.report({**metrics, "step": step, "epoch": epoch, "stopped": due.stop})
                    window.restart_clock()  # throughput counts training time, not validation and checkpoints
                if due.stop:
                    log(ctx, f"stop requested: checkpoint at step {step} written, exiting cleanly")
                    stopped = True
                if due.end or due.stop:
                    break
            epoch += 1
    if profiled := profiler.close(step):
        log(ctx, profiled)
    tracker.close()
    if failure:
        # Ray would restart the worker group on an exception and hit the same loss again: record the error for
        # the driver and return instead; outside Ray, raise it.
        if ctx.rank == 0:
            runs.record_failure(run_dir, failure)
        if not ctx.in_ray:
            raise NonFiniteLossError(failure)
    return {"step": step, "stopped": stopped, "error": failure}


# ----------------------------------------------------------------------------------------------------------------
# Helpers, in the order the loop uses them.


def initial_model(spec: JobSpec, ctx: WorkerContext) -> nn.Module:
    """Fresh initialisation, then pretrained weights (after any initialiser, so none overwrites them), then the
    frozen modules."""
    model = build_model(spec)
    if spec.training.init_from:
        loaded = load_pretrained(model, spec.training.init_from, spec.training.init_modules)
        log(ctx, f"loaded {len(loaded)} pretrained tensors from {spec.training.init_from}")
    freeze(model, spec.training.freeze)
    return model


def open_data(spec: JobSpec, ctx: WorkerContext) -> tuple[Stream, Stream | None]:
    """The training and validation streams of this rank; every rank gets the same number of batches per epoch."""
    seed = spec.training.seed
    with warnings.catch_warnings(record=True) as advice:  # e.g. too few shards: said once, by rank 0, as a log line
        warnings.simplefilter("always")
        train = open_stream(spec.data, "train", rank=ctx.rank, world_size=ctx.world_size, seed=seed, training=True)
        val = None
        if spec.data.val:
            val = open_stream(spec.data, "val", rank=ctx.rank, world_size=ctx.world_size, seed=seed, training=False)
    for item in advice:
        log(ctx, f"warning: {item.message}")
    return train, val


def optimizer_steps_per_epoch(spec: JobSpec, batches_per_epoch: int) -> int:
    accum = spec.training.grad_accum
    if batches_per_epoch % accum:
        raise UserError(
            f"data.steps_per_epoch ({batches_per_epoch} batches per rank) is not a multiple of training.grad_accum "
            f"({accum}); an epoch must hold whole optimizer steps"
        )
    return batches_per_epoch // accum


def build_engine(model: nn.Module, spec: JobSpec, ctx: WorkerContext, total_steps: int, steps_per_epoch: int,
                 phase: int | None) -> Engine:
    """The engine for the phase in force: a phase with its own lr gets a fresh optimizer and cosine schedule
    (built after the phase's freezing); otherwise the job's optimizer, and the phase only freezes parameters."""
    if phase is not None and spec.training.phases[phase].lr:
        restrict_to(model, spec, spec.training.phases[phase])
        start = (spec.training.phases[phase].start_epoch - 1) * steps_per_epoch
        return make_engine(model, spec, ctx.device, total_steps, lr=spec.training.phases[phase].lr, schedule_start=start)
    engine = make_engine(model, spec, ctx.device, total_steps)
    if phase is not None:
        restrict_to(engine.module, spec, spec.training.phases[phase])
        engine.rewrap()
    return engine


def enter_phase(engine: Engine, spec: JobSpec, ctx: WorkerContext, total_steps: int, steps_per_epoch: int,
                phase: int) -> Engine:
    if spec.training.phases[phase].lr:
        return build_engine(engine.module, spec, ctx, total_steps, steps_per_epoch, phase)
    restrict_to(engine.module, spec, spec.training.phases[phase])
    engine.rewrap()
    return engine


def make_rank0_tracker(spec: JobSpec, run_dir: Path, ctx: WorkerContext, config: dict,
                       resume_step: int | None) -> Tracker:
    info = {**config.get("info", {}), "world_size": ctx.world_size, "strategy": spec.parallel.strategy}
    return make_tracker(spec, run_dir, ctx.rank, resume_step=resume_step, info=info)


def rng_neutral(batches: Iterator[dict]) -> Iterator[dict]:
    """Starting an epoch's DataLoader draws a seed from the global torch RNG; keep that draw out of the model's
    random stream (dropout), so a run resumed mid-epoch continues exactly, and validation changes nothing."""
    with torch.random.fork_rng(devices=[]):
        first = next(batches, None)
    if first is not None:
        yield first
        yield from batches


def optimizer_steps(batches: Iterator[dict], grad_accum: int) -> Iterator[list[dict]]:
    """Group a batch stream into optimizer steps of `grad_accum` micro-batches (a short tail is dropped)."""
    group: list[dict] = []
    for batch in batches:
        group.append(batch)
        if len(group) == grad_accum:
            yield group
            group = []


def validate(engine: Engine, val_data: Stream, spec: JobSpec, ctx: WorkerContext) -> dict[str, float]:
    """Validation on every rank's share of the validation split; metrics over the whole split (gathered on rank 0)."""
    module = engine.eval_module()
    module.eval()
    collector = evaluate_batches(engine.eval_forward, rng_neutral(val_data.batches(0)), spec, device=ctx.device)
    module.train()
    engine.after_eval()
    metrics, _ = collector.reduce("val")
    return metrics
