"""One optimizer step of the training loop, and what the loop learns from it.

`train_step` runs the micro-batches of one step (forward, task losses, backward) and the optimizer step. After each
micro-batch forward, every rank takes part in one all-reduce of its `StepFlags`: whether a stop was requested,
which task losses are not finite, and the losses themselves. All ranks therefore take the same decision at the same
micro-batch (stop, skip the micro-batch, or fail), and the logged losses are averages over ranks at no extra cost.
"""

import math
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from hepml_dist.evaluate.loop import to_device
from hepml_dist.models import ModelFamily
from hepml_dist.spec import JobSpec
from hepml_dist.train.distributed import all_sum
from hepml_dist.train.engine import Engine
from hepml_dist.train.profile import phase
from hepml_dist.train.session import StopRequest, WorkerContext

T = TypeVar("T")


def log(ctx: WorkerContext, message: str) -> None:
    """A `[hepml]` line on rank 0's stdout (the one place the loop prints from)."""
    # sys.stdout directly: Ray Train patches print() into its logger, which would echo each line twice.
    if ctx.rank == 0:
        sys.stdout.write(f"[hepml] {message}\n")
        sys.stdout.flush()


@dataclass
class StepFlags:
    """What every rank tells the others after a micro-batch forward, summed over ranks in one all-reduce."""

    stop: float  # > 0: some rank was asked to stop
    non_finite: list[float]  # per task, > 0: some rank's loss is NaN or infinite
    losses: list[float]  # per task, the sum over ranks

    def all_reduce(self, device: torch.device) -> "StepFlags":
        values = [self.stop, *self.non_finite, *self.losses]
        tensor = torch.tensor(values, dtype=torch.float64 if device.type == "cpu" else torch.float32, device=device)
        summed = all_sum(tensor).tolist()
        n = len(self.losses)
        return StepFlags(summed[0], summed[1:1 + n], summed[1 + n:])

    @classmethod
    def of(cls, stop: bool, losses: Sequence[float]) -> "StepFlags":
        return cls(float(stop), [float(not math.isfinite(v)) for v in losses], list(losses))


@dataclass
class StepResult:
    """What one optimizer step did, as all ranks agree on it."""

    stop_requested: bool = False
    failure: str | None = None  # a non-finite loss under nan_policy raise: the step was not taken
    losses: list[dict[str, float]] = field(default_factory=list)  # per micro-batch trained: mean over ranks
    examples: list[int] = field(default_factory=list)  # per micro-batch trained: this rank's batch size
    skipped: int = 0  # micro-batches dropped under nan_policy skip
    overflow: bool = False  # fp16: the gradients overflowed, the loss scaler skipped the optimizer step
    last_skip_reason: str = ""  # what the last skipped micro-batch's losses were


def train_step(engine: Engine, family: ModelFamily, spec: JobSpec, micro_batches: list[dict], step: int, epoch: int,
               ctx: WorkerContext, stop: StopRequest, logged: bool = True) -> StepResult:
    """Forward and backward of each micro-batch, then the optimizer step (see the module docstring). `logged`: this
    step ends a log window, whose record holds its gradient norm."""
    engine.model.train()
    result = StepResult()
    for i, batch in enumerate(micro_batches):
        with phase("to_device"):
            batch = to_device(batch, ctx.device)
        with phase("forward"):
            outputs = engine.forward(batch)
        with phase("losses"):
            losses = family.losses(outputs, batch, spec)
        names = list(losses)
        # only rank 0 reads the stop file (once per step); a signal reaches each rank's own handler
        local_stop = stop.signalled or (ctx.rank == 0 and i == 0 and stop.requested())
        with phase("step_flags"):
            flags = StepFlags.of(local_stop, [float(v.detach()) for v in losses.values()]).all_reduce(ctx.device)
        result.stop_requested = result.stop_requested or flags.stop > 0
        bad = [name for name, f in zip(names, flags.non_finite) if f > 0]
        last = i == len(micro_batches) - 1
        if bad and spec.training.nan_policy == "raise":
            result.failure = non_finite_message(step + 1, epoch, bad, losses, ctx)
            return result
        if bad:
            result.last_skip_reason = non_finite_message(step + 1, epoch, bad, losses, ctx)
            log(ctx, "skipping micro-batch: " + result.last_skip_reason)
            engine.skip_micro_batch(last)
            result.skipped += 1
            continue
        with phase("backward"):
            engine.backward(losses, last)
        result.losses.append({n: v / ctx.world_size for n, v in zip(names, flags.losses)})
        result.examples.append(batch_size(batch))
    with phase("optimizer"):
        result.overflow = not engine.step(step, measure_grad_norm=logged)
    return result


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
    """Training metrics averaged over the steps since the last log line (losses already averaged over ranks);
    throughput counts training time only (`restart_clock` after validation and checkpoints)."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, float] = {}
        self.batches = 0
        self.examples = 0
        self.skipped = 0
        self.overflows = 0
        self.seconds = 0.0
        self.data_wait = 0.0  # in the loader's next(): the step waits for its batch
        self.step_time = 0.0  # in train_step: forward, backward, gradient all-reduce, optimizer
        self.restart_clock()

    def restart_clock(self) -> None:
        self.clock = self.batch_ready = time.perf_counter()

    def timed(self, batches: Iterator[T]) -> Iterator[T]:
        """`batches`, with the time spent waiting for each item added to the window's data wait."""
        iterator = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                with phase("data_wait"):
                    item = next(iterator)
            except StopIteration:
                return
            self.batch_ready = time.perf_counter()
            self.data_wait += self.batch_ready - start
            yield item

    def add(self, result: StepResult) -> None:
        now = time.perf_counter()
        self.seconds += now - self.clock
        self.step_time += now - max(self.batch_ready, self.clock)
        self.clock = now
        for losses, examples in zip(result.losses, result.examples):
            for name, value in losses.items():
                self.sums[name] = self.sums.get(name, 0.0) + value
            self.batches += 1
            self.examples += examples * self.world_size
        self.skipped += result.skipped
        self.overflows += result.overflow

    def flush(self, engine: Engine) -> dict[str, float]:
        elapsed = max(self.seconds, 1e-9)
        per_task = {f"train_{k}_loss": v / max(self.batches, 1) for k, v in self.sums.items()}
        record = {
            "train_loss": sum(per_task.values()),
            **per_task,
            "lr": engine.lr(),
            "grad_norm": engine.grad_norm,
            "jets_per_s": self.examples / elapsed,
            # where this rank's training time went; the rest (logging, Python between steps) is 1 - both
            "step_share": min(self.step_time / elapsed, 1.0),
            "data_wait_share": min(self.data_wait / elapsed, 1.0),
            "skipped_batches": self.skipped,
            "overflow_steps": self.overflows,
            **{f"pcgrad_weight_{k}": v for k, v in engine.task_weights.items()},
        }
        self.reset()
        return record


def format_record(step: int, total: int, epoch: int, record: dict[str, float], examples: str = "jets") -> str:
    """The plain log line of a training record; `examples` names the family's unit (jets, events)."""
    line = (f"step {step}/{total} epoch {epoch + 1} loss {record['train_loss']:.4f} lr {record['lr']:.3g} "
            f"{record['jets_per_s']:.0f} {examples}/s")
    return line + (f" ({record['overflow_steps']:.0f} fp16 overflow)" if record.get("overflow_steps") else "")
