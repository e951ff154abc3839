"""Expected discovery significance of an event classifier (AOT): the analyst's figure of merit.

Events carry `gen_xsec_weight` = sigma x BR (fb) / generated events of their sample (`hepml data generate
events-met`), so the weights of all stored events of a dataset sum to the expected selected events per fb^-1.
An evaluated split holds only part of those events: each event's expected yield at a luminosity L is

    gen_xsec_weight x L x (stored events of its process in the whole dataset) / (evaluated events of that process)

(`yield_scales`), which also stays right when `hepml evaluate --max-batches` reads only part of the split. The
scale is per process (`label_process`), from the class counts of the dataset's manifest.

For every cut on the classifier's discriminant, s and b are the expected signal and background yields passing
it, and Z = sqrt(2 ((s + b) ln(1 + s/b) - s)) (the Asimov significance; s / sqrt(b) when s << b). Its uncertainty
propagates the statistical errors of the weighted sums (variance = sum of yield^2 of the passing events). The
best cut maximises Z among cuts that keep at least `MIN_BACKGROUND_EXAMPLES` background events: with fewer, the
scan would chase single, heavily weighted events. The best cut is chosen on the same events it is quoted on, so
Z is slightly optimistic on a small split.

Per background process: the rejection (1 / passing fraction of its expected yield) at the best cut and at 50 %
signal efficiency, with Clopper-Pearson intervals (`metrics.weighted_efficiency`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from hepml_dist.data.manifest import Manifest
from hepml_dist.data.shards import ShardResolver
from hepml_dist.errors import UserError
from hepml_dist.evaluate.metrics import (
    Rejection,
    effective_count,
    log_probabilities,
    log_ratio,
    rejection,
    weighted_efficiency,
)

XSEC_COLUMN = "gen_xsec_weight"
PROCESS_COLUMN = "label_process"
NEEDED_COLUMNS = (XSEC_COLUMN, PROCESS_COLUMN)
"""Stored columns the significance needs, besides the classifier's label."""
FAMILIES = ("aot",)
"""Model families evaluated as event classifiers for a search (significance, per-process rejection)."""
MIN_BACKGROUND_EXAMPLES = 10
"""Fewest background events a cut must keep to be a candidate for the best cut."""
FIXED_SIGNAL_EFFICIENCY = 0.5
"""Signal efficiency at which the per-process rejection is also quoted."""
_SERIES_BELOW = 1e-4  # s/b below which (1 + x) ln(1 + x) - x is summed as a series (the difference cancels)


# ----------------------------------------------------------------------------------------------------------------------
# The formula


def _excess(x: np.ndarray) -> np.ndarray:
    """(1 + x) ln(1 + x) - x, accurate also for tiny x (= x^2/2 - x^3/6 + x^4/12 - ...)."""
    x = np.asarray(x, dtype=np.float64)
    small = np.abs(x) < _SERIES_BELOW
    exact = (1 + x) * np.log1p(np.where(small, 0.0, x)) - x
    return np.where(small, x * x / 2 - x ** 3 / 6 + x ** 4 / 12, exact)


