"""The on-disk dataset format: webdataset tars of chunks, a JSON manifest, the writer and the raw chunk reader.

A dataset is a directory::

    DIR/manifest.json                 schema, splits, per-shard counts and checksums (see docs/data-format.md)
    DIR/train/shard-000000.tar        webdataset tar; each tar sample is one *chunk* of up to `chunk_size`
    DIR/val/...                       examples and each column is one `.npy` member of that sample
    DIR/test/...

Everything else in hepml_dist.data (converters, generators, the loader, verify/inspect) goes through
`DatasetWriter`, `read_manifest` and `iter_shard_chunks`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hepml_dist import __version__
from hepml_dist.errors import UserError

FORMAT_NAME = "hepml-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS: tuple[str, ...] = ("train", "val", "test")
SHARD_NAME = "shard-{:06d}.tar"
_COLUMN_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
_PARTIAL_DIR = ".partial"  # writer state of an interrupted conversion (see DatasetWriter.checkpoint)


class CorruptShardError(UserError):
    """A shard that cannot be read back as the manifest describes it (truncated tar, bad .npy, missing chunk)."""

    _ADVICE = ". Check the dataset with `hepml data verify`, rewrite the shard, or set data.on_corrupt: skip"

    def __init__(self, shard: str, reason: str | None = None):
        if reason is None:  # rebuilt from a message alone (as torch's DataLoader does across worker processes)
            message = shard.strip().splitlines()[-1] if shard.strip() else shard
            message = message.split("CorruptShardError: ", 1)[-1]
            found = re.match(r"corrupt shard (.+?): (.*?)(?:\. Check the dataset.*)?$", message)
            self.shard, self.reason = (found.group(1), found.group(2)) if found else ("?", message)
        else:
            self.shard, self.reason = shard, reason
        super().__init__(f"corrupt shard {self.shard}: {self.reason}{self._ADVICE}")

    def __reduce__(self):  # keep (shard, reason) when the error is pickled
        return (type(self), (self.shard, self.reason))


# ----------------------------------------------------------------------------------------------------------------------
# Manifest


@dataclass
class ShardInfo:
    """One shard: its path relative to the dataset directory, examples per chunk, checksum and size."""

    path: str
    chunks: list[int]
    sha256: str
    bytes: int

    @property
    def examples(self) -> int:
        return int(sum(self.chunks))

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "examples": self.examples, "chunks": self.chunks, "sha256": self.sha256,
                "bytes": self.bytes}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardInfo:
        return cls(path=str(d["path"]), chunks=[int(n) for n in d["chunks"]], sha256=str(d["sha256"]),
                   bytes=int(d["bytes"]))


@dataclass
class ColumnInfo:
    """dtype and per-example shape of a column; `padded` marks axes zero-padded to the dataset maximum."""

    dtype: str
    shape: list[int]
    padded: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": self.shape, "padded": self.padded}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ColumnInfo:
        return cls(dtype=str(d["dtype"]), shape=[int(n) for n in d["shape"]], padded=bool(d.get("padded", False)))


@dataclass
class SplitInfo:
    """Shards of one split and the class counts of every `label_*` column (value -> count)."""

    shards: list[ShardInfo] = field(default_factory=list)
    class_counts: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def examples(self) -> int:
        return sum(s.examples for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "class_counts": self.class_counts,
                "shards": [s.to_dict() for s in self.shards]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SplitInfo:
        counts = {str(k): {str(c): int(n) for c, n in v.items()} for k, v in d.get("class_counts", {}).items()}
        return cls(shards=[ShardInfo.from_dict(s) for s in d.get("shards", [])], class_counts=counts)


@dataclass
class Manifest:
    """Everything needed to read, check and account for a dataset without opening its shards."""

    schema: str
    columns: dict[str, ColumnInfo]
    splits: dict[str, SplitInfo]
    split_fractions: dict[str, float]
    seed: int
    chunk_size: int
    chunks_per_shard: int
    source_files: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    converter_version: str = __version__
    format_version: int = FORMAT_VERSION
    root: Path | None = None  # the dataset directory this manifest was read from (not stored)

    def shard_infos(self) -> dict[str, ShardInfo]:
        """All shards of all splits by relative path (`train/shard-000000.tar`)."""
        return {s.path: s for split in self.splits.values() for s in split.shards}

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "schema": self.schema,
            "converter_version": self.converter_version,
            "seed": self.seed,
            "split_fractions": self.split_fractions,
            "chunk_size": self.chunk_size,
            "chunks_per_shard": self.chunks_per_shard,
            "columns": {name: c.to_dict() for name, c in self.columns.items()},
            "splits": {name: s.to_dict() for name, s in self.splits.items()},
            "source_files": self.source_files,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], root: Path | None = None) -> Manifest:
        if d.get("format") != FORMAT_NAME:
            raise ValueError(f"not a {FORMAT_NAME} manifest (format = {d.get('format')!r})")
        if int(d.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"format_version {d['format_version']} is newer than this hepml_dist understands "
                             f"({FORMAT_VERSION}); upgrade hepml_dist")
        return cls(
            schema=str(d["schema"]),
            columns={name: ColumnInfo.from_dict(c) for name, c in d["columns"].items()},
            splits={name: SplitInfo.from_dict(s) for name, s in d["splits"].items()},
            split_fractions={k: float(v) for k, v in d["split_fractions"].items()},
            seed=int(d["seed"]),
            chunk_size=int(d["chunk_size"]),
            chunks_per_shard=int(d["chunks_per_shard"]),
            source_files=list(d.get("source_files", [])),
            meta=dict(d.get("meta", {})),
            converter_version=str(d.get("converter_version", "unknown")),
            format_version=int(d["format_version"]),
            root=root,
        )


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read `DIR/manifest.json` (or the manifest file itself); a clear UserError if missing or malformed."""
    path = Path(path)
    file = path / MANIFEST_NAME if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{file}: no dataset manifest here; point at a directory written by `hepml data convert` "
                        "(or `hepml data generate`)")
    try:
        return Manifest.from_dict(json.loads(file.read_text()), root=file.parent)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise UserError(f"{file}: malformed manifest ({type(err).__name__}: {err}); rewrite the dataset") from None


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to `path` through a temporary file and os.replace, so readers never see half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def file_sha256(path: str | os.PathLike, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            digest.update(data)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# Writer


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


def _pad_to(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Zero-pad every axis after the first up to `shape` (the per-example shape)."""
    if tuple(array.shape[1:]) == tuple(shape):
        return array
    widths = [(0, 0)] + [(0, int(want) - have) for have, want in zip(array.shape[1:], shape, strict=True)]
    return np.pad(array, widths)


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
        out = {name: np.concatenate([_pad_to(b[name], shapes[name]) for b in self.blocks]) for name in names}
        self.blocks, self.count = [], 0
        return out


class DatasetWriter:
    """Write examples into a sharded dataset: split assignment, shuffling across shards, atomic shards, manifest.

    Call `add(columns)` any number of times with blocks of examples (a dict of arrays sharing the first axis),
    then `close()`, which writes the remaining examples and `manifest.json` and returns the Manifest.
    Memory stays bounded: each split holds at most `shuffle_buffer` + one shard of examples.

    Each example goes to train/val/test by a hash of (seed, its global index), so the assignment does not depend
    on how `add` calls are batched. A shard is written when a split's buffer holds `shuffle_buffer` examples
    beyond a full shard: the buffer is permuted (seeded by seed, split and shard index) and one shard's worth is
    taken, which mixes examples (and classes, if the caller interleaves its inputs) across shards.

    Columns must keep their names and dtypes across calls. Axes after the first may grow between calls
    (e.g. padded constituents of a wider batch): narrower blocks are zero-padded, shards already written keep
    their width, the manifest records the maximum shape with `padded: true`, and readers pad to it.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        schema: str,
        splits: Sequence[float] = (0.7, 0.1, 0.2),
        seed: int = 0,
        chunk_size: int = 1024,
        chunks_per_shard: int = 16,
        source_files: Iterable[str | os.PathLike] = (),
        meta: Mapping[str, Any] | None = None,
        overwrite: bool = False,
        shuffle_buffer: int | None = None,
        check_finite: bool = True,
        resume: bool = False,
    ):
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
        self.check_finite = check_finite
        self.source_files = [str(s) for s in source_files]
        self.meta = dict(meta or {})

        self._dtypes: dict[str, np.dtype] = {}
        self._shapes: dict[str, list[int]] = {}
        self._padded: dict[str, bool] = {}
        self._buffers = {split: _SplitBuffer() for split in SPLITS}
        self._infos = {split: SplitInfo() for split in SPLITS}
        self._next_index = 0
        self._closed = False
        self.manifest: Manifest | None = None  # set by close()
        self._prepare_directory(overwrite, resume)

    # -- public API ---------------------------------------------------------------------------------------------------

    def add(self, columns: Mapping[str, Any]) -> None:
        """Add a block of examples: a dict of arrays whose first axis is the example."""
        if self._closed:
            raise RuntimeError("DatasetWriter.add after close()")
        block = self._check_block(columns)
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
                self._emit_shard(split, final=False)

    def close(self) -> Manifest:
        """Write what is left in the buffers and `manifest.json`; returns the Manifest."""
        if self._closed:
            raise RuntimeError("DatasetWriter.close called twice")
        if not self._dtypes:
            raise UserError(f"{self.out_dir}: no examples were added; check the input files and the selection")
        for split in SPLITS:
            while self._buffers[split].count:
                self._emit_shard(split, final=True)
        manifest = Manifest(
            schema=self.schema,
            columns={name: ColumnInfo(str(self._dtypes[name]), list(self._shapes[name]), self._padded[name])
                     for name in self._dtypes},
            splits=self._infos,
            split_fractions=self.fractions,
            seed=self.seed,
            chunk_size=self.chunk_size,
            chunks_per_shard=self.chunks_per_shard,
            source_files=self.source_files,
            meta=self.meta,
            root=self.out_dir,
        )
        write_json_atomic(self.out_dir / MANIFEST_NAME, manifest.to_dict())
        shutil.rmtree(self.out_dir / _PARTIAL_DIR, ignore_errors=True)
        self._closed = True
        self.manifest = manifest
        return manifest

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and not self._closed:
            self.close()

    @property
    def examples_added(self) -> int:
        return self._next_index

    # -- resumable conversions ----------------------------------------------------------------------------------------

    def checkpoint(self, progress: Mapping[str, Any]) -> None:
        """Persist the writer state (buffers, written shards) plus the caller's `progress`, atomically.

        A later `DatasetWriter(..., resume=True)` with the same settings continues from here and produces the
        same shards as an uninterrupted run; `resumed_progress` returns `progress` to the caller.
        """
        partial = self.out_dir / _PARTIAL_DIR
        partial.mkdir(exist_ok=True)
        buffers = {}
        for split in SPLITS:
            buffer = self._buffers[split]
            if buffer.count:
                arrays = buffer.take_all(self._shapes)
                buffer.append(arrays)
                name = f"buffer-{split}-{self._next_index}.npz"
                tmp = partial / f".{name}.tmp"
                with open(tmp, "wb") as f:
                    np.savez(f, **arrays)
                os.replace(tmp, partial / name)
                buffers[split] = name
        state = {
            "fingerprint": self._fingerprint(),
            "next_index": self._next_index,
            "dtypes": {k: str(v) for k, v in self._dtypes.items()},
            "shapes": self._shapes,
            "padded": self._padded,
            "splits": {k: v.to_dict() for k, v in self._infos.items()},
            "buffers": buffers,
            "progress": dict(progress),
        }
        write_json_atomic(partial / "state.json", state)
        for old in partial.glob("buffer-*.npz"):
            if old.name not in buffers.values():
                old.unlink()

    @property
    def resumed_progress(self) -> dict[str, Any] | None:
        """The `progress` of the checkpoint this writer resumed from, or None for a fresh start."""
        return getattr(self, "_resumed_progress", None)

    # -- internals ----------------------------------------------------------------------------------------------------

    def _fingerprint(self) -> dict[str, Any]:
        return {"schema": self.schema, "fractions": self.fractions, "seed": self.seed, "chunk_size": self.chunk_size,
                "chunks_per_shard": self.chunks_per_shard, "shuffle_buffer": self.shuffle_buffer,
                "source_files": self.source_files, "meta": json.loads(json.dumps(self.meta, default=str))}

    def _prepare_directory(self, overwrite: bool, resume: bool) -> None:
        out = self.out_dir
        state_file = out / _PARTIAL_DIR / "state.json"
        if resume and not overwrite and state_file.is_file():
            state = json.loads(state_file.read_text())
            if state.get("fingerprint") != self._fingerprint():
                raise UserError(f"{out}: holds an interrupted conversion with different settings or inputs; "
                                "rerun with the same arguments to resume, or pass --overwrite to start again")
            self._restore(state)
            return
        if (out / MANIFEST_NAME).exists() and not overwrite:
            raise UserError(f"{out}: already holds a dataset (manifest.json); choose a new --out or pass --overwrite")
        ours = {MANIFEST_NAME, _PARTIAL_DIR, *SPLITS}
        if out.is_dir() and not overwrite and not resume and any(p.name not in ours for p in out.iterdir()):
            raise UserError(f"{out}: directory holds other files; choose a new --out or pass --overwrite")
        # a fresh start: remove only what a writer makes (shards, temp files, manifest, partial state)
        (out / MANIFEST_NAME).unlink(missing_ok=True)
        shutil.rmtree(out / _PARTIAL_DIR, ignore_errors=True)
        for split in SPLITS:
            for old in (out / split).glob("shard-*.tar*"):
                old.unlink()
            (out / split).mkdir(parents=True, exist_ok=True)

    def _restore(self, state: Mapping[str, Any]) -> None:
        self._next_index = int(state["next_index"])
        self._dtypes = {k: np.dtype(v) for k, v in state["dtypes"].items()}
        self._shapes = {k: list(v) for k, v in state["shapes"].items()}
        self._padded = {k: bool(v) for k, v in state["padded"].items()}
        self._infos = {k: SplitInfo.from_dict(v) for k, v in state["splits"].items()}
        partial = self.out_dir / _PARTIAL_DIR
        for split, name in state["buffers"].items():
            with np.load(partial / name, allow_pickle=False) as arrays:
                self._buffers[split].append({k: arrays[k] for k in arrays.files})
        # shards written after the checkpoint are rewritten (identically) by the resumed run
        for split in SPLITS:
            keep = {Path(s.path).name for s in self._infos[split].shards}
            for shard in (self.out_dir / split).glob("shard-*.tar*"):
                if shard.name not in keep:
                    shard.unlink()
        self._resumed_progress = dict(state["progress"])

    def _check_block(self, columns: Mapping[str, Any]) -> dict[str, np.ndarray]:
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
                raise UserError(f"column {name}: {bad} NaN/inf value(s); fill or drop them in the converter "
                                "(schema `fill_nan`) before writing")
            block[name] = array
        if not self._dtypes:
            for name, array in block.items():
                self._dtypes[name] = array.dtype
                self._shapes[name] = list(array.shape[1:])
                self._padded[name] = False
            return {k: np.ascontiguousarray(v) for k, v in block.items()}
        missing = sorted(set(self._dtypes) - set(block))
        extra = sorted(set(block) - set(self._dtypes))
        if missing or extra:
            raise UserError(f"columns changed between DatasetWriter.add calls: missing {missing}, new {extra}")
        for name, array in block.items():
            want = self._dtypes[name]
            if array.dtype != want:
                if not np.can_cast(array.dtype, want, casting="same_kind"):
                    raise UserError(f"column {name}: dtype {array.dtype} cannot be stored as {want} "
                                    "(the dtype of the first block)")
                array = array.astype(want)
            shape = self._shapes[name]
            if array.ndim - 1 != len(shape):
                raise UserError(f"column {name}: per-example shape {list(array.shape[1:])} has a different number "
                                f"of axes than before ({shape})")
            if list(array.shape[1:]) != shape:
                grown = [max(a, b) for a, b in zip(array.shape[1:], shape, strict=True)]
                self._shapes[name] = grown
                self._padded[name] = True
                array = _pad_to(array, grown)
            block[name] = np.ascontiguousarray(array)
        return block

    def _emit_shard(self, split: str, final: bool) -> None:
        buffer = self._buffers[split]
        arrays = buffer.take_all(self._shapes)
        n = len(next(iter(arrays.values())))
        info = self._infos[split]
        index = len(info.shards)
        rng = np.random.default_rng([self.seed, SPLITS.index(split), index])
        order = rng.permutation(n)
        take = min(n, self.shard_examples)
        shard = {k: v[order[:take]] for k, v in arrays.items()}
        if take < n:
            buffer.append({k: v[order[take:]] for k, v in arrays.items()})
        info.shards.append(self._write_shard(split, index, shard))
        for name, values in shard.items():
            if name.startswith("label_"):
                labels, counts = np.unique(values, return_counts=True)
                merged = info.class_counts.setdefault(name, {})
                for label, count in zip(labels.tolist(), counts.tolist(), strict=True):
                    merged[str(label)] = merged.get(str(label), 0) + int(count)
                info.class_counts[name] = dict(sorted(merged.items(), key=lambda kv: int(kv[0])))

    def _write_shard(self, split: str, index: int, arrays: Mapping[str, np.ndarray]) -> ShardInfo:
        import webdataset as wds

        name = SHARD_NAME.format(index)
        final = self.out_dir / split / name
        tmp = final.with_name(f"{name}.tmp-{os.getpid()}")
        n = len(next(iter(arrays.values())))
        chunks = []
        with open(tmp, "wb") as raw:
            hashing = _HashingFile(raw)
            writer = wds.TarWriter(hashing, mtime=0, user="hepml", group="hepml", mode=0o444)
            for c, start in enumerate(range(0, n, self.chunk_size)):
                stop = min(start + self.chunk_size, n)
                sample = {"__key__": f"{split}_{index:06d}_{c:04d}"}
                sample.update({f"{col}.npy": np.ascontiguousarray(v[start:stop]) for col, v in arrays.items()})
                writer.write(sample)
                chunks.append(stop - start)
            writer.close()
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, final)
        return ShardInfo(path=f"{split}/{name}", chunks=chunks, sha256=hashing.digest.hexdigest(), bytes=hashing.size)


