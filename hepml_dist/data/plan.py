"""The epoch plan of the loader: pure functions of the manifest counts, the same on every rank.

How an epoch is planned (without opening a shard):

1. The shards are put in an order: shuffled by (seed, epoch) for training, as listed for evaluation.
2. Their chunks, concatenated, form one sequence of N examples. It is cut into `world_size x workers`
   contiguous, nearly equal *slots* (global rank r, DataLoader worker w -> slot r * workers + w). The split is
   by the explicit global rank passed in, never by environment variables (webdataset's own node splitting goes by
   the LOCAL rank, or refuses to run on several nodes).
3. A worker reads its slot in *windows* of about `data.shuffle_buffer` examples (several chunks, possibly of
   several shards), permutes each window (seeded by seed, epoch, pass, slot, window) and cuts consecutive batches
   of `data.batch_size` from the permuted stream, carrying a remainder into the next window. With
   `data.bucket_by_length` (training) the permuted window is sorted by length and cut into batches whose order is
   permuted (seeded the same way); the cut depends only on the plan, so the position below stays exact.
4. Training: every rank yields exactly `steps_per_epoch` batches, shared out among its workers (worker w gets
   steps // W, plus one if w < steps % W, which matches the DataLoader's round robin). A worker whose slot runs
   out starts another pass over it (new permutations); a worker with more data stops at its quota.
   Evaluation: each worker yields its slot once (last batch may be short); every rank yields the same number,
   `data.val_steps` or the minimum over ranks.

Because a worker's stream depends only on (seed, epoch, pass, slot), the position "epoch e, k batches done"
(`DataPosition`) identifies exactly which examples each worker has consumed: a restart skips them by opening only
the window it resumes in, with no lost and no repeated example (exact as long as world size, workers, batch size
and shards are the same, and no shard was skipped as corrupt; otherwise the resume is approximate and says so).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class DataPosition:
    """Where the last yielded batch ended: `batches` batches of `epoch` are done (the same on every rank)."""

    epoch: int = 0
    batches: int = 0
    split: str = "train"
    world_size: int = 1
    workers: int = 1
    batch_size: int = 0
    seed: int = 0
    shards: int = 0
    skipped_shards: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataPosition:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)



@dataclass(frozen=True)
class Piece:
    """Rows [start, stop) of chunk `chunk` of shard number `shard` (an index into the stream's shard list)."""

    shard: int
    chunk: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def slot_bounds(total: int, ranks: int, shares: Sequence[int]) -> list[int]:
    """Boundaries of the slots (rank-major): equal ranges per rank, cut among its workers in proportion to `shares`.

    With shares = the workers' batch quotas, a worker's range holds at least quota x batch size examples whenever
    the rank's does, so no worker has to start a second pass while another leaves data unread.
    """
    bounds = [0]
    whole = sum(shares)
    for rank in range(ranks):
        lo, hi = total * rank // ranks, total * (rank + 1) // ranks
        cumulative = 0
        for share in shares:
            cumulative += share
            bounds.append(lo + (hi - lo) * cumulative // whole)
    return bounds


def plan_slots(chunk_sizes: Sequence[Sequence[int]], order: Sequence[int], bounds: Sequence[int]) -> list[list[Piece]]:
    """Cut the concatenated chunks of the shards in `order` at `bounds` (example offsets) into contiguous slots."""
    slots = len(bounds) - 1
    out: list[list[Piece]] = [[] for _ in range(slots)]
    position, slot = 0, 0
    for shard in order:
        for chunk, size in enumerate(chunk_sizes[shard]):
            start, stop = position, position + size
            while slot < slots and start < stop:
                end = min(stop, bounds[slot + 1])
                if end > start:
                    out[slot].append(Piece(shard, chunk, start - position, end - position))
                start = end
                if start >= bounds[slot + 1]:
                    slot += 1
            position += size
    return out


def plan_windows(pieces: Sequence[Piece], window: int) -> list[list[Piece]]:
    """Group consecutive pieces into windows of at least `window` examples (the last may be smaller)."""
    out: list[list[Piece]] = []
    current: list[Piece] = []
    size = 0
    for piece in pieces:
        current.append(piece)
        size += piece.size
        if size >= max(window, 1):
            out.append(current)
            current, size = [], 0
    if current:
        out.append(current)
    return out


def worker_quota(steps: int, workers: int, worker: int) -> int:
    return steps // workers + (1 if worker < steps % workers else 0)


def batches_done_by_worker(batches: int, workers: int, worker: int) -> int:
    """Of the first `batches` batches (round robin over workers), how many came from `worker`."""
    return batches // workers + (1 if worker < batches % workers else 0)

