"""What runs in each DataLoader worker: the worker's slot of the epoch plan, read window by window, shuffled,
cut into batches and built into model inputs (hepml_dist.data.features) in place in shared memory.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from hepml_dist.data import features as feats
from hepml_dist.data.handover import EpochCursor, SlotRing, tune_malloc
from hepml_dist.data.manifest import CorruptShardError
from hepml_dist.data.plan import Piece, batches_done_by_worker, plan_windows
from hepml_dist.data.reader import read_rows_into
from hepml_dist.errors import UserError

log = logging.getLogger("hepml_dist.data")
META = "_meta_"  # prefix of per-batch bookkeeping keys that the main process strips


class Window:
    """The examples of one window: one array per stored column, filled in place from the shards."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.size = len(next(iter(arrays.values())))

    def columns(self, names: Sequence[str]) -> dict[str, np.ndarray]:
        return {k: self.arrays[k] for k in names}

    def gather(self, index: np.ndarray) -> dict[str, np.ndarray]:
        """The examples at `index` (window positions), copied once; rows come out in window order."""
        index = np.sort(index)
        return {k: np.take(v, index, axis=0) for k, v in self.arrays.items()}


def _concatenate(first: Mapping[str, np.ndarray], second: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows of two gathered blocks, zero-padding axis 1 of padded columns cut to different widths."""
    out = {}
    for k, a in first.items():
        b = second[k]
        if a.ndim >= 2 and a.shape[1] != b.shape[1]:
            width = max(a.shape[1], b.shape[1])
            a, b = feats.fit_length(a, width), feats.fit_length(b, width)
        out[k] = np.concatenate([a, b])
    return out



class WorkerStream(IterableDataset):
    """The IterableDataset of a stream's epochs: each DataLoader worker streams its own slot of `stream` (a
    hepml_dist.data.stream.Stream: its plan, columns, builder and reweighting) in the epoch that `cursor` names
    when the worker starts it, so the same worker process can serve epoch after epoch."""

    def __init__(self, stream: Any, cursor: EpochCursor, ring: SlotRing | None = None):
        self.s = stream
        self.cursor = cursor
        self.ring = ring
        self.epoch, self.done = cursor.read()

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        tune_malloc()
        s = self.s
        self.epoch, self.done = self.cursor.read()
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
        reused: dict[int, dict] = {}  # per shared-memory slot: what build_batch last left there
        produced = 0
        for raw, skipped in self._raw_batches(pieces, slot, skip, loop):
            meta = {META + "skipped": skipped} if skipped else {}
            handle = None if ring is None else ring.acquire(info.id)
            if handle is None:  # in-process, or every slot still held by the consumer: torch's own transport
                yield feats.to_torch(self._build(raw, None)) | meta
            else:
                batch = self._build(raw, ring.allocator(handle), reused.setdefault(handle, {}))
                layout = ring.layout(handle, batch)
                ring.publish(handle)
                yield {META + "slot": handle, META + "layout": layout} | meta
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
                if s.data.bucket_by_length and s.training:
                    # examples still owed to the batch carried in from the previous window: a function of the
                    # plan alone (not of where this run started), so a resumed stream buckets identically
                    owed = -(pass_index * per_pass + sum(yields[:j])) % size
                    order = self._bucketed(window, order, owed, (pass_index, slot, j))
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

    def _window_order(self, window: Window, pass_index: int, slot: int, index: int, planned: int) -> np.ndarray:
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

    def _bucketed(self, window: Window, order: np.ndarray, owed: int, seed_key: tuple[int, ...]) -> np.ndarray:
        """`order` rearranged so that consecutive batches hold examples of similar length (data.bucket_by_length).

        The window's examples are sorted by length (stable, so ties keep the shuffled order); the `owed` longest
        complete the batch carried in from the previous window (whose leftover is long too), the rest is cut into
        whole batches whose order is shuffled, and the longest remainder is carried into the next window."""
        s = self.s
        size, count = s.batch_size, s.builder.count
        lengths = np.minimum(window.columns([count])[count][order], s.data.inputs.max_length)
        ranked = order[np.argsort(lengths, kind="stable")]
        owed = min(owed, len(ranked))
        head, body = ranked[len(ranked) - owed:], ranked[:len(ranked) - owed]
        whole = len(body) // size * size
        blocks = body[:whole].reshape(-1, size)
        rng = np.random.default_rng([s.seed, self.epoch, *seed_key, 0xB0C])
        return np.concatenate([head, blocks[rng.permutation(len(blocks))].ravel(), body[whole:]])

    def _read_window(self, window: list[Piece]) -> tuple[Window | None, list[str]]:
        """The window's rows, read into one array per column (shard by shard; corrupt shards skipped or raised)."""
        s = self.s
        newly_skipped: list[str] = []
        groups: list[list[Piece]] = []
        for piece in window:
            if groups and groups[-1][-1].shard == piece.shard:
                groups[-1].append(piece)
            else:
                groups.append([piece])
        total = sum(p.size for p in window)
        into = {c: np.empty((total, *s.shapes.get(c, ())), dtype=s.dtypes[c]) for c in s.columns}
        kept: list[tuple[int, int]] = []  # row ranges of the shards read
        offset = 0
        for group in groups:
            ref = s.shards[group[0].shard]
            rows = {p.chunk: (p.start, p.stop) for p in group}
            at, end = {}, offset
            for chunk in sorted(rows):  # a shard's rows in stored chunk order
                at[chunk] = end
                end += rows[chunk][1] - rows[chunk][0]
            try:
                read_rows_into(ref.source, rows, into, at, chunk_sizes=ref.info.chunks, expected_bytes=ref.info.bytes,
                               shard_key=ref.info.key)
                kept.append((offset, end))
            except CorruptShardError as err:
                if s.data.on_corrupt == "raise":
                    raise
                if ref.source not in s.skipped_shards:  # reported once per worker; the main process warns
                    log.warning("skipping corrupt shard %s (%s)", ref.source, err.reason)
                    s.skipped_shards.add(ref.source)
                    newly_skipped.append(ref.source)
            offset = end
        if not kept:
            return None, newly_skipped
        if len(kept) < len(groups):  # drop the rows of skipped shards
            into = {k: np.concatenate([v[a:b] for a, b in kept]) for k, v in into.items()}
        return Window(into), newly_skipped

    def _build(self, raw: dict[str, np.ndarray], alloc, reused: dict | None = None) -> dict[str, np.ndarray]:
        s = self.s
        if s.weights is not None and not s.sampling:  # loss weights (mean 1), times any stored event weight
            weight = (s.weights.weights(raw) / s.weights.mean_weight).astype(np.float32)
            raw = {**raw, "weight": weight * raw["weight"] if "weight" in raw else weight}
        return feats.build_batch(raw, s.builder, max_length=s.data.inputs.max_length,
                                 pad_to_multiple=s.data.inputs.pad_to_multiple,
                                 event_features=s.data.inputs.event_features, alloc=alloc, reused=reused)