# ----------------------------------------------------------------------------------------------------------------------
# Raw chunk reader


_NPY_HEADER = re.compile(
    rb"\{'descr': '([<>|][a-z][0-9]+)', 'fortran_order': (False|True), 'shape': \(([0-9, ]*)\), \}\s*\n")


def _fast_npy_header(data: bytes | memoryview) -> tuple[tuple[int, ...], bool, np.dtype, int] | None:
    """The header numpy itself writes (version 1.0), parsed with one regex instead of ast.literal_eval."""
    head = bytes(data[:10])
    if len(head) < 10 or head[:8] != b"\x93NUMPY\x01\x00":
        return None
    length = int.from_bytes(head[8:10], "little")
    found = _NPY_HEADER.fullmatch(bytes(data[10:10 + length]))
    if found is None:
        return None
    shape = tuple(int(x) for x in found.group(3).replace(b" ", b"").split(b",") if x)
    return shape, found.group(2) == b"True", np.dtype(found.group(1).decode()), 10 + length


def decode_npy(data: bytes | memoryview, what: str = "array") -> np.ndarray:
    """Decode one `.npy` member without copying; ValueError naming `what` if the bytes are not a full array."""
    fast = _fast_npy_header(data)
    if fast is not None:
        shape, fortran, dtype, offset = fast
        count = int(np.prod(shape, dtype=np.int64))
        if len(data) - offset != count * dtype.itemsize:
            raise ValueError(f"{what}: {len(data) - offset} data bytes, expected {count * dtype.itemsize} "
                             f"for {dtype} {tuple(shape)} (truncated or corrupt)")
        return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape, order="F" if fortran else "C")
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buffer)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buffer)
    except Exception as err:  # numpy raises ValueError for bad magic/headers, but be safe
        raise ValueError(f"{what}: not a .npy array ({err})") from None
    if dtype.hasobject:
        raise ValueError(f"{what}: object arrays are not allowed")
    count = int(np.prod(shape, dtype=np.int64))
    offset = buffer.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"{what}: {len(data) - offset} data bytes, expected {count * dtype.itemsize} "
                         f"for {dtype} {tuple(shape)} (truncated or corrupt)")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran else "C")


