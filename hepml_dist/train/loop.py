"""`train_loop_per_worker`: the code every training worker runs, top to bottom.

model (registry) -> pretrained weights -> frozen modules -> data streams -> resume point -> engine (DDP, PCGrad or
DeepSpeed) -> for each optimizer step: micro-batches (forward, task losses, one all-reduce of the stop and
non-finite flags, backward), step; every `log_interval` a log line, every `eval_interval` validation on all ranks,
checkpoints, and one report to Ray; a stop request (SIGTERM/SIGUSR1) checkpoints and returns.
"""

import math
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from hepml_dist.errors import UserError
from hepml_dist.evaluate.metrics import Collector
from hepml_dist.models import build_model, get_family
from hepml_dist.spec import JobSpec, parse_spec
from hepml_dist.train import checkpoint as ckpt
from hepml_dist.train.finetune import freeze, load_pretrained, phase_at, restrict_to
from hepml_dist.train.parallel import check_supported, iterate_micro_batches, make_engine
from hepml_dist.train.session import StopRequest, WorkerContext, all_sum, worker_context


class NonFiniteLossError(UserError):
    """A task loss became NaN or infinite (training.nan_policy: raise)."""


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    spec = parse_spec(config["spec"], source="train_loop_config")
    run_dir = Path(config["run_dir"])
    ctx = worker_context(config.get("ray", False))
    check_supported(spec)
    torch.manual_seed(spec.training.seed)  # identical initial weights on every rank
    family = get_family(spec.model.family)

    # Model: fresh initialisation, then pretrained weights (after any initialiser), then frozen modules.
    model = build_model(spec)
    if spec.training.init_from:
        loaded = load_pretrained(model, spec.training.init_from, spec.training.init_modules)
        log(ctx, f"loaded {len(loaded)} pretrained tensors from {spec.training.init_from}")
    freeze(model, spec.training.freeze)

    # Data: every rank gets the same number of batches per epoch.
    from hepml_dist.data.stream import ShardStream

    seed = spec.training.seed
    with warnings.catch_warnings(record=True) as advice:  # e.g. too few shards: said once, by rank 0, as a log line
        warnings.simplefilter("always")
        train_data = ShardStream(spec.data, "train", rank=ctx.rank, world_size=ctx.world_size, seed=seed, training=True)
        val_data = None
        if spec.data.val:
            val_data = ShardStream(spec.data, "val", rank=ctx.rank, world_size=ctx.world_size, seed=seed, training=False)
    for item in advice:
        log(ctx, f"warning: {item.message}")
    steps_per_epoch = optimizer_steps_per_epoch(spec, train_data.steps_per_epoch)
    total_steps = spec.training.steps or (spec.training.epochs or 1) * steps_per_epoch

    # Resume point: the latest complete checkpoint of this run directory (a restart by Ray, a re-run, --resume).
    resume = ckpt.latest_checkpoint(run_dir)
    state = ckpt.read_state(resume) if resume else {}
    step = int(state.get("step", 0))
    epoch = step // steps_per_epoch
    phase = phase_at(spec, epoch)

    # Engine: DDP / PCGrad / DeepSpeed around the model, its optimizer, schedule and precision.
    engine = build_engine(model, spec, ctx, total_steps, steps_per_epoch, phase)
    if resume:
        engine.load(resume)
        rngs = state.get("rng") or []
        if len(rngs) == ctx.world_size:
            ckpt.restore_rng(rngs[ctx.rank])
        log(ctx, f"resumed from {resume.name} (step {step} of {total_steps})")
    tracker = make_rank0_tracker(spec, run_dir, ctx, config, resume_step=step if resume else None)
    if resume:
        tracker.log_metrics({"resumed_from": step}, step=step, epoch=epoch)

    plain_logs = config.get("plain_logs", True)
    position = state.get("data_position") if resume and step % steps_per_epoch else None
    window = LogWindow(spec, ctx)
    stopped = False
    failure: str | None = None  # a non-finite loss under nan_policy raise: every rank sees it at the same step
    with StopRequest(run_dir) as stop:  # SIGTERM/SIGUSR1 or the driver's stop file: checkpoint, then return
        while step < total_steps and not stopped and not failure:
            if phase_at(spec, epoch) != phase:
                phase = phase_at(spec, epoch)
                engine = enter_phase(engine, spec, ctx, total_steps, steps_per_epoch, phase)
                log(ctx, f"epoch {epoch + 1}: phase {phase + 1}, training {spec.training.phases[phase].trainable}")
            batches = rng_neutral(train_data.batches(epoch, start=position))
            position = None
            for micro_batches in iterate_micro_batches(batches, spec.training.grad_accum):
                engine.model.train()
                stop_agreed = False
                for i, batch in enumerate(micro_batches):
                    batch = to_device(batch, ctx.device)
                    outputs = engine.forward(batch)
                    losses = family.losses(outputs, batch, spec)
                    names = list(losses)
                    values = [float(v.detach()) for v in losses.values()]
                    local_stop = stop.signalled or (ctx.rank == 0 and i == 0 and stop.requested())
                    flags = all_sum([float(local_stop), *[float(not math.isfinite(v)) for v in values], *values], ctx.device)
                    stop_agreed = stop_agreed or flags[0] > 0
                    bad = [n for n, f in zip(names, flags[1 : 1 + len(names)]) if f > 0]
                    last = i == len(micro_batches) - 1
                    if bad and spec.training.nan_policy == "raise":
                        failure = non_finite_message(step + 1, epoch, bad, losses, ctx)
                        break
                    if bad:
                        log(ctx, "skipping micro-batch: " + non_finite_message(step + 1, epoch, bad, losses, ctx))
                        engine.skip_micro_batch(last)
                        window.skipped += 1
                        continue
                    engine.backward(losses, last)
                    window.add(dict(zip(names, [v / ctx.world_size for v in flags[1 + len(names) :]])), batch_size(batch))
                if failure:
                    break
                engine.step(step)
                step += 1
                window.tick()
                at_end = step >= total_steps
                if step % spec.training.log_interval == 0 or at_end:
                    record = window.flush(engine, epoch)
                    tracker.log_metrics(record, step=step, epoch=epoch)
                    if plain_logs:
                        log(ctx, format_record(step, total_steps, epoch, record))
                evaluate_now = val_data is not None and (step % spec.training.eval_interval == 0 or at_end)
                interval = spec.checkpoint.interval or spec.training.eval_interval
                save_now = step % interval == 0 or at_end or stop_agreed
                metrics: dict[str, float] = {}
                if evaluate_now:
                    metrics = evaluate(engine, val_data, spec, family, ctx)
                    tracker.log_metrics(metrics, step=step, epoch=epoch)
                    log(ctx, f"validation at step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
                if save_now:
                    position_now = train_data.position.to_dict() if step % steps_per_epoch else None
                    save_checkpoint(engine, spec, run_dir, ctx, step, epoch, phase, position_now, metrics, finished=at_end,
                                    stopped=stop_agreed and not at_end)
                if evaluate_now or save_now:
                    ctx.report({**metrics, "step": step, "epoch": epoch, "stopped": bool(stop_agreed and not at_end)})
                    window.restart_clock()  # throughput counts training time, not validation and checkpoints
                if stop_agreed and not at_end:
                    log(ctx, f"stop requested: checkpoint at step {step} written, exiting cleanly")
                    stopped = True
                if at_end or stopped:
                    break
            epoch += 1
    tracker.close()
    if failure:
        # Ray would restart the worker group on an exception and hit the same loss again: record the error for
        # the driver and return instead; outside Ray, raise it.
        if ctx.rank == 0:
            ckpt.record_failure(run_dir, failure)
        if not ctx.in_ray:
            raise NonFiniteLossError(failure)
    return {"step": step, "stopped": stopped, "error": failure}


# ----------------------------------------------------------------------------------------------------------------
# Helpers, in the order the loop uses them.


def log(ctx: WorkerContext, message: str) -> None:
    # sys.stdout directly: Ray Train patches print() into its logger, which would echo each line twice.
    if ctx.rank == 0:
        sys.stdout.write(f"[hepml] {message}\n")
        sys.stdout.flush()


def optimizer_steps_per_epoch(spec: JobSpec, batches_per_epoch: int) -> int:
    accum = spec.training.grad_accum
    if batches_per_epoch % accum:
        raise UserError(
            f"data.steps_per_epoch ({batches_per_epoch} batches per rank) is not a multiple of training.grad_accum "
            f"({accum}); an epoch must hold whole optimizer steps"
        )
    return batches_per_epoch // accum


def build_engine(model, spec: JobSpec, ctx: WorkerContext, total_steps: int, steps_per_epoch: int, phase: int | None):
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


def enter_phase(engine, spec: JobSpec, ctx: WorkerContext, total_steps: int, steps_per_epoch: int, phase: int):
    if spec.training.phases[phase].lr:
        return build_engine(engine.module, spec, ctx, total_steps, steps_per_epoch, phase)
    restrict_to(engine.module, spec, spec.training.phases[phase])
    engine.rewrap()
    return engine


def make_rank0_tracker(spec: JobSpec, run_dir: Path, ctx: WorkerContext, config: dict, resume_step: int | None):
    from hepml_dist.track import make_tracker

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


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def batch_size(batch: dict[str, Any]) -> int:
    for value in batch.values():
        if isinstance(value, torch.Tensor) and value.ndim:
            return int(value.shape[0])
    return 0


def non_finite_message(step: int, epoch: int, bad: list[str], losses: dict, ctx: WorkerContext) -> str:
    values = ", ".join(f"{n}={float(losses[n].detach()):.4g} on rank {ctx.rank}" for n in bad)
    return (
        f"non-finite loss at step {step} (epoch {epoch + 1}) in task(s) {', '.join(bad)} ({values}); "
        "lower optim.lr, set optim.clip_grad_norm, check the inputs, or set training.nan_policy: skip"
    )


class LogWindow:
    """Training metrics averaged over the steps since the last log line (losses already averaged over ranks)."""

    def __init__(self, spec: JobSpec, ctx: WorkerContext):
        self.examples_per_batch_all_ranks = ctx.world_size
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.batches = 0
        self.examples = 0
        self.skipped = 0
        self.seconds = 0.0
        self.restart_clock()

    def restart_clock(self) -> None:
        self.clock = time.perf_counter()

    def tick(self) -> None:
        now = time.perf_counter()
        self.seconds += now - self.clock
        self.clock = now

    def add(self, losses: dict[str, float], examples: int) -> None:
        for name, value in losses.items():
            self.sums[name] = self.sums.get(name, 0.0) + value
        self.batches += 1
        self.examples += examples * self.examples_per_batch_all_ranks

    def flush(self, engine, epoch: int) -> dict[str, float]:
        elapsed = max(self.seconds, 1e-9)
        per_task = {f"train_{k}_loss": v / max(self.batches, 1) for k, v in self.sums.items()}
        record = {
            "train_loss": sum(per_task.values()),
            **per_task,
            "lr": engine.lr(),
            "grad_norm": engine.grad_norm,
            "jets_per_s": self.examples / elapsed,
            "skipped_batches": self.skipped,
            **{f"pcgrad_weight_{k}": v for k, v in engine.task_weights.items()},
        }
        self.reset()
        return record


def format_record(step: int, total: int, epoch: int, record: dict[str, float]) -> str:
    return (
        f"step {step}/{total} epoch {epoch + 1} loss {record['train_loss']:.4f} lr {record['lr']:.3g} "
        f"{record['jets_per_s']:.0f} jets/s"
    )


@torch.no_grad()
def evaluate(engine, val_data, spec: JobSpec, family, ctx: WorkerContext) -> dict[str, float]:
    """Validation on every rank's share of the validation split; metrics over the whole split (gathered on rank 0)."""
    module = engine.eval_module()
    module.eval()
    collector = Collector(spec)
    for batch in rng_neutral(val_data.batches(0)):
        batch = to_device(batch, ctx.device)
        outputs = engine.eval_forward(batch)
        collector.update(outputs, batch, family.losses(outputs, batch, spec))
    module.train()
    engine.after_eval()
    metrics, _ = collector.reduce("val")
    return metrics


def save_checkpoint(engine, spec: JobSpec, run_dir: Path, ctx: WorkerContext, step: int, epoch: int, phase: int | None,
                    position: dict | None, metrics: dict[str, float], finished: bool, stopped: bool) -> None:
    """All ranks: assemble the checkpoint in a hidden folder (DeepSpeed shards from every rank), then rank 0 writes
    the model, training state and state.json, renames the folder into place, updates best.json and prunes."""
    tmp = ckpt.temp_folder(run_dir, step)
    if ctx.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ctx.barrier()
    engine.save_shards(tmp)
    ctx.barrier()  # every rank's shard files are complete
    model_state = engine.full_state_dict(tmp)
    rngs = gather_to_rank0(ckpt.capture_rng(), ctx)
    if ctx.rank == 0:
        state = {
            "step": step,
            "epoch": epoch,
            "phase": phase,
            "finished": finished,
            "stopped": stopped,
            "data_position": position,
            "world_size": ctx.world_size,
            "strategy": spec.parallel.strategy,
            "metrics": metrics,
            "rng": rngs,
            "time": time.time(),
        }
        ckpt.write_checkpoint_files(tmp, spec, model_state, state, engine.train_state())
        folder = ckpt.commit_folder(tmp, run_dir / ckpt.CHECKPOINTS / ckpt.checkpoint_name(step))
        ckpt.update_best(run_dir, folder.name, metrics, spec.checkpoint.keep_best_by, spec.checkpoint.best_mode)
        ckpt.prune_checkpoints(run_dir, spec.checkpoint.keep_last)
    ctx.barrier()


def gather_to_rank0(obj: Any, ctx: WorkerContext) -> list[Any] | None:
    if ctx.world_size == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] | None = [None] * ctx.world_size if ctx.rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out
