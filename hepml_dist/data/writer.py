"""Writing datasets: examples -> train/val/test shards (atomic tars) and the manifest, resumable mid-conversion.

Converters, generators and `hepml data tokenize` all write through `DatasetWriter`. Its parts:
- `ColumnLayout` checks each block of examples against the columns seen so far (names, numeric dtypes, finite
  values, growing padded axes);
- `write_shard` writes one tar of chunks under a temporary name, with its sha256 computed on the way, and
  renames it into place;
- `DatasetWriter` assigns examples to splits, shuffles them across shards, and keeps (or restores) its state for
  an interrupted conversion in `DIR/.partial/`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from hepml_dist import files
from hepml_dist.data.manifest import (
    MANIFEST_NAME,
    SHARD_NAME,
    SPLITS,
    ColumnInfo,
    Manifest,
    ShardInfo,
    SplitInfo,
    write_manifest,
)
from hepml_dist.data.reader import pad_to
from hepml_dist.errors import UserError

_COLUMN_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
PARTIAL_DIR = ".partial"  # writer state of an interrupted conversion (see DatasetWriter.checkpoint)


def split_uniforms(indices: np.ndarray, seed: int) -> np.ndarray:
    """Uniform [0, 1) numbers that depend only on (seed, global example index): splitmix64, vectorised.

    The split of an example therefore does not depend on how the caller batches its `add` calls.
    """
    mask = (1 << 64) - 1
    offset = np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & mask)
    with np.errstate(over="ignore"):
        z = indices.astype(np.uint64) + offset
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


# ----------------------------------------------------------------------------------------------------------------------
# Columns


class ColumnLayout:
    """The dataset's columns: dtype and per-example shape of each, fixed by the first block of examples.

    Later blocks must have the same names and castable dtypes; axes after the first may grow (e.g. padded
    constituents of a wider batch): narrower blocks are zero-padded and the column is marked `padded`.
    """

    def __init__(self, check_finite: bool = True):
        self.check_finite = check_finite
        self.dtypes: dict[str, np.dtype] = {}
        self.shapes: dict[str, list[int]] = {}
        self.padded: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.dtypes)

    def admit(self, columns: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """The block as contiguous arrays in the layout's dtypes and shapes; UserError naming a bad column."""
        block = self._as_arrays(columns)
        if not self.dtypes:
            for name, array in block.items():
                self.dtypes[name], self.shapes[name], self.padded[name] = array.dtype, list(array.shape[1:]), False
            return {k: np.ascontiguousarray(v) for k, v in block.items()}
        missing, extra = sorted(set(self.dtypes) - set(block)), sorted(set(block) - set(self.dtypes))
        if missing or extra:
            raise UserError(f"columns changed between DatasetWriter.add calls: missing {missing}, new {extra}")
        for name, array in block.items():
            want = self.dtypes[name]
            if array.dtype != want:
                if not np.can_cast(array.dtype, want, casting="same_kind"):
                    raise UserError(f"column {name}: dtype {array.dtype} cannot be stored as {want} "
                                    "(the dtype of the first block)")
                array = array.astype(want)
            shape = self.shapes[name]
            if array.ndim - 1 != len(shape):
                raise UserError(f"column {name}: per-example shape {list(array.shape[1:])} has a different number "
                                f"of axes than before ({shape})")
            if list(array.shape[1:]) != shape:
                self.shapes[name] = [max(a, b) for a, b in zip(array.shape[1:], shape, strict=True)]
                self.padded[name] = True
                array = pad_to(array, self.shapes[name])
            block[name] = np.ascontiguousarray(array)
        return block

    def _as_arrays(self, columns: Mapping[str, Any]) -> dict[str, np.ndarray]:
        if not isinstance(columns, Mapping) or not columns:
            raise UserError("DatasetWriter.add needs a non-empty dict of column name -> array")
        block: dict[str, np.ndarray] = {}
        first_len = None
        for name, value in columns.items():
            if not isinstance(name, str) or not _COLUMN_NAME.match(name):
                raise UserError(f"column name {name!r}: use letters, digits and underscores (no dots), "
                                "starting with a letter")
            array = np.asarray(value)
            if array.dtype == object or array.dtype.kind not in "biuf":
                raise UserError(f"column {name}: dtype {array.dtype} is not numeric; store numbers only "
                                "(pad jagged arrays to a rectangle first)")
            if array.ndim == 0:
                raise UserError(f"column {name}: needs a first (example) axis, got a scalar")
            if first_len is None:
                first_len = len(array)
            elif len(array) != first_len:
                raise UserError(f"column {name}: {len(array)} examples, but other columns of the same block have "
                                f"{first_len}; all columns must share the first axis")
            if self.check_finite and array.dtype.kind == "f" and not np.isfinite(array).all():
                bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
                raise UserError(f"column {name}: {bad} NaN/inf value(s); replace them before writing (in a "
                                "converter schema: finite_or(x, 0)) or drop those examples")
            block[name] = array
        return block

    def infos(self) -> dict[str, ColumnInfo]:
        return {name: ColumnInfo(str(self.dtypes[name]), list(self.shapes[name]), self.padded[name]) for name in self.dtypes}

    def to_state(self) -> dict[str, Any]:
        return {"dtypes": {k: str(v) for k, v in self.dtypes.items()}, "shapes": self.shapes, "padded": self.padded}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.dtypes = {k: np.dtype(v) for k, v in state["dtypes"].items()}
        self.shapes = {k: list(v) for k, v in state["shapes"].items()}
        self.padded = {k: bool(v) for k, v in state["padded"].items()}