def is_local(source: str) -> bool:
    """A path on this machine (or file://), as opposed to what webdataset's gopen streams (URLs, pipe:)."""
    if source.startswith("pipe:"):
        return False
    return "://" not in source or source.startswith("file://")


def _local_path(source: str) -> str:
    return source[len("file://"):] if source.startswith("file://") else source


def _member_key_column(name: str) -> tuple[str, str | None]:
    base = name.rsplit("/", 1)[-1]
    key, _, rest = base.partition(".")
    return key, (rest[:-4] if rest.endswith(".npy") else None)


def _iter_members_local(path: str, wanted: set[str] | None, chunks: Sequence[int] | set[int] | None):
    """(key, column, bytes) of the members we want; members of unwanted chunks or columns are seeked over.

    Member data is read straight into a fresh numpy buffer (`readinto`), which decode_npy then views without
    copying. (Memory-mapping the shard instead avoids that copy but pays a page fault per 4 KiB on first touch,
    which on virtual machines costs more than the copy.)
    """
    chunk_set = None if chunks is None else set(chunks)
    last_chunk = None if chunk_set is None else max(chunk_set, default=-1)
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        chunk_index, current = -1, None
        for member in tar:
            key, column = _member_key_column(member.name)
            if key != current:
                current = key
                chunk_index += 1
                if last_chunk is not None and chunk_index > last_chunk:
                    return
            yield key, None, None  # marks chunk boundaries for the caller's counting
            if column is None or (wanted is not None and column not in wanted):
                continue
            if chunk_set is not None and chunk_index not in chunk_set:
                continue
            data = np.empty(member.size, dtype=np.uint8)
            f.seek(member.offset_data)
            got = f.readinto(data)
            if got != member.size:
                raise ValueError(f"member {member.name}: {got} of {member.size} bytes (truncated)")
            yield key, column, data


