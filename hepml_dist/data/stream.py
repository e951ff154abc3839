"""The streaming loader: shards -> ready tensor batches, the same number on every rank, resumable mid-epoch.

How an epoch is planned (from the manifest alone, identically on every rank, without opening a shard):

1. The shards are put in an order: shuffled by (seed, epoch) for training, as listed for evaluation.
2. Their chunks, concatenated, form one sequence of N examples. It is cut into `world_size x workers`
   contiguous, nearly equal *slots* (global rank r, DataLoader worker w -> slot r * workers + w). The split is
   by the explicit global rank passed in, never by environment variables (webdataset's defaults would split by
   LOCAL rank or refuse to run on several nodes; see shared/reference/aot_style_ray_wds.md section 4.1).
3. A worker reads its slot in *windows* of about `data.shuffle_buffer` examples (several chunks, possibly of
   several shards), permutes each window (seeded by seed, epoch, pass, slot, window) and cuts consecutive batches
   of `data.batch_size` from the permuted stream, carrying a remainder into the next window.
4. Training: every rank yields exactly `steps_per_epoch` batches, shared out among its workers (worker w gets
   steps // W, plus one if w < steps % W, which matches the DataLoader's round robin). A worker whose slot runs
   out starts another pass over it (new permutations); a worker with more data stops at its quota.
   Evaluation: each worker yields its slot once (last batch may be short); every rank yields the same number,
   `data.val_steps` or the minimum over ranks.

Because a worker's stream depends only on (seed, epoch, pass, slot), the position "epoch e, k batches done"
identifies exactly which examples each worker has consumed: a restart skips them by opening only the window
it resumes in, with no lost and no repeated example (exact as long as world size, workers, batch size and
shards are the same, and no shard was skipped as corrupt; otherwise the resume is approximate and says so).
"""

from __future__ import annotations

import glob as globlib
import json
import logging
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hepml_dist.data import features as feats
from hepml_dist.data.format import (
    MANIFEST_NAME,
    CorruptShardError,
    Manifest,
    ShardInfo,
    iter_shard_chunks,
    is_local,
    read_manifest,
)
from hepml_dist.errors import UserError
from hepml_dist.spec.data import DataSpec

log = logging.getLogger("hepml_dist.data")
_META = "_meta_"  # prefix of per-batch bookkeeping keys that the main process strips


# ----------------------------------------------------------------------------------------------------------------------
# Position


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


# ----------------------------------------------------------------------------------------------------------------------
# Shard resolution


@dataclass(frozen=True)
class ShardRef:
    """One shard to read: where it is, what the manifest says about it, and which manifest."""

    source: str
    info: ShardInfo
    dataset: int  # index into ShardStream.manifests


