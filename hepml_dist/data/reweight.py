"""Sophon/weaver-style flat 2D reweighting: weight tables per class group, computed once, applied by the loader.

`compute_weights` reads only the label and the two variables of every example (one pass, seeking over the other
columns), fills a 2D histogram per class group and per split, and turns them into weights with weaver's `flat`
method (hqucms/weaver-core 154db69, weaver/utils/data/preprocess.py, `reweight_method: flat`; used by
jet-universe/sophon 9dd6dd6, data/JetClassII/JetClassII_full.yaml):

1. per group g: H_g = counts in the (x, y) bins; under/overflow and classes in no group get weight 0;
2. thr = 0.01 x median of the non-empty bins; ref = the `threshold_percentile`-th percentile of the bins above
   thr; w_g = clip(ref / H_g, 0, 1), 0 for empty bins (flat in x and y down to the sparse-bin floor);
3. n_g = sum(H_g w_g) / group weight; w_g *= 0.9 min(n) / n_g, so each group's expected share of the sampled
   data is proportional to its `weight` and every weight stays <= 1 (a probability).

The table is stored with the dataset in `DIR/weights/reweight-<key>.json`, where the key hashes the reweight spec,
so a job finds exactly the table made for its settings. The loader looks weights up per example (vectorised).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hepml_dist.data.manifest import Manifest, read_manifest
from hepml_dist.data.reader import iter_shard_chunks
from hepml_dist.data.shards import ShardRef
from hepml_dist.errors import UserError
from hepml_dist.files import write_json
from hepml_dist.spec.data import ReweightSpec

WEIGHTS_DIR = "weights"


def reweight_key(spec: ReweightSpec) -> str:
    """A short hash of everything that changes the table (not `mode`, which only changes how it is applied)."""
    payload = spec.model_dump(mode="json", exclude={"mode"})
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]


def weights_path(dataset: str | Path, spec: ReweightSpec) -> Path:
    return Path(dataset) / WEIGHTS_DIR / f"reweight-{reweight_key(spec)}.json"


@dataclass
class WeightTable:
    """Per-group 2D weight tables and the lookup the loader applies to a batch of stored columns."""

    label: str
    variables: tuple[str, str]
    edges: tuple[np.ndarray, np.ndarray]
    group_of_label: np.ndarray  # label value -> group index, -1 for classes in no group
    tables: np.ndarray  # [groups, nx, ny]
    mean_weight: float  # mean weight over the examples of the split being streamed (0s included)

    @property
    def columns(self) -> list[str]:
        return [self.label, *self.variables]

    def weights(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        group, ix, iy, inside = bin_examples(arrays, self.label, self.variables, self.group_of_label, self.edges)
        out = np.zeros(len(group), dtype=np.float32)
        out[inside] = self.tables[group[inside], ix[inside], iy[inside]]
        return out


def bin_examples(arrays: Mapping[str, np.ndarray], label: str, variables: Sequence[str], group_of_label: np.ndarray,
                 edges: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(group, x bin, y bin, inside) per example; `inside` is False for no group and under/overflow."""
    labels = arrays[label].astype(np.int64)
    known = (labels >= 0) & (labels < len(group_of_label))
    group = np.where(known, group_of_label[np.clip(labels, 0, len(group_of_label) - 1)], -1)
    ix = np.searchsorted(edges[0], arrays[variables[0]], side="right") - 1
    iy = np.searchsorted(edges[1], arrays[variables[1]], side="right") - 1
    inside = (group >= 0) & (ix >= 0) & (ix < len(edges[0]) - 1) & (iy >= 0) & (iy < len(edges[1]) - 1)
    return group, ix, iy, inside


def _group_lookup(spec: ReweightSpec) -> np.ndarray:
    top = max(max(g.labels) for g in spec.groups)
    lookup = np.full(top + 1, -1, dtype=np.int64)
    for index, group in enumerate(spec.groups):
        for label in group.labels:
            if lookup[label] >= 0:
                raise UserError(f"data.reweight.groups: class {label} is in groups "
                                f"{spec.groups[lookup[label]].name!r} and {group.name!r}; a class may be in one group")
            lookup[label] = index
    return lookup


def _edges(spec: ReweightSpec) -> tuple[np.ndarray, np.ndarray]:
    edges = []
    for variable in spec.variables:
        if variable not in spec.bins:
            raise UserError(f"data.reweight.bins: no bin edges for {variable!r} (one of data.reweight.variables)")
        e = np.asarray(spec.bins[variable], dtype=np.float64)
        if len(e) < 2 or np.any(np.diff(e) <= 0):
            raise UserError(f"data.reweight.bins.{variable}: need at least two increasing edges")
        edges.append(e)
    return edges[0], edges[1]


def flat_tables(hists: np.ndarray, group_weights: Sequence[float], percentile: float) -> np.ndarray:
    """weaver's `flat` weights from per-group histograms [G, nx, ny] (see the module docstring)."""
    tables = np.zeros_like(hists, dtype=np.float64)
    for g, hist in enumerate(hists):
        filled = hist[hist > 0]
        if not len(filled):
            continue
        threshold = 0.01 * np.median(filled)
        reference = np.percentile(filled[filled > threshold], percentile)
        with np.errstate(divide="ignore"):
            tables[g] = np.where(hist > 0, np.clip(reference / hist, 0.0, 1.0), 0.0)
    yields = np.array([(h * t).sum() / w for h, t, w in zip(hists, tables, group_weights, strict=True)])
    populated = yields > 0
    if not populated.any():
        raise UserError("data.reweight: no example of any group falls inside the bins; check the label column, "
                        "the groups' class indices and the bin edges")
    scale = np.zeros_like(yields)
    scale[populated] = 0.9 * yields[populated].min() / yields[populated]
    return tables * scale[:, None, None]


