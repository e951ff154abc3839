"""What a training worker knows about its surroundings: rank, device, how to report to Ray, and stop requests.

The same loop runs inside Ray Train (`cluster.launcher: ray`; the context comes from hepml_dist.train.ray_workers)
or in a plain torch.distributed process group (`cluster.launcher: processes`, tests, torchrun). This module does not
import Ray: a run without it never pays Ray Train's import.

Stop requests (SLURM pre-emption) arrive as SIGTERM/SIGUSR1: the driver turns them into a stop file in the run
directory (Ray runs the loop in a thread, where signal handlers cannot be installed); a worker that owns its main
thread also catches the signals itself. Ranks agree on stopping through the step flags (hepml_dist.train.step).
"""

import os
import signal
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from hepml_dist.run_files import STOP_FILE, clear_stop, request_stop  # noqa: F401 - their home is run_files (no torch)


@dataclass
class WorkerContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    in_ray: bool
    reporter: Callable[[dict[str, Any]], None] | None = None
    """`ray.train.report` inside Ray Train; None elsewhere."""

    def report(self, metrics: dict[str, Any]) -> None:
        """Report to Ray Train (a barrier over all workers: call it the same number of times on every rank)."""
        if self.reporter is not None:
            self.reporter({k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))})

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def process_group_context(use_gpu: bool | None = None) -> WorkerContext:
    """Rank and device in a plain process group (or a single process). `use_gpu` None: a GPU when torch sees one."""
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local = int(os.environ.get("LOCAL_RANK", rank))
    use_gpu = torch.cuda.is_available() if use_gpu is None else use_gpu
    device = torch.device(f"cuda:{local}") if use_gpu else torch.device("cpu")
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