# ----------------------------------------------------------------------------------------------------------------------
# One shard


class _HashingFile:
    """Write-through file wrapper that computes sha256 and the size of what passes through it."""

    def __init__(self, f):
        self.f = f
        self.digest = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.digest.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def write_shard(out_dir: Path, split: str, index: int, arrays: Mapping[str, np.ndarray], chunk_size: int) -> ShardInfo:
    """DIR/<split>/shard-<index>.tar: chunks of `chunk_size` examples, one `.npy` member per column, written under
    a temporary name, flushed to disk and renamed into place."""
    name = SHARD_NAME.format(index)
    final = Path(out_dir) / split / name
    tmp = final.with_name(f"{name}.tmp-{os.getpid()}")
    n = len(next(iter(arrays.values())))
    chunks = []
    try:
        with open(tmp, "wb") as raw:
            hashing = _HashingFile(raw)
            writer = wds.TarWriter(hashing, mtime=0, user="hepml", group="hepml", mode=0o444)
            for c, start in enumerate(range(0, n, chunk_size)):
                stop = min(start + chunk_size, n)
                sample = {"__key__": f"{split}_{index:06d}_{c:04d}"}
                sample.update({f"{col}.npy": np.ascontiguousarray(v[start:stop]) for col, v in arrays.items()})
                writer.write(sample)
                chunks.append(stop - start)
            writer.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, final)
    except OSError as err:  # a full disk or quota: keep every finished shard, leave no partial one behind
        tmp.unlink(missing_ok=True)
        raise UserError(f"{final}: could not write this shard ({err.strerror or err}); the shards written before it "
                        "are intact. Free space and run the same command again (a conversion resumes from its last "
                        "checkpoint)") from None
    return ShardInfo(path=f"{split}/{name}", chunks=chunks, sha256=hashing.digest.hexdigest(), bytes=hashing.size)


def count_classes(info: SplitInfo, shard: Mapping[str, np.ndarray]) -> None:
    """Add the `label_*` value counts of a shard's examples to the split's class counts."""
    for name, values in shard.items():
        if name.startswith("label_"):
            labels, counts = np.unique(values, return_counts=True)
            merged = info.class_counts.setdefault(name, {})
            for label, count in zip(labels.tolist(), counts.tolist(), strict=True):
                merged[str(label)] = merged.get(str(label), 0) + int(count)
            info.class_counts[name] = dict(sorted(merged.items(), key=lambda kv: int(kv[0])))


