"""Checking and summarising datasets: `hepml data verify` (checksums, counts) and `hepml data inspect`."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hepml_dist.data.manifest import CorruptShardError, Manifest, read_manifest
from hepml_dist.data.reader import iter_shard_chunks


@dataclass
class ShardProblem:
    shard: str
    problem: str


def verify_dataset(directory: str | os.PathLike, *, decode: bool = True,
                   on_bytes: Callable[[int], None] | None = None) -> tuple[Manifest, list[ShardProblem]]:
    """Check every shard against the manifest: present, size, sha256, and (decode=True) chunk/example counts."""
    manifest = read_manifest(directory)
    root = Path(directory)
    problems: list[ShardProblem] = []
    for split, info in manifest.splits.items():
        on_disk = {p.name for p in (root / split).glob("shard-*.tar")} if (root / split).is_dir() else set()
        listed = {Path(s.path).name for s in info.shards}
        for extra in sorted(on_disk - listed):
            problems.append(ShardProblem(f"{split}/{extra}", "not listed in manifest.json (left from another run?)"))
        for shard in info.shards:
            path = root / shard.path
            if not path.is_file():
                problems.append(ShardProblem(shard.path, "missing"))
                continue
            size = path.stat().st_size
            if size != shard.bytes:
                problems.append(ShardProblem(shard.path, f"{size} bytes, manifest says {shard.bytes} (truncated?)"))
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                while block := f.read(1 << 22):
                    digest.update(block)
                    if on_bytes:
                        on_bytes(len(block))
            if digest.hexdigest() != shard.sha256:
                problems.append(ShardProblem(shard.path, "sha256 differs from the manifest (corrupt or rewritten)"))
                continue
            if decode:
                shapes = {name: column.shape for name, column in manifest.columns.items()}
                problems += _check_counts(path, shard.path, shard.chunks, shapes)
    return manifest, problems


def _check_counts(path: Path, name: str, chunks: list[int], shapes: dict[str, list[int]]) -> list[ShardProblem]:
    counts = []
    try:
        for _, arrays in iter_shard_chunks(path, shapes=shapes, expected_chunks=len(chunks), name=name):
            counts.append(len(next(iter(arrays.values()))) if arrays else 0)
    except CorruptShardError as err:
        return [ShardProblem(name, err.reason)]
    if counts != chunks:
        return [ShardProblem(name, f"examples per chunk {counts} differ from the manifest {chunks}")]
    return []


def _count_column(name: str, columns) -> str | None:
    prefix = name.split("_", 1)[0]
    candidate = f"{prefix}_n"
    return candidate if candidate in columns and candidate != name else None


def column_ranges(directory: str | os.PathLike, *, split: str = "train", max_shards: int = 2
                  ) -> dict[str, tuple[float, float, float, int]]:
    """(min, mean, max, real values) per column over the first shards of a split; padding slots excluded."""
    manifest = read_manifest(directory)
    root = Path(directory)
    shapes = {k: c.shape for k, c in manifest.columns.items()}
    stats: dict[str, list[float]] = {}
    for shard in manifest.splits[split].shards[:max_shards]:
        for _, arrays in iter_shard_chunks(root / shard.path, shapes=shapes, name=shard.path):
            for name, values in arrays.items():
                values = values.astype(np.float64)
                count = _count_column(name, arrays)
                if count is not None and values.ndim >= 2:
                    real = np.arange(values.shape[1])[None, :] < arrays[count][:, None]
                    values = values[real]
                values = values.ravel()
                if not values.size:
                    continue
                lo, total, hi, n = stats.get(name, [np.inf, 0.0, -np.inf, 0])
                stats[name] = [min(lo, values.min()), total + values.sum(), max(hi, values.max()), n + values.size]
    return {k: (v[0], v[1] / v[3], v[2], int(v[3])) for k, v in stats.items() if v[3]}