def _iter_members_stream(url: str, wanted: set[str] | None, chunks: Sequence[int] | set[int] | None):
    import webdataset as wds
    from webdataset.tariterators import tar_file_iterator

    chunk_set = None if chunks is None else set(chunks)
    stream = wds.gopen(url, "rb")
    try:
        chunk_index, current = -1, None
        for item in tar_file_iterator(stream):
            key, column = _member_key_column(item["fname"])
            if key != current:
                current = key
                chunk_index += 1
            yield key, None, None
            if column is None or (wanted is not None and column not in wanted):
                continue
            if chunk_set is not None and chunk_index not in chunk_set:
                continue
            yield key, column, item["data"]
    finally:
        stream.close()


def iter_shard_chunks(
    source: str | os.PathLike,
    *,
    columns: Iterable[str] | None = None,
    chunks: Sequence[int] | set[int] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    expected_chunks: int | None = None,
    name: str | None = None,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield (chunk index within the shard, {column: array}) for the chunks of one shard, in stored order.

    `columns` restricts what is decoded (other members are skipped without decoding; local files are seeked
    over); `chunks` restricts which chunk indices are yielded; `shapes` (per-example shapes, e.g. from the
    manifest) zero-pads narrower chunks to the dataset maximum; `expected_chunks` checks the shard is complete.
    Local paths are read with random access; URLs (anything webdataset's `gopen` opens: http(s), pipe:, s3 via
    pipe:) are streamed. Any read or decode problem raises CorruptShardError naming the shard.
    """
    source = str(source)
    label = name or source
    wanted = None if columns is None else set(columns)
    if is_local(source) and not os.path.exists(_local_path(source)):
        raise CorruptShardError(label, "file not found")
    members = (_iter_members_local(_local_path(source), wanted, chunks) if is_local(source)
               else _iter_members_stream(source, wanted, chunks))
    chunk_set = None if chunks is None else set(chunks)
    seen = 0
    current_key, current_index, arrays = None, -1, {}

    def finish(index: int, key: str, arrays: dict[str, np.ndarray]):
        if chunk_set is not None and index not in chunk_set:
            return None
        if wanted is not None and (missing := wanted - arrays.keys()):
            raise CorruptShardError(label, f"chunk {key} lacks column(s) {sorted(missing)}")
        lengths = {len(a) for a in arrays.values()}
        if len(lengths) > 1:
            raise CorruptShardError(label, f"chunk {key}: columns have different lengths {sorted(lengths)}")
        if shapes:
            for col, array in arrays.items():
                if col in shapes and tuple(array.shape[1:]) != tuple(shapes[col]):
                    try:
                        arrays[col] = _pad_to(array, shapes[col])
                    except ValueError:
                        raise CorruptShardError(label, f"chunk {key} column {col}: shape {array.shape[1:]} "
                                                f"does not fit the manifest shape {list(shapes[col])}") from None
        return index, arrays

    try:
        for key, column, data in members:
            if key != current_key:
                if current_key is not None and (done := finish(current_index, current_key, arrays)):
                    yield done
                current_key, current_index, arrays = key, current_index + 1, {}
                seen = current_index + 1
            if column is not None:
                arrays[column] = decode_npy(data, f"{key}.{column}.npy")
        if current_key is not None and (done := finish(current_index, current_key, arrays)):
            yield done
    except CorruptShardError:
        raise
    except (tarfile.TarError, ValueError, EOFError, OSError, KeyError) as err:
        raise CorruptShardError(label, f"{type(err).__name__}: {err}") from None
    if expected_chunks is not None and seen < expected_chunks and (chunk_set is None or max(chunk_set) >= seen):
        raise CorruptShardError(label, f"found {seen} of {expected_chunks} chunks (truncated)")
