"""Dataset groups (data.groups): training batches mixed from several shard sets with fixed shares."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from hepml_dist.data.handover import EpochCursor, SlotRing
from hepml_dist.data.plan import Piece
from hepml_dist.data.stream import ShardStream, Stream
from hepml_dist.data.worker import WorkerStream
from hepml_dist.errors import UserError
from hepml_dist.spec.data import DataSpec

SHARE_RESOLUTION = 1 << 24  # shares are exact to 1 part in 16.7 million: integer arithmetic, no float drift
_GOLDEN = round(0.6180339887498949 * SHARE_RESOLUTION)


class GroupedStream(Stream):
    """Training batches of `data.batch_size` examples of which each group fills a fixed share.

    Each group is an ordinary ShardStream (its own shards, shuffling, slots and passes) that yields raw batches of
    ceil(share x batch_size); a batch takes the first n_g(t) examples of each (already shuffled), where the counts
    of batch t come from systematic sampling with a low-discrepancy offset u_t = frac(u_0 + t x golden ratio):
    n_g(t) = floor(C_g + u_t) - floor(C_{g-1} + u_t) with C_g the cumulative targets. So n_g(t) is the floor or
    ceil of its target, the counts sum to batch_size, E[n_g] is exactly the target and over an epoch the mean
    is within O(log T / T) of it; the counts depend only on (seed, epoch, batch index): the same on every rank,
    unchanged by the number of loader workers, and exact on resume. Groups stay together within a batch.
    """

    def __init__(self, data: DataSpec, split: str, *, rank: int, world_size: int, seed: int, training: bool = True):
        if not training:
            raise UserError("data.groups mixes training batches only; evaluate on data.val or data.test")
        super().__init__(data, split, rank=rank, world_size=world_size, seed=seed, training=True)

        shares = np.array([g.share for g in data.groups], dtype=np.float64)
        targets = np.floor(shares / shares.sum() * self.batch_size * SHARE_RESOLUTION).astype(np.int64)
        targets[np.argmax(targets)] += self.batch_size * SHARE_RESOLUTION - targets.sum()  # sum exactly B
        self.cumulative = np.concatenate([[0], np.cumsum(targets)])
        self.caps = -(-targets // SHARE_RESOLUTION)  # ceil: the most a batch ever takes from a group
        self.members: list[ShardStream] = []
        for i, (group, cap) in enumerate(zip(data.groups, self.caps)):
            member_data = data.model_copy(update={"train": group.train, "groups": None, "batch_size": int(cap),
                                                  "steps_per_epoch": 1})
            try:  # groups are shuffled independently of each other
                member = ShardStream(member_data, "train", rank=rank, world_size=world_size,
                                     seed=self.seed + 1_000_003 * (i + 1), training=True)
            except UserError as err:
                raise UserError(f"data.groups[{i}] ({group.name}): {str(err).removeprefix('data.train: ')}") from None
            self.members.append(member)

        # one column set and one padded width for all groups, so their raw batches concatenate
        self.builder = self.members[0].builder
        self.columns = [c for c in self.members[0].columns if all(c in m.columns for m in self.members)]
        self.shapes = {}
        for member in self.members:
            for name, shape in member.shapes.items():
                old = self.shapes.get(name)
                self.shapes[name] = list(shape) if old is None else [max(a, b) for a, b in zip(old, shape)]
        for member in self.members:
            member.columns, member.shapes = self.columns, self.shapes

        self.shards = [ref for m in self.members for ref in m.shards]
        self.manifests = [x for m in self.members for x in m.manifests]
        self.examples = sum(m.examples for m in self.members)
        if data.steps_per_epoch is not None:
            steps = data.steps_per_epoch
        else:
            per_group = [m.examples // (int(cap) * world_size) for m, cap in zip(self.members, self.caps)]
            steps = min(per_group)
            if steps < 1:
                worst = data.groups[int(np.argmin(per_group))].name
                raise UserError(f"data.groups: group {worst} has too few examples for one batch on {world_size} "
                                "rank(s); lower data.batch_size or set data.steps_per_epoch")
        for member in self.members:
            member.steps_per_epoch = steps
        self.steps_per_epoch = steps
        self._position = self._at(0, 0)

    def group_counts(self, epoch: int, index: int) -> np.ndarray:
        """Examples of each group in batch `index` (counted over the rank's epoch) of `epoch`."""
        start = int(np.random.default_rng([self.seed, epoch, 0x6A09]).integers(SHARE_RESOLUTION))
        offset = (start + index * _GOLDEN) % SHARE_RESOLUTION
        return np.diff((self.cumulative + offset) // SHARE_RESOLUTION)

    def slots(self, epoch: int) -> list[list[Piece]]:
        return [[] for _ in range(self.world_size * self.workers)]  # each group plans its own slots

    def _worker_stream(self, cursor: EpochCursor, ring: SlotRing | None) -> WorkerStream:
        return GroupedWorkerStream(self, cursor, ring)


class GroupedWorkerStream(WorkerStream):
    """A loader worker's batches: the same worker slot of every group, trimmed to the batch's counts, joined."""

    def _raw_batches(self, pieces: list[Piece], slot: int, skip_batches: int,
                     loop: bool) -> Iterator[tuple[dict[str, np.ndarray], list[str]]]:
        s = self.s
        worker = slot - s.rank * s.workers
        at = EpochCursor(self.epoch, self.done)
        streams = [WorkerStream(m, at)._raw_batches(m.slots(self.epoch)[slot], slot, skip_batches, True)
                   for m in s.members]
        for j in range(skip_batches, 1 << 62):
            counts = s.group_counts(self.epoch, j * s.workers + worker)  # this worker's j-th batch, in rank order
            parts, skipped = [], []
            for stream, count in zip(streams, counts):
                raw, newly_skipped = next(stream)
                skipped += newly_skipped
                parts.append({k: v[:count] for k, v in raw.items()})
            yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, skipped
