"""What a training worker knows about its surroundings: rank, device, how to report to Ray, and stop requests.

The same loop runs inside Ray Train (`hepml train`) or in a plain torch.distributed process group (tests, torchrun).
Stop requests (SLURM pre-emption) arrive as SIGTERM/SIGUSR1: the driver turns them into a stop file in the run
directory (Ray runs the loop in a thread, where signal handlers cannot be installed); a worker that owns its main
thread also catches the signals itself. Ranks agree on stopping through the step flags (hepml_dist.train.step).
"""

import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

STOP_FILE = ".stop-requested"


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    in_ray: bool

    def report(self, metrics: dict[str, Any]) -> None:
        """Report to Ray Train (a barrier over all workers: call it the same number of times on every rank)."""
        if self.in_ray:
            ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))})

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def worker_context(in_ray: bool) -> WorkerContext:
    if in_ray:
        context = ray.train.get_context()
        return WorkerContext(
            context.get_world_rank(), context.get_world_size(), context.get_local_rank(), ray.train.torch.get_device(), True
        )
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device(f"cuda:{local}") if torch.cuda.is_available() else torch.device("cpu")
    return WorkerContext(rank, world, local, device, False)


class StopRequest:
    """Set by SIGTERM/SIGUSR1 (when this thread may install handlers) or by the run's stop file."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / STOP_FILE
        self.signalled = False
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        self.signalled = True

    def requested(self) -> bool:
        return self.signalled or self.path.exists()


def request_stop(run_dir: Path) -> None:
    """Ask the workers of a run to checkpoint and exit (what the driver does on SIGTERM/SIGUSR1)."""
    Path(run_dir, STOP_FILE).touch()


def clear_stop(run_dir: Path) -> None:
    Path(run_dir, STOP_FILE).unlink(missing_ok=True)
