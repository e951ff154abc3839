"""`hepml data plot`: one PNG per stored feature and label, one normalised curve per class.

Works on any dataset of our format (generated or converted). Padded columns are histogrammed over their real
entries only (the `*_n` count column decides); per-element columns (MLPF) are split by the per-element class,
per-example columns by the example's class (the first label the generator lists, else the first `label_*`).
Jet datasets (`part_*` columns) also get `derived_*` plots of what the detector changes: charged and neutral
constituents per jet, the jet's neutral energy fraction, and the impact-parameter significances d0/sigma and
dz/sigma of its charged constituents; titles name the generator's detector when the manifest records one.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import matplotlib.ticker
import mplhep
import numpy as np

from hepml_dist.data.manifest import read_manifest
from hepml_dist.data.reader import iter_shard_chunks
from hepml_dist.errors import UserError
from hepml_dist.files import replacing

MLPF_FEATURES = {
    1: ["type", "pt", "eta", "sin_phi", "cos_phi", "p", "chi2", "ndf", "dEdx", "dEdx_error", "inner_radius",
        "tan_lambda", "d0", "omega", "z0", "time", "pad"],
    2: ["type", "et", "eta", "sin_phi", "cos_phi", "energy", "x", "y", "z", "theta", "energy_ecal", "energy_hcal",
        "energy_other", "hits", "sigma_x", "sigma_y", "sigma_z"],
}
AOT_FEATURES = ["energy", "pt", "eta", "phi", "mass", "btag"]


def read_examples(dataset: Path, split: str, max_examples: int) -> tuple[dict[str, np.ndarray], object]:
    """Up to `max_examples` examples of one split, all columns, padded to the manifest shapes."""
    manifest = read_manifest(dataset)
    if split not in manifest.splits or not manifest.splits[split].shards:
        raise UserError(f"{dataset}: split {split!r} has no shards; choose one of "
                        f"{[s for s, i in manifest.splits.items() if i.shards]}")
    shapes = {name: c.shape for name, c in manifest.columns.items()}
    blocks: list[dict[str, np.ndarray]] = []
    total = 0
    for shard in manifest.splits[split].shards:
        for _, arrays in iter_shard_chunks(Path(dataset) / shard.path, shapes=shapes,
                                           expected_chunks=len(shard.chunks), name=shard.path):
            blocks.append(arrays)
            total += len(next(iter(arrays.values())))
            if total >= max_examples:
                break
        if total >= max_examples:
            break
    columns = {name: np.concatenate([b[name] for b in blocks])[:max_examples] for name in blocks[0]}
    return columns, manifest


def _count_column(name: str, width: int, columns: dict[str, np.ndarray]) -> str | None:
    """The `*_n` column giving the real length of a padded column (same prefix, else the only one that fits)."""
    prefix = name.split("_")[0]
    if f"{prefix}_n" in columns:
        return f"{prefix}_n"
    fits = [c for c in columns if c.endswith("_n") and columns[c].ndim == 1 and c != name
            and any(v.ndim >= 2 and v.shape[1] == width and k.startswith(c[:-2]) for k, v in columns.items())]
    return fits[0] if len(fits) == 1 else None


def _binning(values: np.ndarray) -> np.ndarray:
    if len(values) and np.all(values == np.round(values)) and np.ptp(values) <= 60:
        return np.arange(values.min() - 0.5, values.max() + 1.5)
    low, high = np.percentile(values, [1, 99]) if len(values) else (0.0, 1.0)
    if high <= low:
        low, high = low - 0.5, high + 0.5
    return np.linspace(low, high, 51)


def _plot(path: Path, title: str, groups: dict[str, np.ndarray]) -> Path:
    matplotlib.use("Agg")

    values = [v for v in groups.values() if len(v)]
    bins = _binning(np.concatenate(values)) if values else np.linspace(0, 1, 2)
    with plt.style.context(mplhep.style.CMS):
        fig, ax = plt.subplots(figsize=(8, 6))
        heights = []
        for label, v in groups.items():
            if not len(v):
                continue
            counts, _ = np.histogram(np.clip(v, bins[0], bins[-1]), bins=bins)
            counts = counts / max(counts.sum(), 1)
            heights.append(counts[counts > 0])
            mplhep.histplot(counts, bins, ax=ax, label=f"{label} ({len(v)})", flow=None)
        positive = np.concatenate(heights) if heights else np.array([1.0])
        if positive.max() / positive.min() > 1e3:
            ax.set_yscale("log")
        ax.set_xlabel(title)
        ax.set_ylabel("fraction of entries")
        ax.legend(fontsize="x-small", loc="best")
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        plt.close(fig)
    return path


def _class_names(manifest, label: str, values: np.ndarray) -> dict[int, str]:
    names = manifest.meta.get("generator", {}).get("classes", {}).get(label, [])
    return {int(v): (names[int(v)] if 0 <= int(v) < len(names) else f"{label}={int(v)}") for v in np.unique(values)}


def _grouped(values: np.ndarray, classes: np.ndarray | None, names: dict[int, str]) -> dict[str, np.ndarray]:
    if classes is None:
        return {"all": values}
    groups = {names[c]: values[classes == c] for c in sorted(names)}
    # a class whose values are all 0 only carries the filler of an undefined quantity (tau targets of quark jets)
    kept = {k: v for k, v in groups.items() if np.any(v != 0)}
    return kept or groups


def derived_jet_quantities(columns: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Name -> (values, entries) of a jet dataset (empty if it is not one): per-jet values [N] with entries None, or
    per-constituent values [N, P] with the mask [N, P] of the charged constituents they are defined on."""
    needed = ("part_n", "part_charge", "part_energy", "part_d0val", "part_d0err", "part_dzval", "part_dzerr")
    if not all(c in columns for c in needed):
        return {}
    real = np.arange(columns["part_charge"].shape[1])[None, :] < columns["part_n"][:, None]
    charged = real & (columns["part_charge"] != 0)
    neutral = real & (columns["part_charge"] == 0)
    energy = np.where(real, columns["part_energy"], 0.0)
    fraction = np.where(neutral, energy, 0.0).sum(axis=1) / np.maximum(energy.sum(axis=1), 1e-9)

    def significance(value: str, error: str) -> np.ndarray:
        # clipped to +-20 so the core stays readable; lifetime-signed on the realistic detector
        return np.clip(columns[value] / np.where(charged, np.maximum(columns[error], 1e-9), 1.0), -20, 20)

    return {
        "derived_n_charged": (charged.sum(axis=1), None),
        "derived_n_neutral": (neutral.sum(axis=1), None),
        "derived_neutral_energy_fraction": (fraction, None),
        "derived_d0_significance": (significance("part_d0val", "part_d0err"), charged),
        "derived_dz_significance": (significance("part_dzval", "part_dzerr"), charged),
    }


