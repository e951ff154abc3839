"""MLPF particle-level evaluation: per-class efficiency, fake rate and pT / energy response of the particles that
MLPF (or the rule-based particle flow) gives each input element, against the element's target particle.

Matching is particleflow's element-to-particle correspondence (`mlpf/plotting/plot_utils.py`: every element carries
at most one target and at most one predicted particle, so the pair is the element itself; no Delta R search):
- efficiency of class c (particleflow's definition): of the elements whose target is a particle of class c, the
  share whose prediction is a particle of the same class c; `efficiency_any`: ... a particle of any class (the
  particle was reconstructed, perhaps misidentified);
- fake rate of class c: of the elements predicted as a particle of class c, the share whose target has no particle
  (`misid_rate`: the share whose target is a particle of another class);
- pT and energy response of class c: predicted / target value on the elements whose target is of class c and whose
  prediction is a particle of any class; median and IQR / median (IQR = q75 - q25), overall and in bins of target pT.
Efficiencies are binned in target pT, fake and misidentification rates in predicted pT (PARTICLE_PT_BINS, GeV).

Input is a flat table over the real elements of all events (`element_table`): the target's and each collection's
`cls` (0 = no particle), `pt` and `energy`.
"""

from __future__ import annotations

import math

import numpy as np

PARTICLE_PT_BINS = [0.1, 0.5, 1, 2, 5, 10, 20, 50, 100, 400]
COLUMNS = ("cls", "pt", "energy")


def response_summary(ratio: np.ndarray) -> dict[str, float]:
    """Median, IQR (q75 - q25), IQR / median and count of a response distribution (NaN when empty)."""
    if len(ratio) == 0:
        return {"median": math.nan, "iqr": math.nan, "iqr_over_median": math.nan, "count": 0}
    q25, median, q75 = np.percentile(ratio, [25, 50, 75])
    iqr = float(q75 - q25)
    return {"median": float(median), "iqr": iqr, "iqr_over_median": iqr / median if median else math.nan, "count": len(ratio)}


def binned_response(reference: np.ndarray, reco: np.ndarray, edges: list[float]) -> dict[str, list]:
    """Median, IQR and IQR/median of reco/reference in bins of the reference value."""
    ratio = reco / reference
    which = np.digitize(reference, edges) - 1
    rows = [response_summary(ratio[which == i]) for i in range(len(edges) - 1)]
    return {"edges": list(edges), **{key: [row[key] for row in rows] for key in rows[0]}}


def element_table(real: np.ndarray, target: dict[str, np.ndarray], **collections: dict[str, np.ndarray]) -> dict:
    """Flatten padded [N, E] columns over the real elements: `target_<col>` and `<collection>_<col>` for `cls`,
    `pt`, `energy` (a collection's pt / energy are ignored where its cls is 0)."""
    out = {f"target_{c}": np.asarray(target[c])[real] for c in COLUMNS}
    for name, columns in collections.items():
        out |= {f"{name}_{c}": np.asarray(columns[c])[real] for c in COLUMNS}
    out = {k: v.astype(np.int64) if k.endswith("_cls") else v.astype(np.float64) for k, v in out.items()}
    return out


def binned_rate(value: np.ndarray, passed: np.ndarray, edges: list[float]) -> dict[str, list]:
    """Share of `passed` in bins of `value`, with its binomial error sqrt(r (1 - r) / n) (NaN for empty bins)."""
    which = np.digitize(value, edges) - 1
    total = np.array([(which == i).sum() for i in range(len(edges) - 1)])
    hits = np.array([(passed & (which == i)).sum() for i in range(len(edges) - 1)])
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(total > 0, hits / np.maximum(total, 1), np.nan)
        error = np.where(total > 0, np.sqrt(rate * (1 - rate) / np.maximum(total, 1)), np.nan)
    return {"edges": list(edges), "value": rate.tolist(), "error": error.tolist(), "count": total.tolist()}


def _share(passed: np.ndarray, total: np.ndarray) -> float:
    n = int(total.sum())
    return float((passed & total).sum() / n) if n else math.nan


def class_performance(table: dict[str, np.ndarray], collection: str, cls: int,
                      edges: list[float] = PARTICLE_PT_BINS) -> dict:
    """Efficiency, fake rate and response of class `cls` for one collection of `element_table`."""
    target_cls, pred_cls = table["target_cls"], table[f"{collection}_cls"]
    true, predicted = target_cls == cls, pred_cls == cls
    found_same, found_any = true & predicted, true & (pred_cls != 0)
    fake, misid = predicted & (target_cls == 0), predicted & (target_cls != 0) & (target_cls != cls)
    target_pt, pred_pt = table["target_pt"], table[f"{collection}_pt"]
    with np.errstate(divide="ignore", invalid="ignore"):
        pt_ratio = pred_pt[found_any] / target_pt[found_any]
        energy_ratio = table[f"{collection}_energy"][found_any] / table["target_energy"][found_any]
    return {
        "targets": int(true.sum()),
        "predicted": int(predicted.sum()),
        "efficiency": _share(found_same, true),
        "efficiency_any": _share(found_any, true),
        "fake_rate": _share(fake, predicted),
        "misid_rate": _share(misid, predicted),
        "efficiency_vs_pt": binned_rate(target_pt[true], found_same[true], edges),
        "efficiency_any_vs_pt": binned_rate(target_pt[true], found_any[true], edges),
        "fake_rate_vs_pt": binned_rate(pred_pt[predicted], fake[predicted], edges),
        "pt_response": response_summary(pt_ratio[np.isfinite(pt_ratio)]),
        "energy_response": response_summary(energy_ratio[np.isfinite(energy_ratio)]),
        "pt_response_vs_pt": binned_response(target_pt[found_any], pred_pt[found_any], edges),
    }


def particle_performance(table: dict[str, np.ndarray], class_names: list[str],
                         collections: tuple[str, ...] = ("mlpf", "baseline")) -> dict[str, dict[str, dict]]:
    """{collection: {class name: class_performance}} for every particle class (class 0, `none`, left out)."""
    return {collection: {class_names[c]: class_performance(table, collection, c) for c in range(1, len(class_names))}
            for collection in collections if f"{collection}_cls" in table}


PARTICLE_SUMMARY = {"efficiency": ("efficiency",), "fake_rate": ("fake_rate",),
                    "pt_response_median": ("pt_response", "median"), "pt_resolution": ("pt_response", "iqr_over_median"),
                    "energy_resolution": ("energy_response", "iqr_over_median")}
"""Flat metric name suffix -> path in a class's entry of `particle_performance`."""


def particle_summary(performance: dict[str, dict[str, dict]], prefix: str) -> dict[str, float]:
    """Flat numbers `<prefix><class>_<stat>` (MLPF) and `<prefix><class>_<stat>_baseline` (rule-based PF)."""
    out = {}
    for collection, classes in performance.items():
        suffix = "" if collection == "mlpf" else f"_{collection}"
        for name, entry in classes.items():
            for stat, path in PARTICLE_SUMMARY.items():
                value = entry
                for key in path:
                    value = value[key]
                out[f"{prefix}{name}_{stat}{suffix}"] = float(value)
    return out
