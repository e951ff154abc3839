"""The streaming loader: shards -> ready tensor batches, the same number on every rank, resumable mid-epoch.

`Stream` is what the training loop and evaluation read: `batches(epoch)` runs a torch DataLoader whose workers
each stream their slot of the epoch plan (`plan.py`, `worker.py`) and hand batches over in shared memory
(`handover.py`). `ShardStream` streams the shards of one split; `GroupedStream` (`groups.py`) mixes several shard
sets with fixed shares. `hepml_dist.data.loader.open_stream` picks the one a job needs.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from hepml_dist.data import features as feats
from hepml_dist.data.handover import EpochCursor, SlotRing, tune_malloc
from hepml_dist.data.manifest import CorruptShardError
from hepml_dist.data.plan import DataPosition, Piece, plan_slots, slot_bounds, worker_quota
from hepml_dist.data.reweight import load_weight_table
from hepml_dist.data.shards import ShardResolver
from hepml_dist.data.worker import META, WorkerStream
from hepml_dist.errors import UserError
from hepml_dist.spec.data import DataSpec


PREFETCH = 2  # batches each loader process builds ahead


class Stream:
    """Batches of ready tensors for one split, for one rank of `world_size`.

    `batches(epoch)` yields exactly `steps_per_epoch` batches (dicts of CPU tensors with the keys of
    docs/architecture.md) on every rank; `position` is where the last yielded batch ended, to store in a
    checkpoint and pass back as `batches(epoch, start=position)` after a restart. Subclasses set the shards,
    columns and steps, and say what each loader worker streams (`_worker_stream`).
    """

    def __init__(self, data: DataSpec, split: str, *, rank: int, world_size: int, seed: int, training: bool):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.data, self.split, self.rank, self.world_size = data, split, rank, world_size
        self.seed, self.training = int(seed), training
        self.workers = max(1, data.loader_workers)
        self.batch_size = data.batch_size
        self.weights = None  # a reweight table (data.reweight), applied by the workers
        self.sampling = False
        self.skipped_shards: set[str] = set()
        self.steps_per_epoch = 0
        self.shards: list = []
        self._cursor = EpochCursor()  # the epoch the loader processes stream next
        self._keep = False  # kept_loader_processes
        self._kept: tuple[torch.utils.data.DataLoader, SlotRing | None] | None = None
        self._kept_busy = False  # a call of `batches` is streaming from the kept loader

    @property
    def position(self) -> DataPosition:
        return DataPosition(**{**asdict(self._position), "skipped_shards": sorted(self.skipped_shards)})

    def _at(self, epoch: int, batches: int) -> DataPosition:
        return DataPosition(epoch, batches, self.split, self.world_size, self.workers, self.batch_size, self.seed,
                            len(self.shards))

    def batches(self, epoch: int, start: DataPosition | Mapping[str, Any] | None = None) -> Iterator[dict]:
        """Yield this epoch's batches (all of them, or those after `start`, a position saved in this epoch)."""
        tune_malloc()
        done = self._resume_point(epoch, start)
        steps = self.steps_per_epoch
        self._position = self._at(epoch, done)
        if done >= steps:
            return
        loader, ring, kept = self._loader(epoch, done)
        count, finished = done, False
        try:
            for batch in loader:
                if META + "slot" in batch:
                    taken = ring.take(batch.pop(META + "slot"), batch.pop(META + "layout"))
                    batch = taken | batch
                for key in [k for k in batch if k.startswith(META)]:
                    value = batch.pop(key)
                    if key == META + "skipped":
                        for shard in value:
                            warnings.warn(f"data.{self.split}: skipping corrupt shard {shard} "
                                          "(data.on_corrupt: skip)", stacklevel=2)
                        self.skipped_shards.update(value)
                count += 1
                self._position = self._at(epoch, count)
                yield batch
            finished = True
        except CorruptShardError as err:  # from a loader worker the message carries a traceback: keep the point
            raise CorruptShardError(err.shard, err.reason) from None
        except UserError as err:  # re-raised from a loader worker: keep only the message, not the traceback
            raise type(err)(_last_line(str(err))) from None
        finally:
            if kept:
                self._kept_busy = False
                if not finished:  # left mid-epoch (or failed): the kept processes may still be streaming it
                    self._stop_kept_loader()
        if count != steps:
            raise RuntimeError(f"internal error: {self.split} stream yielded {count} batches, planned {steps}")

    @contextlib.contextmanager
    def kept_loader_processes(self) -> Iterator[None]:
        """Within this block, `batches` keeps its loader processes from one call to the next (they wait between
        epochs); they stop when the block ends. Outside it, each call forks its own and stops them at its end.

        Forking a process the size of a training worker, and its first batch, cost a few hundred milliseconds
        per epoch and per validation; the pages the trainer writes after each fork are copied once more. Kept
        only where the loader forks (Linux); a call left mid-epoch stops them, and the next call forks afresh.
        """
        self._keep = True
        try:
            yield
        finally:
            self._keep = False
            self._stop_kept_loader()

    def _loader(self, epoch: int, done: int) -> tuple[torch.utils.data.DataLoader, SlotRing | None, bool]:
        """The DataLoader for one call of `batches`, its shared slots, and whether it is the kept one (then marked
        busy until that call ends)."""
        if self._kept is not None and not self._kept_busy:
            loader, ring = self._kept
            self._cursor.set(epoch, done)
        else:
            num_workers = self.data.loader_workers
            slots, slot_bytes = self.shared_slots()
            ring = SlotRing(num_workers, slots, slot_bytes) if slots else None
            # kept only where the loader forks its processes (which is when it has shared slots)
            keep = self._keep and self._kept is None and ring is not None
            cursor = self._cursor if keep else EpochCursor()  # a second, concurrent call gets a loader of its own
            cursor.set(epoch, done)
            loader = torch.utils.data.DataLoader(
                self._worker_stream(cursor, ring),
                batch_size=None,
                num_workers=num_workers,
                prefetch_factor=PREFETCH if num_workers else None,
                persistent_workers=keep,
                multiprocessing_context="fork" if ring else None,
            )
            if not keep:
                return loader, ring, False
            self._kept = loader, ring
        self._kept_busy = True
        return loader, ring, True

    def _stop_kept_loader(self) -> None:
        kept, self._kept = self._kept, None
        if kept is not None and getattr(kept[0], "_iterator", None) is not None:
            kept[0]._iterator._shutdown_workers()  # now, not whenever the garbage collector gets to it

    def shared_slots(self) -> tuple[int, int]:
        """The shared-memory batch slots `batches` maps while it runs: (count, bytes each); (0, 0) without loader
        processes. A fixed bound: a batch that finds no free slot takes torch's own transport instead."""
        workers = self.data.loader_workers
        if workers == 0 or "fork" not in multiprocessing.get_all_start_methods():
            return 0, 0
        # a worker can have up to PREFETCH x workers requests outstanding (when the others are done), and the
        # consumer usually holds a batch or two: a slot for each (more only cost address space, not memory)
        return PREFETCH * workers + 4, self._batch_bytes()

    def _worker_stream(self, cursor: EpochCursor, ring: SlotRing | None) -> WorkerStream:
        raise NotImplementedError

    def quotas(self) -> list[int]:
        """Batches each of this rank's workers yields per epoch; they sum to steps_per_epoch."""
        return [worker_quota(self.steps_per_epoch, self.workers, w) for w in range(self.workers)]

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