def _join_url(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _read_remote_manifest(url: str) -> Manifest:
    import webdataset as wds

    try:
        with wds.gopen(url, "rb") as f:
            data = json.loads(f.read())
        return Manifest.from_dict(data, root=None)
    except Exception as err:  # noqa: BLE001 - any transport or parse problem is a user-facing one here
        raise UserError(f"{url}: cannot read the dataset manifest ({type(err).__name__}: {err}); shards are "
                        "streamed only together with the manifest.json written next to their split folders")


class _Resolver:
    """Turns the spec's shard patterns into ShardRefs, loading each dataset's manifest once."""

    def __init__(self) -> None:
        self.manifests: list[Manifest] = []
        self._by_root: dict[str, int] = {}

    def manifest_for(self, root: str) -> int:
        if root not in self._by_root:
            if is_local(root):
                manifest = read_manifest(root)
            else:
                manifest = _read_remote_manifest(_join_url(root, MANIFEST_NAME))
            self._by_root[root] = len(self.manifests)
            self.manifests.append(manifest)
        return self._by_root[root]

    def resolve(self, patterns: str | Sequence[str]) -> list[ShardRef]:
        from webdataset.shardlists import expand_urls

        items = [patterns] if isinstance(patterns, str) else list(patterns)
        refs: list[ShardRef] = []
        for item in items:
            item = str(item)
            if not item.endswith(".tar") and "*" not in item and "{" not in item:
                refs += self._split_directory(item)
                continue
            for url in expand_urls(item):
                if is_local(url) and any(c in url for c in "*?["):
                    matches = sorted(globlib.glob(url))
                    if not matches:
                        raise UserError(f"data: the pattern {url} matches no shard")
                    refs += [self._shard(m) for m in matches]
                else:
                    refs.append(self._shard(url))
        if not refs:
            raise UserError(f"data: {patterns} names no shards")
        seen = set()
        for ref in refs:
            if ref.source in seen:
                raise UserError(f"data: shard {ref.source} is listed twice; each shard may appear once")
            seen.add(ref.source)
        return refs

    def _split_directory(self, path: str) -> list[ShardRef]:
        local = is_local(path)
        if local and (Path(path) / MANIFEST_NAME).is_file():
            raise UserError(f"data: {path} is a dataset root; name one split of it, e.g. {Path(path) / 'train'}")
        if local and not Path(path).is_dir():
            raise UserError(f"data: {path} does not exist (expected a split folder such as data/fcc-tau/train, "
                            "a glob or a brace pattern of shards)")
        split = path.rstrip("/").rsplit("/", 1)[-1]
        root = path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else "."
        index = self.manifest_for(root)
        manifest = self.manifests[index]
        if split not in manifest.splits:
            raise UserError(f"data: {path}: the dataset has splits {sorted(manifest.splits)}, not {split!r}")
        shards = manifest.splits[split].shards
        if not shards:
            raise UserError(f"data: {path}: the {split} split of this dataset is empty")
        return [ShardRef(_join_url(root, s.path), s, index) for s in shards]

    def _shard(self, url: str) -> ShardRef:
        parts = url.rstrip("/").rsplit("/", 2)
        if len(parts) < 3 and is_local(url):
            parts = ["."] + parts
        if len(parts) < 3:
            raise UserError(f"data: shard {url} is not inside a split folder of a dataset (DIR/<split>/shard.tar)")
        root, split, name = parts
        index = self.manifest_for(root)
        info = self.manifests[index].shard_infos().get(f"{split}/{name}")
        if info is None:
            raise UserError(f"data: shard {url} is not listed in {_join_url(root, MANIFEST_NAME)}; "
                            "was it written by another conversion?")
        return ShardRef(url, info, index)


# ----------------------------------------------------------------------------------------------------------------------
# Epoch plan (pure functions of the manifest counts)


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


# ----------------------------------------------------------------------------------------------------------------------
# The stream


class ShardStream:
    """Batches of ready tensors for one split, for one rank of `world_size`.

    `batches(epoch)` yields exactly `steps_per_epoch` batches (dicts of CPU tensors with the keys of
    docs/architecture.md) on every rank; `position` is where the last yielded batch ended, to store in a
    checkpoint and pass back as `batches(epoch, start=position)` after a restart.
    """

    def __init__(self, data: DataSpec, split: str, *, rank: int, world_size: int, seed: int, training: bool = True):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        patterns = getattr(data, split, None)
        if patterns is None:
            raise UserError(f"data.{split}: not set in the job; name the shards of the {split} split")
        self.data = data
        self.split = split
        self.rank = rank
        self.world_size = world_size
        self.seed = int(seed)
        self.training = training
        self.workers = max(1, data.loader_workers)
        self.batch_size = data.batch_size

        resolver = _Resolver()
        self.shards = resolver.resolve(patterns)
        self.manifests = resolver.manifests
        self.builder = feats.get_builder(data.inputs.features)
        self.shapes, available = self._merged_columns()

        self.weights = None
        extra: list[str] = []
        if data.reweight is not None:
            from hepml_dist.data.reweight import load_weight_table

            self.weights = load_weight_table(self.manifests, self.shards, data.reweight)
            extra = self.weights.columns
        self.columns = feats.stored_columns(self.builder, available, extra)
        self.sampling = bool(self.weights is not None and training and data.reweight.mode == "sample")

        self._chunk_sizes = [ref.info.chunks for ref in self.shards]
        self.examples = sum(sum(c) for c in self._chunk_sizes)
        slots = world_size * self.workers
        if self.examples < slots:
            raise UserError(f"data.{split}: {self.examples} examples cannot feed {world_size} rank(s) x "
                            f"{self.workers} loader worker(s); use fewer workers or more data")
        if len(self.shards) < slots:
            warnings.warn(f"data.{split}: {len(self.shards)} shard(s) for {world_size} rank(s) x {self.workers} "
                          "loader worker(s): workers will share shards (equal batch counts are kept, but reading is "
                          "less efficient); write smaller shards (--shard-size) for this many workers",
                          stacklevel=2)
        self.steps_per_epoch = self._steps()
        self._position = DataPosition(0, 0, split, world_size, self.workers, self.batch_size, self.seed,
                                      len(self.shards))
        self.skipped_shards: set[str] = set()

    # -- public API ---------------------------------------------------------------------------------------------------

    @property
    def position(self) -> DataPosition:
        return DataPosition(**{**asdict(self._position), "skipped_shards": sorted(self.skipped_shards)})

    def batches(self, epoch: int, start: DataPosition | Mapping[str, Any] | None = None) -> Iterator[dict]:
        """Yield this epoch's batches (all of them, or those after `start`, a position saved in this epoch)."""
        import torch

        tune_malloc()
        done = self._resume_point(epoch, start)
        steps = self.steps_per_epoch
        self._position = DataPosition(epoch, done, self.split, self.world_size, self.workers, self.batch_size,
                                      self.seed, len(self.shards))
        if done >= steps:
            return
        num_workers = self.data.loader_workers
        fork = num_workers > 0 and "fork" in _start_methods()
        prefetch = 2
        # a worker can have up to prefetch x workers requests outstanding (when the others are done), and the
        # consumer usually holds a batch or two: a slot for each (more only cost address space, not memory)
        ring = _SlotRing(num_workers, prefetch * num_workers + 4, self._batch_bytes()) if fork else None
        dataset = _WorkerStream(self, epoch, done, ring)
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            prefetch_factor=prefetch if num_workers else None,
            persistent_workers=False,
            multiprocessing_context="fork" if fork else None,
        )
        count = done
        try:
            for batch in loader:
                if _META + "slot" in batch:
                    taken = ring.take(batch.pop(_META + "slot"), batch.pop(_META + "layout"))
                    batch = taken | batch
                for key in [k for k in batch if k.startswith(_META)]:
                    value = batch.pop(key)
                    if key == _META + "skipped":
                        for shard in value:
                            warnings.warn(f"data.{self.split}: skipping corrupt shard {shard} "
                                          "(data.on_corrupt: skip)", stacklevel=2)
                        self.skipped_shards.update(value)
                count += 1
                self._position = DataPosition(epoch, count, self.split, self.world_size, self.workers,
                                              self.batch_size, self.seed, len(self.shards))
                yield batch
        except CorruptShardError as err:  # from a loader worker the message carries a traceback: keep the point
            raise CorruptShardError(err.shard, err.reason) from None
        except UserError as err:  # re-raised from a loader worker: keep only the message, not the traceback
            raise type(err)(_last_line(str(err))) from None
        if count != steps:
            raise RuntimeError(f"internal error: {self.split} stream yielded {count} batches, planned {steps}")

    # -- planning -----------------------------------------------------------------------------------------------------

    def _merged_columns(self) -> tuple[dict[str, list[int]], list[str]]:
        shapes: dict[str, list[int]] = {}
        dtypes: dict[str, str] = {}
        used = sorted({ref.dataset for ref in self.shards})
        for i in used:
            for name, column in self.manifests[i].columns.items():
                if name in dtypes and dtypes[name] != column.dtype:
                    raise UserError(f"data.{self.split}: column {name} is {dtypes[name]} in one dataset and "
                                    f"{column.dtype} in another; shards of one split must share the schema")
                dtypes[name] = column.dtype
                old = shapes.get(name)
                shapes[name] = list(column.shape) if old is None else [max(a, b) for a, b in zip(old, column.shape)]
        available = [n for n in dtypes if all(n in self.manifests[i].columns for i in used)]
        return shapes, available

    def _batch_bytes(self) -> int:
        """An upper bound of one built batch's size (all outputs, aligned), for the shared slots."""
        size, length, builder = self.batch_size, self.data.inputs.max_length, self.builder
        floats = length * (builder.channels + (4 if builder.vectors else 0) + 1 + len(builder.derived))
        total = size * floats * 4
        for name in self.columns:
            shape = self.shapes.get(name, [])
            per_example = int(np.prod(shape)) if shape else 1
            if shape:
                per_example = max(per_example, length * int(np.prod(shape[1:])))
            total += size * per_example * 8
        total += size * (len(self.data.inputs.event_features) + 2) * 8 + size * length * 8
        return total + 64 * (len(self.columns) + 16) + 4096

    def _acceptance(self) -> float:
        return self.weights.mean_weight if self.sampling else 1.0

    def _steps(self) -> int:
        b, r = self.batch_size, self.world_size
        if self.training:
            if self.data.steps_per_epoch is not None:
                return self.data.steps_per_epoch
            steps = int(self.examples * self._acceptance()) // (b * r)
            if steps < 1:
                raise UserError(f"data.{self.split}: {self.examples} examples give no full batch of {b} per rank "
                                f"on {r} rank(s); lower data.batch_size or set data.steps_per_epoch")
            return steps
        if self.split == "val" and self.data.val_steps is not None:
            return self.data.val_steps
        return min(sum(self.natural_batches(k)) for k in range(r))

    def natural_batches(self, rank: int) -> list[int]:
        """Evaluation: batches each worker of `rank` makes from one pass over its slot (last one short)."""
        slots = self.slots(0)
        return [math.ceil(sum(p.size for p in slots[rank * self.workers + w]) / self.batch_size)
                for w in range(self.workers)]

    def quotas(self) -> list[int]:
        """Batches each of this rank's workers yields per epoch; they sum to steps_per_epoch."""
        steps, workers = self.steps_per_epoch, self.workers
        even = [worker_quota(steps, workers, w) for w in range(workers)]
        if self.training:
            return even
        natural = self.natural_batches(self.rank)
        if steps > sum(natural):  # data.val_steps asks for more than one pass: loop like training
            return even
        quotas, excess = list(natural), sum(natural) - steps
        for w in reversed(range(workers)):  # trim from the last workers, which the round robin serves last
            cut = min(excess, quotas[w])
            quotas[w] -= cut
            excess -= cut
        return quotas

    def slots(self, epoch: int) -> list[list[Piece]]:
        """Every (rank, worker) slot of an epoch; training splits a rank's range in proportion to the quotas."""
        shares = ([worker_quota(self.steps_per_epoch, self.workers, w) for w in range(self.workers)]
                  if self.training and self.steps_per_epoch >= self.workers else [1] * self.workers)
        bounds = slot_bounds(self.examples, self.world_size, shares)
        return plan_slots(self._chunk_sizes, self.epoch_order(epoch), bounds)

    def epoch_order(self, epoch: int) -> list[int]:
        if not self.training:
            return list(range(len(self.shards)))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()

    def _resume_point(self, epoch: int, start: DataPosition | Mapping[str, Any] | None) -> int:
        if start is None:
            return 0
        if not isinstance(start, DataPosition):
            start = DataPosition.from_dict(start)
        if start.epoch != epoch:
            return 0 if start.epoch < epoch else self.steps_per_epoch
        same = (start.world_size, start.workers, start.batch_size, start.seed, start.shards) == (
            self.world_size, self.workers, self.batch_size, self.seed, len(self.shards))
        if not same or start.skipped_shards:
            warnings.warn(f"data.{self.split}: resuming epoch {epoch} at batch {start.batches} with a different "
                          "layout (world size, loader workers, batch size, seed, shards) or after skipped corrupt "
                          "shards; the remaining batches are not an exact continuation", stacklevel=3)
        return min(start.batches, self.steps_per_epoch)


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
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, 256 << 20)
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _start_methods() -> list[str]:
    import multiprocessing

    return multiprocessing.get_all_start_methods()