def _detector_note(manifest) -> str:
    detector = (manifest.meta.get("generator", {}).get("options") or {}).get("detector")
    return f" ({detector} detector)" if detector else ""


def plot_dataset(dataset: str | Path, out: str | Path, *, split: str = "train", max_examples: int = 200_000,
                 ) -> list[Path]:
    """Write the PNG files; returns their paths."""
    dataset, out = Path(dataset), Path(out)
    columns, manifest = read_examples(dataset, split, max_examples)
    out.mkdir(parents=True, exist_ok=True)
    n = len(next(iter(columns.values())))
    labels = [c for c in manifest.meta.get("generator", {}).get("classes", {}) if c in columns]
    labels += [c for c in columns if c.startswith("label_") and c not in labels]
    example_label = next((c for c in labels if columns[c].ndim == 1), None)
    element_label = next((c for c in labels if columns[c].ndim == 2), None)
    files = []

    for name, array in columns.items():
        count = _count_column(name, array.shape[1], columns) if array.ndim >= 2 else None
        mask = (np.arange(array.shape[1])[None, :] < columns[count][:, None]) if count else None
        if array.ndim >= 2 and mask is None:
            mask = np.ones(array.shape[:2], dtype=bool)
        if array.ndim == 2 and element_label and columns[element_label].shape == array.shape:
            classes, label = columns[element_label][mask], element_label
        elif example_label:
            label = example_label
            classes = columns[label] if array.ndim == 1 else np.broadcast_to(
                columns[label][:, None], array.shape[:2])[mask]
        else:
            classes, label = None, None
        names = _class_names(manifest, label, classes) if label else {}

        if array.ndim == 1:
            files.append(_plot(out / f"{name}.png", name, _grouped(array, classes, names)))
        elif array.ndim == 2:
            files.append(_plot(out / f"{name}.png", name, _grouped(array[mask], classes, names)))
        elif name == "elem_features":
            element = array[mask]
            element_classes = columns[element_label][mask] if element_label else None
            element_names = _class_names(manifest, element_label, element_classes) if element_label else {}
            for kind, features in MLPF_FEATURES.items():
                of_kind = element[:, 0] == kind
                for i, feature in enumerate(features[1:], start=1):
                    files.append(_plot(out / f"elem_{'track' if kind == 1 else 'cluster'}_{feature}.png",
                                       f"{'track' if kind == 1 else 'cluster'} {feature}",
                                       _grouped(element[of_kind, i], None if element_classes is None
                                                else element_classes[of_kind], element_names)))
        elif array.ndim == 3:
            features = AOT_FEATURES if array.shape[2] == len(AOT_FEATURES) else [str(i) for i in
                                                                                 range(array.shape[2])]
            for i, feature in enumerate(features):
                files.append(_plot(out / f"{name}_{feature}.png", f"{name} {feature}",
                                   _grouped(array[mask][:, i], classes, names)))
    if n == 0:
        raise UserError(f"{dataset}: split {split} is empty")
    note = _detector_note(manifest)
    for name, (values, entries) in derived_jet_quantities(columns).items():
        classes = columns[example_label] if example_label else None
        if entries is not None:
            values = values[entries]
            classes = None if classes is None else np.broadcast_to(classes[:, None], entries.shape)[entries]
        names = _class_names(manifest, example_label, classes) if example_label else {}
        files.append(_plot(out / f"{name}.png", name.removeprefix("derived_") + note, _grouped(values, classes, names)))
    return files


def plot_weighted_groups(path: str | Path, weighted: np.ndarray, edges: tuple[np.ndarray, np.ndarray],
                         variables: tuple[str, str], titles: list[str]) -> Path:
    """One panel per group: its weighted yield [nx, ny] in the two reweighting variables (`hepml data weights`);
    flat where the reweighting worked, empty where the group has no examples."""
    matplotlib.use("Agg")
    columns = min(len(titles), 5)
    rows = -(-len(titles) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.4 * rows), squeeze=False)
    for ax, table, title in zip(axes.flat, weighted, titles):
        shown = np.ma.masked_equal(table.T, 0.0)
        mesh = ax.pcolormesh(edges[0], edges[1], shown, cmap="viridis", vmin=0.0)
        if edges[0][0] > 0 and edges[0][-1] / edges[0][0] > 5:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # 2x10^2, 3x10^2, ... would overlap
        fig.colorbar(mesh, ax=ax, pad=0.01)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(variables[0], fontsize=8)
        ax.set_ylabel(variables[1], fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(titles):]:
        ax.axis("off")
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=60, format="png")
    plt.close(fig)
    return Path(path)