class _SplitBuffer:
    """Examples of one split waiting to be shuffled into shards."""

    def __init__(self) -> None:
        self.blocks: list[dict[str, np.ndarray]] = []
        self.count = 0

    def append(self, block: dict[str, np.ndarray]) -> None:
        n = len(next(iter(block.values())))
        if n:
            self.blocks.append(block)
            self.count += n

    def take_all(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
        names = self.blocks[0].keys()
        out = {name: np.concatenate([pad_to(b[name], shapes[name]) for b in self.blocks]) for name in names}
        self.blocks, self.count = [], 0
        return out


# ----------------------------------------------------------------------------------------------------------------------
# The writer


class DatasetWriter:
    """Write examples into a sharded dataset: split assignment, shuffling across shards, atomic shards, manifest.

    Call `add(columns)` any number of times with blocks of examples (a dict of arrays sharing the first axis),
    then `close()`, which writes the remaining examples and `manifest.json` and returns the Manifest.
    Memory stays bounded: each split holds at most `shuffle_buffer` + one shard of examples.

    Each example goes to train/val/test by a hash of (seed, its global index), so the assignment does not depend
    on how `add` calls are batched. A shard is written when a split's buffer holds `shuffle_buffer` examples
    beyond a full shard: the buffer is permuted (seeded by seed, split and shard index) and one shard's worth is
    taken, which mixes examples (and classes, if the caller interleaves its inputs) across shards.
    Columns follow a `ColumnLayout`: shards already written keep their width when a padded axis grows, the
    manifest records the maximum shape with `padded: true`, and readers pad to it.
    """

    def __init__(self, out_dir: str | os.PathLike, *, schema: str, splits: Sequence[float] = (0.7, 0.1, 0.2),
                 seed: int = 0, chunk_size: int = 1024, chunks_per_shard: int = 16,
                 source_files: Iterable[str | os.PathLike] = (), meta: Mapping[str, Any] | None = None,
                 overwrite: bool = False, shuffle_buffer: int | None = None, check_finite: bool = True,
                 resume: bool = False):
        self.out_dir = Path(out_dir)
        self.schema = schema
        fractions = [float(x) for x in splits]
        if len(fractions) != len(SPLITS) or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
            raise UserError(f"split fractions {tuple(splits)}: need three non-negative numbers (train, val, test) "
                            "that sum to 1, e.g. 0.7,0.1,0.2")
        if chunk_size < 1 or chunks_per_shard < 1:
            raise UserError(f"chunk_size ({chunk_size}) and chunks_per_shard ({chunks_per_shard}) must be >= 1")
        self.fractions = dict(zip(SPLITS, fractions, strict=True))
        self._edges = np.cumsum(fractions)[:-1]
        self.seed = int(seed)
        self.chunk_size = int(chunk_size)
        self.chunks_per_shard = int(chunks_per_shard)
        self.shard_examples = self.chunk_size * self.chunks_per_shard
        self.shuffle_buffer = self.shard_examples if shuffle_buffer is None else int(shuffle_buffer)
        self.source_files = [str(s) for s in source_files]
        self.meta = dict(meta or {})

        self.layout = ColumnLayout(check_finite)
        self._buffers = {split: _SplitBuffer() for split in SPLITS}
        self._infos = {split: SplitInfo() for split in SPLITS}
        self._next_index = 0
        self._closed = False
        self.resumed_progress: dict[str, Any] | None = None  # the `progress` of the checkpoint resumed from
        self.manifest: Manifest | None = None  # set by close()
        self._created_dir = not self.out_dir.exists()
        self._prepare_directory(overwrite, resume)

    def add(self, columns: Mapping[str, Any]) -> None:
        """Add a block of examples: a dict of arrays whose first axis is the example."""
        if self._closed:
            raise RuntimeError("DatasetWriter.add after close()")
        block = self.layout.admit(columns)
        n = len(next(iter(block.values())))
        if n == 0:
            return
        u = split_uniforms(np.arange(self._next_index, self._next_index + n, dtype=np.uint64), self.seed)
        self._next_index += n
        which = np.searchsorted(self._edges, u, side="right")
        for i, split in enumerate(SPLITS):
            selected = which == i
            if selected.all():
                self._buffers[split].append(block)
            elif selected.any():
                self._buffers[split].append({k: v[selected] for k, v in block.items()})
        for split in SPLITS:
            while self._buffers[split].count >= self.shuffle_buffer + self.shard_examples:
                self._emit_shard(split)

    def close(self) -> Manifest:
        """Write what is left in the buffers and `manifest.json`; returns the Manifest."""
        if self._closed:
            raise RuntimeError("DatasetWriter.close called twice")
        if not self.layout:
            raise UserError(f"{self.out_dir}: no examples were added; check the input files and the selection")
        for split in SPLITS:
            while self._buffers[split].count:
                self._emit_shard(split)
        manifest = Manifest(schema=self.schema, columns=self.layout.infos(), splits=self._infos,
                            split_fractions=self.fractions, seed=self.seed, chunk_size=self.chunk_size,
                            chunks_per_shard=self.chunks_per_shard, source_files=self.source_files, meta=self.meta,
                            root=self.out_dir)
        write_manifest(manifest, self.out_dir)
        shutil.rmtree(self.out_dir / PARTIAL_DIR, ignore_errors=True)
        self._closed = True
        self.manifest = manifest
        return manifest

    def abandon(self) -> None:
        """After a failure: remove the shards and folders this writer made, unless a checkpoint (DIR/.partial/)
        makes them resumable, in which case everything stays for the rerun."""
        if self._closed or (self.out_dir / PARTIAL_DIR / "state.json").is_file():
            return
        shutil.rmtree(self.out_dir / PARTIAL_DIR, ignore_errors=True)
        for split in SPLITS:
            for shard in (self.out_dir / split).glob("shard-*.tar*"):
                shard.unlink()
        for folder in [self.out_dir / split for split in SPLITS] + ([self.out_dir] if self._created_dir else []):
            with contextlib.suppress(OSError):  # only folders left empty
                folder.rmdir()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._closed:
            self.close()

    @property
    def examples_added(self) -> int:
        return self._next_index

    @property
    def shards_written(self) -> int:
        return sum(len(info.shards) for info in self._infos.values())

    def _emit_shard(self, split: str) -> None:
        buffer = self._buffers[split]
        arrays = buffer.take_all(self.layout.shapes)
        n = len(next(iter(arrays.values())))
        info = self._infos[split]
        index = len(info.shards)
        order = np.random.default_rng([self.seed, SPLITS.index(split), index]).permutation(n)
        take = min(n, self.shard_examples)
        shard = {k: v[order[:take]] for k, v in arrays.items()}
        if take < n:
            buffer.append({k: v[order[take:]] for k, v in arrays.items()})
        info.shards.append(write_shard(self.out_dir, split, index, shard, self.chunk_size))
        count_classes(info, shard)

    # -- resumable conversions ----------------------------------------------------------------------------------------

    def checkpoint(self, progress: Mapping[str, Any]) -> None:
        """Persist the writer state (buffers, written shards) plus the caller's `progress`, atomically.

        A later `DatasetWriter(..., resume=True)` with the same settings continues from here and produces the
        same shards as an uninterrupted run; its `resumed_progress` is `progress`.
        """
        partial = self.out_dir / PARTIAL_DIR
        partial.mkdir(exist_ok=True)
        buffers = {}
        for split in SPLITS:
            buffer = self._buffers[split]
            if buffer.count:
                arrays = buffer.take_all(self.layout.shapes)
                buffer.append(arrays)
                name = f"buffer-{split}-{self._next_index}.npz"
                with files.replacing(partial / name) as tmp, open(tmp, "wb") as f:
                    np.savez(f, **arrays)
                buffers[split] = name
        state = {"fingerprint": self._fingerprint(), "next_index": self._next_index, **self.layout.to_state(),
                 "splits": {k: v.to_dict() for k, v in self._infos.items()}, "buffers": buffers,
                 "progress": dict(progress)}
        files.write_json(partial / "state.json", state)
        for old in partial.glob("buffer-*.npz"):
            if old.name not in buffers.values():
                old.unlink()

    def _fingerprint(self) -> dict[str, Any]:
        return {"schema": self.schema, "fractions": self.fractions, "seed": self.seed, "chunk_size": self.chunk_size,
                "chunks_per_shard": self.chunks_per_shard, "shuffle_buffer": self.shuffle_buffer,
                "source_files": self.source_files, "meta": json.loads(json.dumps(self.meta, default=str))}

    def _prepare_directory(self, overwrite: bool, resume: bool) -> None:
        out = self.out_dir
        state_file = out / PARTIAL_DIR / "state.json"
        if resume and not overwrite and state_file.is_file():
            state = json.loads(state_file.read_text())
            if state.get("fingerprint") != self._fingerprint():
                raise UserError(f"{out}: holds an interrupted conversion with different settings or inputs; "
                                "rerun with the same arguments to resume, or pass --overwrite to start again")
            self._restore(state)
            return
        if (out / MANIFEST_NAME).exists() and not overwrite:
            raise UserError(f"{out}: already holds a dataset (manifest.json); choose a new --out or pass --overwrite")
        ours = {MANIFEST_NAME, PARTIAL_DIR, *SPLITS}
        if out.is_dir() and not overwrite and not resume and any(p.name not in ours for p in out.iterdir()):
            raise UserError(f"{out}: directory holds other files; choose a new --out or pass --overwrite")
        # a fresh start: remove only what a writer makes (shards, temp files, manifest, partial state)
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        shutil.rmtree(out / PARTIAL_DIR, ignore_errors=True)
        for split in SPLITS:
            for old in (out / split).glob("shard-*.tar*"):
                old.unlink()
            (out / split).mkdir(parents=True, exist_ok=True)

    def _restore(self, state: Mapping[str, Any]) -> None:
        self._next_index = int(state["next_index"])
        self.layout.restore(state)
        self._infos = {k: SplitInfo.from_dict(v) for k, v in state["splits"].items()}
        partial = self.out_dir / PARTIAL_DIR
        for split, name in state["buffers"].items():
            with np.load(partial / name, allow_pickle=False) as arrays:
                self._buffers[split].append({k: arrays[k] for k in arrays.files})
        # shards written after the checkpoint are rewritten (identically) by the resumed run
        for split in SPLITS:
            keep = {Path(s.path).name for s in self._infos[split].shards}
            for shard in (self.out_dir / split).glob("shard-*.tar*"):
                if shard.name not in keep:
                    shard.unlink()
        self.resumed_progress = dict(state["progress"])