def compute_weights(dataset: str | Path, spec: ReweightSpec, *, splits: Sequence[str] = ("train",),
                    progress: Any = None, plot: Callable[..., Any] | None = None) -> Path:
    """Fill the histograms in one pass over the dataset, store the table next to it, return its path. With `plot`
    (`hepml_dist.data.plot.plot_weighted_groups`; passed in so that the loader, which imports this module, never
    loads matplotlib), also `reweight-<key>.png` next to it: each group's weighted yield in the two variables."""
    root = Path(dataset)
    manifest = read_manifest(root)
    for column in (spec.label, *spec.variables):
        if column not in manifest.columns:
            raise UserError(f"data.reweight: the dataset {root} has no column {column!r} "
                            f"(it has {sorted(manifest.columns)})")
    for split in splits:
        if split not in manifest.splits:
            raise UserError(f"--splits: the dataset has no split {split!r}")
    lookup = _group_lookup(spec)
    edges = _edges(spec)
    nx, ny = len(edges[0]) - 1, len(edges[1]) - 1
    groups = len(spec.groups)
    counts: dict[str, np.ndarray] = {}
    totals: dict[str, int] = {}
    columns = [spec.label, *spec.variables]
    shards = [(split, s) for split, info in manifest.splits.items() for s in info.shards]
    task = progress.add_task("histograms", total=len(shards)) if progress is not None else None
    for split, shard in shards:
        hist = counts.setdefault(split, np.zeros(groups * nx * ny, dtype=np.int64))
        for _, arrays in iter_shard_chunks(root / shard.path, columns=columns, expected_chunks=len(shard.chunks),
                                           name=shard.path):
            group, ix, iy, inside = bin_examples(arrays, spec.label, spec.variables, lookup, edges)
            flat = (group[inside] * nx + ix[inside]) * ny + iy[inside]
            hist += np.bincount(flat, minlength=groups * nx * ny)
            totals[split] = totals.get(split, 0) + len(group)
        if task is not None:
            progress.advance(task)
    source = sum(counts[s] for s in splits).reshape(groups, nx, ny)
    tables = flat_tables(source.astype(np.float64), [g.weight for g in spec.groups], spec.threshold_percentile)
    mean_weight = {s: float((counts[s].reshape(groups, nx, ny) * tables).sum() / max(totals.get(s, 0), 1))
                   for s in counts}
    out = weights_path(root, spec)
    out.parent.mkdir(exist_ok=True)
    shares = _shares(source, tables, spec)
    if plot is not None:
        titles = [f"{g.name}: share {100 * shares[g.name]:.1f}% (weight {g.weight:g})" for g in spec.groups]
        plot(out.with_suffix(".png"), source * tables, edges, tuple(spec.variables), titles)
    write_json(out, {
        "key": reweight_key(spec),
        "spec": spec.model_dump(mode="json", exclude={"mode"}),
        "built_from": list(splits),
        "examples": totals,
        "mean_weight": mean_weight,
        "group_counts": {g.name: int(source[i].sum()) for i, g in enumerate(spec.groups)},
        "group_sampled_share": shares,
        "tables": {g.name: tables[i].round(8).tolist() for i, g in enumerate(spec.groups)},
    })
    return out


def _shares(hists: np.ndarray, tables: np.ndarray, spec: ReweightSpec) -> dict[str, float]:
    kept = (hists * tables).sum(axis=(1, 2))
    total = kept.sum()
    return {g.name: float(kept[i] / total) if total else 0.0 for i, g in enumerate(spec.groups)}


def load_weight_table(manifests: Sequence[Manifest], shards: Sequence[ShardRef], spec: ReweightSpec) -> WeightTable:
    """The stored table for `spec` of the (single) dataset the shards come from."""
    datasets = sorted({ref.dataset for ref in shards})
    if len(datasets) != 1 or manifests[datasets[0]].root is None:
        raise UserError("data.reweight: reweighting needs all shards of a split from one local dataset "
                        "(the weight table is stored with it)")
    manifest = manifests[datasets[0]]
    path = weights_path(manifest.root, spec)
    if not path.is_file():
        raise UserError(f"data.reweight: {manifest.root} has no weight table for these reweight settings "
                        f"({path.name}); run `hepml data weights {manifest.root} --job JOB.yaml` first")
    stored = json.loads(path.read_text())
    split_examples: dict[str, int] = {}
    for ref in shards:
        split = ref.info.path.split("/", 1)[0]
        split_examples[split] = split_examples.get(split, 0) + ref.info.examples
    total = sum(split_examples.values())
    means = stored["mean_weight"]
    missing = [s for s in split_examples if s not in means]
    if missing:
        raise UserError(f"{path}: no mean weight for split(s) {missing}; rerun `hepml data weights`")
    mean = sum(means[s] * n for s, n in split_examples.items()) / total
    if mean <= 0:
        raise UserError(f"{path}: every example of the streamed split has weight 0; check data.reweight")
    tables = np.asarray([stored["tables"][g.name] for g in spec.groups], dtype=np.float32)
    return WeightTable(spec.label, tuple(spec.variables), _edges(spec), _group_lookup(spec), tables, mean)
