"""Small synthetic datasets for the data tests (tests/test_data_*.py): raw jet columns, shards, input files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hepml_dist.data.manifest import Manifest
from hepml_dist.data.writer import DatasetWriter

JETCLASS_LABELS = ["label_QCD", "label_Hbb", "label_Hcc", "label_Hgg", "label_H4q", "label_Hqql", "label_Zqq",
                   "label_Wqq", "label_Tbqq", "label_Tbl"]


def random_jets(n: int, width: int, rng: np.random.Generator, start: int = 0, classes: int = 3) -> dict:
    """Stored jet columns (docs/architecture.md) of `n` random jets padded to `width`; jet_index numbers them."""
    counts = rng.integers(1, width + 1, n).astype(np.int32)
    real = np.arange(width)[None, :] < counts[:, None]
    pt = rng.exponential(20.0, (n, width)) + 0.5
    eta = rng.normal(0.0, 0.3, (n, width))
    phi = rng.uniform(-np.pi, np.pi, (n, width))
    columns = {
        "part_px": pt * np.cos(phi), "part_py": pt * np.sin(phi), "part_pz": pt * np.sinh(eta),
        "part_energy": pt * np.cosh(eta) + rng.uniform(0, 0.1, (n, width)),
        "part_charge": rng.integers(-1, 2, (n, width)),
        "part_d0val": rng.normal(size=(n, width)), "part_d0err": rng.uniform(0, 2, (n, width)),
        "part_dzval": rng.normal(size=(n, width)), "part_dzerr": rng.uniform(0, 2, (n, width)),
    }
    out = {k: (v * real).astype(np.float32) for k, v in columns.items()}
    out["part_pid"] = (rng.choice([11, -13, 22, 211, -211, 130], (n, width)) * real).astype(np.int32)
    out["part_n"] = counts
    px, py, pz, e = (out[k].sum(axis=1) for k in ("part_px", "part_py", "part_pz", "part_energy"))
    out["jet_pt"] = np.hypot(px, py).astype(np.float32)
    out["jet_eta"] = np.arcsinh(pz / out["jet_pt"]).astype(np.float32)
    out["jet_phi"] = np.arctan2(py, px).astype(np.float32)
    out["jet_energy"] = e.astype(np.float32)
    out["jet_sdmass"] = rng.uniform(0, 300, n).astype(np.float32)
    out["jet_index"] = np.arange(start, start + n).astype(np.float32)
    out["label_jet_class"] = rng.integers(0, classes, n).astype(np.int64)
    return out


def write_jets(directory: Path, n: int, *, width: int = 16, chunk_size: int = 50, chunks_per_shard: int = 3,
               block: int = 230, seed: int = 0, splits=(0.7, 0.1, 0.2), **kwargs) -> Manifest:
    """A jet dataset of `n` examples written in uneven blocks (so shards and chunks come out uneven)."""
    rng = np.random.default_rng(seed)
    with DatasetWriter(directory, schema="test-jets", splits=splits, seed=seed, chunk_size=chunk_size,
                       chunks_per_shard=chunks_per_shard, **kwargs) as writer:
        done = 0
        while done < n:
            size = min(block, n - done)
            writer.add(random_jets(size, width, rng, start=done))
            done += size
    return writer.manifest
