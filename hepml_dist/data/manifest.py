"""The dataset manifest: what a sharded dataset holds, readable without opening a shard.

A dataset is a directory::

    DIR/manifest.json                 schema, splits, per-shard counts and checksums (see docs/data-format.md)
    DIR/train/shard-000000.tar        webdataset tar; each tar sample is one *chunk* of up to `chunk_size`
    DIR/val/...                       examples and each column is one `.npy` member of that sample
    DIR/test/...

`writer.py` writes datasets (DatasetWriter), `reader.py` reads shards back (iter_shard_chunks); this module is the
manifest both agree on, and the error a shard that disagrees with it raises.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hepml_dist import __version__, files
from hepml_dist.errors import UserError

FORMAT_NAME = "hepml-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SPLITS: tuple[str, ...] = ("train", "val", "test")
SHARD_NAME = "shard-{:06d}.tar"




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

    @property
    def key(self) -> str | None:
        """`<split>_<shard>`, how every chunk key in this shard's tar starts (docs/data-format.md), if the shard has
        the standard name."""
        found = re.fullmatch(r"([A-Za-z0-9]+)/shard-([0-9]+)\.tar", self.path)
        return f"{found.group(1)}_{found.group(2)}" if found else None

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "examples": self.examples, "chunks": self.chunks, "sha256": self.sha256,
                "bytes": self.bytes}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ShardInfo:
        path = str(d["path"])
        if Path(path).is_absolute() or ".." in Path(path).parts or len(Path(path).parts) != 2:
            raise ValueError(f"path {path!r}: must be <split>/<shard>.tar inside the dataset")
        chunks = [int(n) for n in d["chunks"]]
        if not chunks or min(chunks) < 1:
            raise ValueError(f"chunks {chunks}: every chunk holds at least one example")
        if "examples" in d and int(d["examples"]) != sum(chunks):
            raise ValueError(f"examples {d['examples']} is not the sum of chunks {chunks} ({sum(chunks)})")
        return cls(path=path, chunks=chunks, sha256=str(d["sha256"]), bytes=int(d["bytes"]))


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
        dtype = str(d["dtype"])
        try:
            numeric = np.dtype(dtype).kind in "biuf"
        except (TypeError, ValueError):
            numeric = False
        if not numeric:
            raise ValueError(f"dtype {dtype!r} is not a numeric numpy dtype")
        return cls(dtype=dtype, shape=[int(n) for n in d["shape"]], padded=bool(d.get("padded", False)))


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
        shards = [_field(f"shards[{i}]", ShardInfo.from_dict, s) for i, s in enumerate(d.get("shards", []))]
        if "examples" in d and int(d["examples"]) != sum(s.examples for s in shards):
            raise ValueError(f"examples {d['examples']} is not the sum over its shards "
                             f"({sum(s.examples for s in shards)})")
        return cls(shards=shards, class_counts=counts)


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
        if not isinstance(d, Mapping):
            raise ValueError(f"a manifest is a JSON object, not {type(d).__name__}")
        if d.get("format") != FORMAT_NAME:
            raise ValueError(f"not a {FORMAT_NAME} manifest (format = {d.get('format')!r})")
        if int(d.get("format_version", 0)) > FORMAT_VERSION:
            raise ValueError(f"format_version {d['format_version']} is newer than this hepml_dist understands "
                             f"({FORMAT_VERSION}); upgrade hepml_dist")
        return cls(
            schema=str(d["schema"]),
            columns={name: _field(f"columns.{name}", ColumnInfo.from_dict, c) for name, c in d["columns"].items()},
            splits={name: _field(f"splits.{name}", SplitInfo.from_dict, s) for name, s in d["splits"].items()},
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


def _field(where: str, parse, value):
    """parse(value); any problem is re-raised as a ValueError naming the manifest field (`splits.train: ...`)."""
    try:
        return parse(value)
    except KeyError as err:
        raise ValueError(f"{where}: missing key {err}") from None
    except (ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{where}: {err}") from None


def read_manifest(path: str | os.PathLike) -> Manifest:
    """Read `DIR/manifest.json` (or the manifest file itself); a clear UserError if missing or malformed."""
    path = Path(path)
    file = path / MANIFEST_NAME if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"{file}: no dataset manifest here; point at a directory written by `hepml data convert` "
                        "(or `hepml data generate`)")
    try:
        return Manifest.from_dict(json.loads(file.read_text()), root=file.parent)
    except KeyError as err:
        problem = f"missing key {err}"
    except json.JSONDecodeError as err:
        problem = f"not valid JSON ({err})"
    except (ValueError, TypeError, AttributeError) as err:  # UnicodeDecodeError is a ValueError
        problem = str(err)
    raise UserError(f"{file}: malformed manifest: {problem}. It is written by `hepml data convert` (and "
                    "`generate`, `tokenize`): restore the original or write the dataset again")

def write_manifest(manifest: Manifest, directory: str | os.PathLike) -> None:
    """Write `DIR/manifest.json` atomically: readers never see half a manifest."""
    files.write_json(Path(directory) / MANIFEST_NAME, manifest.to_dict())


def file_sha256(path: str | os.PathLike, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(block):
            digest.update(data)
    return digest.hexdigest()