def asimov_significance(s, b) -> np.ndarray:
    """Z = sqrt(2 ((s + b) ln(1 + s/b) - s)) for expected signal s >= 0 and background b; 0 where s = 0,
    infinite where b = 0 < s."""
    s, b = np.asarray(s, dtype=np.float64), np.asarray(b, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.sqrt(np.maximum(2 * b * _excess(s / b), 0.0))
    z = np.where(b > 0, z, np.where(s > 0, np.inf, 0.0))
    return np.where(s > 0, z, 0.0)[()]


def significance_error(s, b, s_var, b_var) -> np.ndarray:
    """Standard error of Z from the variances of s and b (independent sums of weights):
    dZ/ds = ln(1 + s/b) / Z, dZ/db = (ln(1 + s/b) - s/b) / Z. NaN where Z is 0 or infinite."""
    s, b = np.asarray(s, dtype=np.float64), np.asarray(b, dtype=np.float64)
    z = asimov_significance(s, b)
    with np.errstate(divide="ignore", invalid="ignore"):
        x = s / b
        log = np.log1p(x)
        # ln(1 + x) - x, by its series where x is tiny (the difference cancels)
        log_minus_x = np.where(np.abs(x) < _SERIES_BELOW, -x * x / 2 + x ** 3 / 3, log - x)
        err = np.sqrt(log ** 2 * np.asarray(s_var) + log_minus_x ** 2 * np.asarray(b_var)) / z
    return np.where((z > 0) & np.isfinite(z), err, np.nan)[()]


# ----------------------------------------------------------------------------------------------------------------------
# From the evaluated events to expected yields


def applies(spec) -> bool:
    return spec.model.family in FAMILIES and signal_task(spec) is not None


def signal_task(spec):
    """The signal-vs-background task: the first binary task over all events."""
    return next((t for t in spec.tasks if t.kind == "binary" and t.only_where is None), None)


def split_manifests(patterns: str | Sequence[str]) -> list[Manifest]:
    """The manifests of the datasets that a split's shard patterns read."""
    resolver = ShardResolver()
    resolver.resolve(patterns)
    return resolver.manifests


def check_columns(spec, split: str, what: str = "report") -> None:
    """UserError naming the family and the columns when the split's data lack what the significance needs."""
    if not applies(spec):
        return
    patterns = getattr(spec.data, split)
    for manifest in split_manifests(patterns):
        missing = [c for c in NEEDED_COLUMNS if c not in manifest.columns]
        if missing:
            raise UserError(
                f"{what}: the {spec.model.family} family's evaluation (expected significance) needs the stored "
                f"column(s) {missing}, which the data of data.{split} ({manifest.root}) lack; use a dataset with "
                "cross-section weights and process labels, e.g. `hepml data generate events-met`")


def stored_per_process(manifests: Sequence[Manifest]) -> dict[int, int]:
    """Stored events of each process (label_process value) over all splits of the datasets."""
    totals: dict[int, int] = {}
    for manifest in manifests:
        for split in manifest.splits.values():
            for value, count in split.class_counts.get(PROCESS_COLUMN, {}).items():
                totals[int(value)] = totals.get(int(value), 0) + int(count)
    return totals


def yield_scales(stored: dict[int, int], process: np.ndarray) -> np.ndarray:
    """Per evaluated event: (stored events of its process) / (evaluated events of its process), the factor that
    turns the xsec weights of the evaluated events into the expected yields of the whole dataset."""
    process = np.asarray(process, dtype=np.int64)
    values, counts = np.unique(process, return_counts=True)
    scale = {}
    for value, count in zip(values.tolist(), counts.tolist()):
        if value not in stored:
            raise UserError(f"{PROCESS_COLUMN} = {value} occurs in the evaluated events but not in the class counts "
                            "of the dataset's manifest; regenerate the manifest (`hepml data verify`)")
        scale[value] = stored[value] / count
    return np.array([scale[v] for v in process.tolist()], dtype=np.float64)


def process_names(manifests: Sequence[Manifest], count: int) -> list[str]:
    meta = manifests[0].meta if manifests else {}
    # `hepml data generate` records the class names under meta.generator.classes
    classes = meta.get("classes") or (meta.get("generator") or {}).get("classes") or {}
    names = classes.get(PROCESS_COLUMN)
    return list(names) if names and len(names) >= count else [f"process_{i}" for i in range(count)]


# ----------------------------------------------------------------------------------------------------------------------
# The scan over cuts


@dataclass(frozen=True)
class Scan:
    """Z for each cut `score >= cut` (cuts descending), with s, b and their variances, and the best cut's index."""

    cuts: np.ndarray
    s: np.ndarray
    b: np.ndarray
    s_var: np.ndarray
    b_var: np.ndarray
    background_examples: np.ndarray
    z: np.ndarray
    z_err: np.ndarray
    best: int
    total_signal: float

    @property
    def signal_efficiency(self) -> np.ndarray:
        return self.s / self.total_signal if self.total_signal > 0 else np.full_like(self.s, np.nan)


def significance_scan(scores: np.ndarray, signal: np.ndarray, yields: np.ndarray,
                      min_background: int = MIN_BACKGROUND_EXAMPLES) -> Scan:
    """Z at every distinct cut on `scores` (events with score >= cut pass), for expected yields `yields`."""
    scores = np.asarray(scores, dtype=np.float64)
    signal = np.asarray(signal, dtype=bool)
    w = np.asarray(yields, dtype=np.float64)
    order = np.argsort(-scores, kind="stable")
    scores, signal, w = scores[order], signal[order], w[order]
    # a cut between tied scores is no cut: keep the last event of each run of equal scores
    last = np.r_[scores[1:] != scores[:-1], True]
    s, b = np.cumsum(np.where(signal, w, 0.0))[last], np.cumsum(np.where(signal, 0.0, w))[last]
    s_var, b_var = np.cumsum(np.where(signal, w * w, 0.0))[last], np.cumsum(np.where(signal, 0.0, w * w))[last]
    n_background = np.cumsum(~signal)[last]
    z, z_err = asimov_significance(s, b), significance_error(s, b, s_var, b_var)
    candidates = np.flatnonzero(n_background >= min(min_background, max(int((~signal).sum()), 1)))
    best = int(candidates[np.argmax(z[candidates])]) if len(candidates) else int(len(z) - 1)
    return Scan(scores[last], s, b, s_var, b_var, n_background, np.atleast_1d(z), np.atleast_1d(z_err), best,
                float(w[signal].sum()))


@dataclass(frozen=True)
class SearchResult:
    """Everything the metrics and the report quote about one evaluated classifier."""

    luminosity_fb: float
    scan: Scan
    rejections_at_best: dict[str, Rejection]
    rejections_at_fixed: dict[str, Rejection]
    expected: dict[str, float]  # expected events of each process at the luminosity (before any cut)


def _rejection_at_cut(passed: np.ndarray, weights: np.ndarray) -> Rejection:
    fraction, low, high = weighted_efficiency(passed, weights)
    if fraction > 0:
        return Rejection(1 / fraction, 1 / high, 1 / low, int(passed.sum()), len(passed), False)
    return Rejection(effective_count(weights), 1 / high, np.inf, 0, len(passed), True)


def search_result(arrays: dict[str, np.ndarray], stored: dict[int, int], names: Sequence[str],
                  luminosity_fb: float) -> SearchResult:
    """The significance scan and per-process rejections of a task's payload arrays (`label`, `log_probs` or
    `scores`, `gen_xsec_weight`, `label_process`), for a dataset with `stored` events per process."""
    missing = [c for c in NEEDED_COLUMNS if c not in arrays]
    if missing:
        raise UserError(f"the predictions lack {missing}: run `hepml evaluate` again with this version")
    labels = np.asarray(arrays["label"]).astype(np.int64)
    if not ((labels == 1).any() and (labels == 0).any()):
        raise UserError(f"the significance needs signal and background events; the evaluated events hold labels "
                        f"{sorted(set(labels.tolist()))}")
    process = np.asarray(arrays[PROCESS_COLUMN]).astype(np.int64)
    yields = np.asarray(arrays[XSEC_COLUMN], dtype=np.float64) * yield_scales(stored, process) * luminosity_fb
    scores = log_ratio(log_probabilities(arrays))
    scan = significance_scan(scores, labels == 1, yields)
    cut = scan.cuts[scan.best]
    at_best, at_fixed = {}, {}
    for value in sorted(set(process[labels == 0].tolist())):
        this = (labels == 0) & (process == value)
        name = names[value] if value < len(names) else f"process_{value}"
        at_best[name] = _rejection_at_cut(scores[this] >= cut, yields[this])
        pick = this | (labels == 1)
        at_fixed[name] = rejection(labels[pick], scores[pick], FIXED_SIGNAL_EFFICIENCY, yields[pick])
    expected = {(names[v] if v < len(names) else f"process_{v}"): float(yields[process == v].sum())
                for v in sorted(set(process.tolist()))}
    return SearchResult(luminosity_fb, scan, at_best, at_fixed, expected)


def metric_values(result: SearchResult) -> dict[str, float]:
    """Scalar metrics (names without the `<split>_<task>_` prefix)."""
    scan, i = result.scan, result.scan.best
    out = {
        "significance": float(scan.z[i]),
        "significance_err": float(scan.z_err[i]),
        "best_cut": float(scan.cuts[i]),
        "best_cut_signal_efficiency": float(scan.signal_efficiency[i]),
        "expected_signal": float(scan.s[i]),
        "expected_background": float(scan.b[i]),
        "luminosity_fb": result.luminosity_fb,
    }
    for name, found in result.rejections_at_best.items():
        out[f"rejection_{name}_at_best_cut"] = found.value
    for name, found in result.rejections_at_fixed.items():
        out[f"rejection_{name}_at_{round(FIXED_SIGNAL_EFFICIENCY * 100)}"] = found.value
    return out


def evaluate_search(spec, payload: dict[str, Any], split: str) -> tuple[str, SearchResult] | None:
    """(task name, result) for a job this module applies to whose payload carries the needed columns, else None."""
    if not applies(spec):
        return None
    task = signal_task(spec)
    arrays = payload["arrays"].get(task.name, {})
    if not all(c in arrays for c in NEEDED_COLUMNS) or len(set(np.asarray(arrays["label"]).tolist()) & {0, 1}) < 2:
        return None  # no cross-section weights, or not both signal and background: no significance to quote
    manifests = split_manifests(getattr(spec.data, split))
    names = process_names(manifests, int(np.max(arrays[PROCESS_COLUMN])) + 1)
    return task.name, search_result(arrays, stored_per_process(manifests), names, spec.model.luminosity_fb)


def search_metrics(spec, payload: dict[str, Any], split: str) -> dict[str, float]:
    """`<split>_<task>_significance` etc. for metrics.json; {} where the job is no search or lacks the columns."""
    found = evaluate_search(spec, payload, split)
    if found is None:
        return {}
    task, result = found
    return {f"{split}_{task}_{k}": v for k, v in metric_values(result).items()}
