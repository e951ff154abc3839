"""What the driver shows and says while the workers run, whichever launcher started them.

The progress bar (followed from RUN_DIR/metrics.jsonl, a whole line at a time), and what a failed worker group
becomes: a collective timeout names the ranks that waited and the ones that did not answer, and a worker's UserError
is shown as its message.
"""

import json
import os
import threading
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from hepml_dist.errors import UserError
from hepml_dist.models import get_family
from hepml_dist.spec import JobSpec
from hepml_dist.spec.parallel import ParallelSpec
from hepml_dist.track.tracker import run_info
from hepml_dist.train.distributed import CollectiveTimeoutError, is_collective_timeout
from hepml_dist.train.startup import StartupClock


def loop_config(spec: JobSpec, run_dir: Path, interactive: bool, startup: StartupClock | None) -> dict[str, Any]:
    """What every worker's `train_loop_per_worker` receives, whichever launcher started it."""
    return {
        "spec": spec.model_dump(mode="json"),
        "run_dir": str(run_dir),
        "plain_logs": not interactive,
        "info": run_info(spec),
        "startup": startup.marks if startup is not None else None,  # rank 0 adds its marks, logs the phases
    }


def explain_failure(err: Exception, parallel: ParallelSpec) -> Exception:
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
    step when the group was stopped) are the likely cause."""
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
            lines, self.offset = complete_lines(self.path, self.offset)
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


def complete_lines(path: Path, offset: int) -> tuple[list[str], int]:
    """The lines completed in a file another process appends to, after byte `offset`, and the offset after the last
    of them: a line still being written is left for the next call, not read in two pieces. A file cut shorter than
    `offset` (a restarted run drops the records after its checkpoint) is followed from its new end."""
    try:
        with path.open("rb") as f:
            offset = min(offset, os.fstat(f.fileno()).st_size)
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    return data[:end].decode(errors="replace").splitlines(), offset + end
