"""Handing batches from DataLoader workers to the trainer through reused shared memory, and the malloc settings
that keep batch-sized buffers cheap. Both exist for speed only: the batches are the same without them.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
import weakref
from collections.abc import Mapping

import numpy as np
import torch

_MALLOC_TUNED = False


def tune_malloc() -> None:
    """Keep batch-sized buffers on glibc's heap and the heap from shrinking, once per process.

    By default glibc serves allocations above 128 KiB-32 MiB with fresh mmaps and trims the heap top on free, so
    every batch's arrays are new pages; faulting them in dominates the loader's time on virtual machines (and
    costs on bare metal too). Set HEPML_MALLOC_TUNING=0 to leave malloc alone.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED or os.environ.get("HEPML_MALLOC_TUNING", "1") == "0":
        return
    _MALLOC_TUNED = True
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 256 << 20)
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


class EpochCursor:
    """The epoch, and how many of its batches are already done, for loader processes that outlive one epoch.

    The main process sets it before each epoch; each loader process reads it when it starts streaming that
    epoch. It lives in shared memory, so processes forked once see every later value. Pickled (a `spawn` start,
    which never keeps processes between epochs) it travels as the values it holds.
    """

    def __init__(self, epoch: int = 0, done: int = 0):
        self._values = np.frombuffer(mmap.mmap(-1, 16), dtype=np.int64)
        self.set(epoch, done)

    def set(self, epoch: int, done: int) -> None:
        self._values[:] = (epoch, done)

    def read(self) -> tuple[int, int]:
        return int(self._values[0]), int(self._values[1])

    def __reduce__(self):
        return EpochCursor, self.read()


class SlotRing:
    """Shared memory through which DataLoader workers hand batches to the main process, reused batch after batch.

    torch's default transport puts every tensor of every batch in a fresh shared-memory segment; faulting in
    those new pages (twice: in the worker and in the trainer) costs more than building the batch, above all on
    virtual machines. Here each worker owns a few fixed slots of one anonymous shared mapping made before the
    workers fork: it builds a batch directly into a free slot and sends only a small layout through the
    DataLoader. The main process wraps the slot's memory as the batch's tensors without copying; the slot is
    free again once the last of those tensors is garbage-collected. A worker that finds no free slot (the
    consumer keeps many batches alive) falls back to torch's transport for that batch, so nothing is ever
    overwritten while in use. The consumer must treat the tensors as read-only: a worker re-zeroes only the
    padding that its last batch in a slot wrote (build_batch's `reused`).
    """

    ALIGN = 64

    def __init__(self, workers: int, slots_per_worker: int, slot_bytes: int):
        self.workers, self.slots, self.slot_bytes = workers, slots_per_worker, slot_bytes
        self.buffer = mmap.mmap(-1, workers * slots_per_worker * slot_bytes)
        self.state = np.frombuffer(mmap.mmap(-1, max(workers * slots_per_worker, 1)), dtype=np.uint8)

    def _base(self, slot: int) -> int:
        return slot * self.slot_bytes

    def acquire(self, worker: int, wait: float = 0.005) -> int | None:
        """A free slot of `worker`, waiting up to `wait` seconds; None if all are still in use."""
        own = self.state[worker * self.slots:(worker + 1) * self.slots]
        deadline = time.monotonic() + wait
        while True:
            free = np.flatnonzero(own == 0)
            if len(free):
                return worker * self.slots + int(free[0])
            if time.monotonic() > deadline:
                return None
            time.sleep(0.0002)

    def allocator(self, slot: int):
        """alloc(n, dtype) carving aligned arrays out of the slot, for build_batch."""
        view = memoryview(self.buffer)[self._base(slot):self._base(slot) + self.slot_bytes]
        used = [0]

        def alloc(n: int, dtype: np.dtype) -> np.ndarray:
            start = -(-used[0] // self.ALIGN) * self.ALIGN
            stop = start + n * dtype.itemsize
            if stop > self.slot_bytes:
                raise RuntimeError(f"internal error: a batch needs more than the {self.slot_bytes} bytes planned")
            used[0] = stop
            return np.frombuffer(view[start:stop], dtype=dtype)

        return alloc

    def layout(self, slot: int, batch: Mapping[str, np.ndarray]) -> dict[str, tuple[int, str, tuple[int, ...]]]:
        base = np.frombuffer(self.buffer, dtype=np.uint8, count=1, offset=self._base(slot)).ctypes.data
        layout = {k: (v.ctypes.data - base, v.dtype.str, v.shape) for k, v in batch.items()}
        for name, (offset, _, _) in layout.items():
            if not 0 <= offset < self.slot_bytes or not batch[name].flags.c_contiguous:
                raise RuntimeError(f"internal error: batch output {name} was not built in the shared slot")
        return layout

    def publish(self, slot: int) -> None:
        self.state[slot] = 1

    def take(self, slot: int, layout: Mapping[str, tuple[int, str, tuple[int, ...]]]) -> dict:
        """The published batch as tensors viewing the slot; the slot is freed when they are all gone."""
        region = np.frombuffer(self.buffer, dtype=np.uint8, count=self.slot_bytes, offset=self._base(slot))
        weakref.finalize(region, self._release, self.state, slot)
        # one ndarray constructor per output (its base is `region`): a quarter of the time of slicing, viewing and
        # reshaping, on the trainer's thread between two steps
        return {name: torch.from_numpy(np.ndarray(shape, dtype, region, offset))
                for name, (offset, dtype, shape) in layout.items()}

    @staticmethod
    def _release(state: np.ndarray, slot: int) -> None:
        state[slot] = 0