class ShardStream(Stream):
    """The shards of one split (`data.train`, `data.val` or `data.test`), planned as in hepml_dist.data.plan."""

    def __init__(self, data: DataSpec, split: str, *, rank: int, world_size: int, seed: int, training: bool = True):
        super().__init__(data, split, rank=rank, world_size=world_size, seed=seed, training=training)
        patterns = getattr(data, split, None)
        if patterns is None:
            raise UserError(f"data.{split}: not set in the job; name the shards of the {split} split")
        resolver = ShardResolver()
        self.shards = resolver.resolve(patterns)
        self.manifests = resolver.manifests
        self.builder = feats.get_builder(data.inputs.features)
        self.shapes, self.dtypes, available = self._merged_columns()  # the loader reads columns into these

        extra: list[str] = []
        if data.reweight is not None:
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
        self._position = self._at(0, 0)

    def _worker_stream(self, cursor: EpochCursor, ring: SlotRing | None) -> WorkerStream:
        return WorkerStream(self, cursor, ring)

    # -- planning -----------------------------------------------------------------------------------------------------

    def _merged_columns(self) -> tuple[dict[str, list[int]], dict[str, np.dtype], list[str]]:
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
        return shapes, {name: np.dtype(dtype) for name, dtype in dtypes.items()}, available

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
        even = super().quotas()
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


def _last_line(message: str) -> str:
    line = message.strip().splitlines()[-1] if message.strip() else message
    return line.split(": ", 1)[1] if line.startswith(("hepml_dist.", "UserError")) and ": " in line else line
