"""The collectives of the training engine, in one place: every rank calls them in the same order.

A no-op (or the identity) without an initialised process group of more than one rank, so the same loop runs in a
single process. Ray Train sets the process group up (gloo on CPU, NCCL on NVIDIA, RCCL on AMD); torchrun and the
tests' mp.spawn do the same by hand.

Every collective waits at most `parallel.collective_timeout_s` (the process group's timeout) for the other ranks: a
rank that stops answering (a stuck file system, a GPU fault, a deadlock) makes the others fail with a
`CollectiveTimeoutError` naming themselves and the step, from which the driver names the silent rank.
"""

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hepml_dist.errors import UserError

# What a waiting rank's error says when the process group's timeout expired: gloo's transport ("Timed out waiting
# 10000ms for recv operation to complete", then "Application timeout caused pair closure" for the next collective),
# and the NCCL/RCCL watchdog ("Watchdog caught collective operation timeout"), where it reaches Python.
COLLECTIVE_TIMEOUT_MARKERS = (
    "Timed out waiting",
    "Application timeout caused pair closure",
    "collective operation timeout",
)


class CollectiveTimeoutError(UserError):
    """This rank waited `timeout_s` in a collective after `step` optimizer steps, and some other rank never joined."""

    def __init__(self, rank: int, step: int, timeout_s: float):
        super().__init__(rank, step, timeout_s)  # the arguments themselves, so the error pickles to the driver
        self.rank, self.step, self.timeout_s = rank, step, timeout_s

    def __str__(self) -> str:
        return (f"rank {self.rank} waited {self.timeout_s:g} s in a collective after step {self.step} and another "
                "rank never joined it (parallel.collective_timeout_s)")


def is_collective_timeout(err: BaseException) -> bool:
    return isinstance(err, CollectiveTimeoutError) or any(m in str(err) for m in COLLECTIVE_TIMEOUT_MARKERS)


@contextmanager
def naming_collective_timeouts(rank: int, timeout_s: float, step: Callable[[], int]) -> Iterator[None]:
    """Turn a collective that timed out inside the block into a `CollectiveTimeoutError` of this rank, after
    `step()` optimizer steps (read when it happens)."""
    try:
        yield
    except Exception as err:
        if isinstance(err, CollectiveTimeoutError) or not is_collective_timeout(err):
            raise
        raise CollectiveTimeoutError(rank, step(), timeout_s) from err


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small tensor over all ranks, in place (the step flags and losses of a micro-batch); returns it."""
    if is_distributed():
        dist.all_reduce(values)
    return values


def gather_to_rank0(obj: Any, world_size: int) -> list[Any] | None:
    """Every rank's `obj` on rank 0 (in rank order); None on the other ranks."""
    if world_size == 1:
        return [obj]
    out: list[Any] | None = [None] * world_size if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_parameters(module: nn.Module, src: int = 0) -> None:
    """Make every rank's parameters and buffers equal to rank `src`'s (what DDP does at construction)."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src)


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Share rank `src`'s buffers (e.g. BatchNorm running statistics) before a forward, as DDP does."""
    if not is_distributed():
        return
    with torch.no_grad():
        for buf in module.buffers():
            dist.broadcast(buf.data, src)


class ProcessGroupCollectives:
    """What a model's `CrossRankState` modules call (hepml_dist.models.blocks.Collectives), over the process group."""

    def broadcast_from_rank0(self, *tensors: torch.Tensor) -> None:
        if is_distributed():
            for tensor in tensors:
                dist.broadcast(tensor, src=0)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return all_sum(tensor)