def _last_line(message: str) -> str:
    line = message.strip().splitlines()[-1] if message.strip() else message
    return line.split(": ", 1)[1] if line.startswith(("hepml_dist.", "UserError")) and ": " in line else line


# ----------------------------------------------------------------------------------------------------------------------
# What runs in each DataLoader worker


def _iterable_base():
    from torch.utils.data import IterableDataset

    return IterableDataset


class _Window:
    """The examples of one window: the chunk pieces as read (views of memory-mapped shards), not concatenated."""

    def __init__(self, parts: list[dict[str, np.ndarray]]):
        self.parts = parts
        sizes = [len(next(iter(p.values()))) for p in parts]
        self.starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.size = int(self.starts[-1])

    def columns(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        return {k: np.concatenate([p[k] for p in self.parts]) for k in names}

    def gather(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """The examples at `index` (window positions), copied once; rows come out in window order."""
        index = np.sort(index)
        bounds = np.searchsorted(index, self.starts)
        first = self.parts[0]
        out = {k: np.empty((len(index), *v.shape[1:]), dtype=v.dtype) for k, v in first.items()}
        for p, part in enumerate(self.parts):
            a, b = bounds[p], bounds[p + 1]
            if a < b:
                local = index[a:b] - self.starts[p]
                for k, v in part.items():
                    np.take(v, local, axis=0, out=out[k][a:b])
        return out


def _concatenate(first: Mapping[str, np.ndarray], second: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows of two gathered blocks, zero-padding axis 1 of padded columns cut to different widths."""
    out = {}
    for k, a in first.items():
        b = second[k]
        if a.ndim >= 2 and a.shape[1] != b.shape[1]:
            width = max(a.shape[1], b.shape[1])
            a, b = feats._fit(a, width), feats._fit(b, width)
        out[k] = np.concatenate([a, b])
    return out


class _SlotRing:
    """Shared memory through which DataLoader workers hand batches to the main process, reused batch after batch.

    torch's default transport puts every tensor of every batch in a fresh shared-memory segment; faulting in
    those new pages (twice: in the worker and in the trainer) costs more than building the batch, above all on
    virtual machines. Here each worker owns a few fixed slots of one anonymous shared mapping made before the
    workers fork: it builds a batch directly into a free slot and sends only a small layout through the
    DataLoader. The main process wraps the slot's memory as the batch's tensors without copying; the slot is
    free again once the last of those tensors is garbage-collected. A worker that finds no free slot (the
    consumer keeps many batches alive) falls back to torch's transport for that batch, so nothing is ever
    overwritten while in use.
    """

    ALIGN = 64

    def __init__(self, workers: int, slots_per_worker: int, slot_bytes: int):
        import mmap

        self.workers, self.slots, self.slot_bytes = workers, slots_per_worker, slot_bytes
        self.buffer = mmap.mmap(-1, workers * slots_per_worker * slot_bytes)
        self.state = np.frombuffer(mmap.mmap(-1, max(workers * slots_per_worker, 1)), dtype=np.uint8)

    def _base(self, slot: int) -> int:
        return slot * self.slot_bytes

    def acquire(self, worker: int, wait: float = 0.005) -> int | None:
        """A free slot of `worker`, waiting up to `wait` seconds; None if all are still in use."""
        import time

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
        import weakref

        import torch

        region = np.frombuffer(self.buffer, dtype=np.uint8, count=self.slot_bytes, offset=self._base(slot))
        weakref.finalize(region, self._release, self.state, slot)
        out = {}
        for name, (offset, dtype, shape) in layout.items():
            dtype = np.dtype(dtype)
            count = int(np.prod(shape, dtype=np.int64))
            view = region[offset:offset + count * dtype.itemsize].view(dtype).reshape(shape)
            out[name] = torch.from_numpy(view)
        return out

    @staticmethod
    def _release(state: np.ndarray, slot: int) -> None:
        state[slot] = 0


class _WorkerStream(_iterable_base()):  # torch is imported when the stream module is, only for this base class
    """The IterableDataset of one epoch: each DataLoader worker streams its own slot."""

    def __init__(self, stream: ShardStream, epoch: int, done: int, ring: _SlotRing | None = None):
        self.s = stream
        self.epoch = epoch
        self.done = done
        self.ring = ring

    def __iter__(self) -> Iterator[dict]:
        import torch

        info = torch.utils.data.get_worker_info()
        tune_malloc()
        s = self.s
        # the DataLoader's round robin always starts at its worker 0, so after k batches that worker plays the
        # part of worker k % W: the resumed batches then come in exactly the original order
        worker = (0 if info is None else info.id + self.done) % s.workers
        quota = s.quotas()[worker]
        skip = batches_done_by_worker(self.done, s.workers, worker)
        if skip >= quota:
            return
        slot = s.rank * s.workers + worker
        pieces = s.slots(self.epoch)[slot]
        loop = s.training or quota > s.natural_batches(s.rank)[worker]
        ring = self.ring if info is not None else None
        produced = 0
        for raw, skipped in self._raw_batches(pieces, slot, skip, loop):
            meta = {_META + "skipped": skipped} if skipped else {}
            handle = None if ring is None else ring.acquire(info.id)
            if handle is None:  # in-process, or every slot still held by the consumer: torch's own transport
                yield feats.to_torch(self._build(raw, None)) | meta
            else:
                batch = self._build(raw, ring.allocator(handle))
                layout = ring.layout(handle, batch)
                ring.publish(handle)
                yield {_META + "slot": handle, _META + "layout": layout} | meta
            produced += 1
            if produced >= quota - skip:
                return

    # The worker's example stream: windows of its slot, pass after pass (evaluation: one pass).

    def _window_size(self) -> int:
        return max(self.s.data.shuffle_buffer, self.s.batch_size) if self.s.training else self.s.batch_size * 4

    def _raw_batches(self, pieces: list[Piece], slot: int, skip_batches: int,
                     loop: bool) -> Iterator[tuple[dict[str, np.ndarray], list[str]]]:
        """(stored columns of one batch, corrupt shards skipped since the last batch), batch after batch."""
        s = self.s
        size = s.batch_size
        windows = plan_windows(pieces, self._window_size())
        yields = [self._window_yield(sum(p.size for p in w)) for w in windows]
        per_pass = sum(yields)
        if per_pass == 0:
            return
        first_pass, offset = divmod(skip_batches * size, per_pass)
        start_window = 0
        while start_window < len(windows) and offset >= yields[start_window]:
            offset -= yields[start_window]
            start_window += 1
        carry: dict[str, np.ndarray] | None = None
        pending: list[str] = []  # corrupt shards skipped since the last yielded batch
        passes = range(first_pass, 1 << 62) if loop else range(first_pass, first_pass + 1)
        for pass_index in passes:
            delivered = 0
            for j in range(start_window if pass_index == first_pass else 0, len(windows)):
                window, skipped = self._read_window(windows[j])
                pending += skipped
                if window is None:
                    continue
                order = self._window_order(window, pass_index, slot, j, yields[j])
                position = offset if (pass_index == first_pass and j == start_window) else 0
                while position < len(order):
                    need = size - (0 if carry is None else len(next(iter(carry.values()))))
                    take = order[position:position + need]
                    position += len(take)
                    part = window.gather(take)
                    carry = part if carry is None else _concatenate(carry, part)
                    delivered += len(take)
                    if len(next(iter(carry.values()))) == size:
                        yield carry, pending
                        pending, carry = [], None
            if delivered == 0 and loop:
                raise UserError(f"data.{s.split}: every shard of loader slot {slot} is unreadable "
                                f"({sorted(s.skipped_shards)}); check the dataset with `hepml data verify`")
        if carry is not None and not loop:
            yield carry, pending

    def _window_yield(self, n: int) -> int:
        return int(round(n * self.s.weights.mean_weight)) if self.s.sampling else n

    def _window_order(self, window: _Window, pass_index: int, slot: int, index: int, planned: int) -> np.ndarray:
        s = self.s
        n = window.size
        if not s.training:
            return np.arange(n)
        rng = np.random.default_rng([s.seed, self.epoch, pass_index, slot, index])
        if s.sampling:
            # draw a fixed number of examples (with replacement, probability ~ weight): the stream length stays a
            # function of the manifest counts alone, which keeps epochs equal across ranks and resume exact
            weights = s.weights.weights(window.columns(s.weights.columns)).astype(np.float64)
            total = weights.sum()
            if total <= 0:
                return np.empty(0, dtype=np.int64)
            return rng.choice(n, size=planned, replace=True, p=weights / total)
        if s.data.shuffle_buffer == 0:
            return np.arange(n)
        return rng.permutation(n)

    def _read_window(self, window: list[Piece]) -> tuple[_Window | None, list[str]]:
        s = self.s
        parts: list[dict[str, np.ndarray]] = []
        newly_skipped: list[str] = []
        groups: list[list[Piece]] = []
        for piece in window:
            if groups and groups[-1][-1].shard == piece.shard:
                groups[-1].append(piece)
            else:
                groups.append([piece])
        for group in groups:
            ref = s.shards[group[0].shard]
            rows = {p.chunk: (p.start, p.stop) for p in group}
            try:
                got = {}
                for chunk, arrays in iter_shard_chunks(ref.source, columns=s.columns, chunks=set(rows),
                                                       shapes=s.shapes, expected_chunks=len(ref.info.chunks)):
                    start, stop = rows[chunk]
                    if len(next(iter(arrays.values()))) != ref.info.chunks[chunk]:
                        raise CorruptShardError(ref.source, f"chunk {chunk} has "
                                                f"{len(next(iter(arrays.values())))} examples, the manifest says "
                                                f"{ref.info.chunks[chunk]}")
                    got[chunk] = {k: v[start:stop] for k, v in arrays.items()}
                missing = set(rows) - set(got)
                if missing:
                    raise CorruptShardError(ref.source, f"chunk(s) {sorted(missing)} missing (truncated)")
                parts += [got[c] for c in sorted(got)]
            except CorruptShardError as err:
                if s.data.on_corrupt == "raise":
                    raise
                if ref.source not in s.skipped_shards:  # reported once per worker; the main process warns
                    log.warning("skipping corrupt shard %s (%s)", ref.source, err.reason)
                    s.skipped_shards.add(ref.source)
                    newly_skipped.append(ref.source)
        return (_Window(parts) if parts else None), newly_skipped

    def _build(self, raw: dict[str, np.ndarray], alloc) -> dict[str, np.ndarray]:
        s = self.s
        if s.weights is not None and not s.sampling:  # loss weights (mean 1), times any stored event weight
            weight = (s.weights.weights(raw) / s.weights.mean_weight).astype(np.float32)
            raw = {**raw, "weight": weight * raw["weight"] if "weight" in raw else weight}
        return feats.build_batch(raw, s.builder, max_length=s.data.inputs.max_length,
                                 pad_to_multiple=s.data.inputs.pad_to_multiple,
                                 event_features=s.data.inputs.event_features, alloc=alloc)
