"""Physics metrics of a model on a split: loss per task, accuracy, ROC AUC, background rejection at fixed signal
efficiency, confusion matrix, and regression response (median) and resolution (IQR / median), all weighted by the
per-example `weight` when the data carry one, and the statistics behind them (Clopper-Pearson intervals, weighted
quantiles). `report.py` and `plots.py` quote the same numbers through the same functions.

`Collector` gathers what each rank saw (loss sums and the predictions of valid examples); `Collector.reduce()` sends
everything to rank 0, which computes the metrics on the whole split with scikit-learn (never a mean of per-rank
means), and shares the result with every rank. Metric names follow docs/architecture.md.

Classifier scores are kept twice: `scores`, the class probabilities (float32, what the confusion matrix and the
prediction files read), and `log_probs`, the log-softmax of the logits. Rankings use the log-likelihood ratio
log(p_signal / p_background) from `log_probs`: confident examples all have p_signal = 1.0 in float32, while
log p_background keeps them apart, so a cut at high purity does not land on a block of ties.
"""

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from scipy.special import betaincinv, logsumexp

from hepml_dist.spec import JobSpec
from hepml_dist.spec.tasks import TaskSpec

SIGNAL_EFFICIENCIES = (0.5, 0.9)
"""Signal efficiencies at which background rejection (1 / false-positive rate) is reported."""
MAX_CLASSES_FOR_ROC = 32
"""Multiclass tasks with more classes (e.g. Sophon's 188) report accuracy and loss only."""
PT_KEYS = ("gen_tau_pt", "jet_pt")
"""Batch keys used as the pT axis of response plots, first found wins."""
KEPT_COLUMNS = ("gen_xsec_weight", "label_process")
"""Per-example batch keys kept with the predictions where the batch has them: cross-section weights and process
labels of events, for the expected significance (`significance.py`)."""
ONE_SIGMA = 0.682689492137086
"""Confidence level of the quoted intervals: the probability content of +-1 standard deviation of a Gaussian."""
LOWER_BOUND_SUFFIX = "_is_lower_bound"
"""`<metric>_is_lower_bound` = 1.0 marks a rejection whose cut passed no background: the value is the background
count, a lower bound the split cannot improve on, not a measurement (0.0 otherwise)."""
TINY = np.finfo(np.float32).tiny
"""Floor of stored float32 probabilities before the log (only for payloads without `log_probs`)."""


# ----------------------------------------------------------------------------------------------------------------------
# Statistics


def binomial(k, n, cl: float = ONE_SIGMA) -> tuple[np.ndarray, np.ndarray]:
    """Central Clopper-Pearson interval (low, high) of an efficiency k / n at confidence level `cl`.

    The exact binomial interval: it covers the true efficiency at least `cl` of the time, stays inside [0, 1] and
    is never empty (k = 0 gives low = 0, k = n gives high = 1). Non-integer k and n (effective counts of weighted
    examples, see `weighted_efficiency`) use the same beta quantiles. NaN where n <= 0."""
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    alpha = 1.0 - cl
    ok = n > 0
    k = np.clip(k, 0.0, np.where(ok, n, 1.0))
    # beta quantiles need positive shape parameters: the k = 0 and k = n ends are set by np.where below
    # (betaincinv(a, b, q) is scipy.stats.beta.ppf(q, a, b), without importing scipy.stats into every worker)
    low = betaincinv(np.maximum(k, 1e-300), np.maximum(n - k + 1, 1e-300), alpha / 2)
    high = betaincinv(k + 1, np.maximum(n - k, 1e-300), 1 - alpha / 2)
    low = np.where(ok, np.where(k > 0, low, 0.0), np.nan)
    high = np.where(ok, np.where(k < n, high, 1.0), np.nan)
    return low[()], high[()]


def effective_count(weights: np.ndarray) -> float:
    """Kish's effective number of examples, (sum w)^2 / sum w^2: the number of unit-weight examples with the same
    relative statistical error as the weighted sum. For unit weights, the count."""
    w = np.asarray(weights, dtype=np.float64)
    squares = float((w * w).sum())
    return float(w.sum()) ** 2 / squares if squares > 0 else 0.0


def _weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    return np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64).reshape(n)


def weighted_efficiency(passed: np.ndarray, weights: np.ndarray | None = None,
                        cl: float = ONE_SIGMA) -> tuple[float, float, float]:
    """(value, low, high): the weighted fraction of `passed` (bool) and its Clopper-Pearson interval on effective
    counts (`effective_count`): for unit weights the exact interval of k of n; weights that vary carry less
    information than as many unit-weight examples, and the interval widens accordingly."""
    passed = np.asarray(passed, dtype=bool)
    w = _weights(weights, len(passed))
    total = float(w.sum())
    if total <= 0:
        return float("nan"), float("nan"), float("nan")
    value = float(w[passed].sum()) / total
    n = effective_count(w)
    low, high = binomial(value * n, n, cl)
    return value, float(low), float(high)


def weighted_quantile(values: np.ndarray, q, weights: np.ndarray | None = None) -> np.ndarray:
    """Quantile(s) `q` of `values` with example weights: numpy's "averaged_inverted_cdf" of the values each
    repeated `weight` times. Integer weights equal repeating examples, scaling all weights changes nothing, and
    the median of an even number of unit-weight values is the mean of the two middle ones."""
    values = np.asarray(values, dtype=np.float64).ravel()
    w = _weights(weights, len(values))
    keep = w > 0  # a zero-weight example is not in the sample
    values, w = values[keep], w[keep]
    q_arr = np.asarray(q, dtype=np.float64)
    if not len(values):
        return np.full(q_arr.shape, np.nan)[()]
    order = np.argsort(values, kind="stable")
    values, cumulative = values[order], np.cumsum(w[order])
    total = cumulative[-1]
    target, slack = q_arr * total, 1e-9 * total  # slack: rounding of the running sum must not skip an example
    lower = np.minimum(np.searchsorted(cumulative, target - slack, side="left"), len(values) - 1)
    upper = np.minimum(np.searchsorted(cumulative, target + slack, side="right"), len(values) - 1)
    return (0.5 * (values[lower] + values[upper]))[()]


# ----------------------------------------------------------------------------------------------------------------------
# Working points: the one definition of background rejection


def log_ratio(log_probs: np.ndarray, signal: int = 1, background: int = 0) -> np.ndarray:
    """log(p_signal / p_background) from log-probabilities, in float64: the likelihood-ratio discriminant.

    It ranks like p_signal / (p_signal + p_background) (ParT's multiclass discriminant) and like p_signal for two
    classes, but does not saturate: confident signal has p_signal = 1.0 in float32, while log p_background still
    tells those examples apart."""
    log_probs = np.asarray(log_probs, dtype=np.float64)
    return log_probs[:, signal] - log_probs[:, background]


def one_vs_rest(log_probs: np.ndarray, c: int) -> np.ndarray:
    """log(p_c / (1 - p_c)) from log-probabilities: the non-saturating score of class c against all others."""
    log_probs = np.asarray(log_probs, dtype=np.float64)
    return log_probs[:, c] - logsumexp(np.delete(log_probs, c, axis=1), axis=1)


def log_probabilities(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Log class probabilities of a task's payload arrays: the stored `log_probs`, else (prediction files of older
    runs, the baseline) the log of the stored probabilities, floored at the smallest normal float32."""
    if "log_probs" in arrays:
        return np.asarray(arrays["log_probs"], dtype=np.float64)
    return np.log(np.maximum(np.asarray(arrays["scores"], dtype=np.float64), TINY))


def working_point(signal_scores: np.ndarray, efficiency: float, weights: np.ndarray | None = None) -> float:
    """The highest cut such that `score >= cut` keeps at least `efficiency` of the (weighted) signal."""
    scores = np.asarray(signal_scores, dtype=np.float64).ravel()
    w = _weights(weights, len(scores))
    order = np.argsort(-scores, kind="stable")
    cumulative = np.cumsum(w[order])
    i = int(np.searchsorted(cumulative, efficiency * cumulative[-1] * (1 - 1e-12), side="left"))
    return float(scores[order][min(i, len(scores) - 1)])


def passing_background(labels: np.ndarray, scores: np.ndarray, efficiency: float,
                       weights: np.ndarray | None = None) -> np.ndarray:
    """Bool per example: a background example (label 0) passing the cut that keeps `efficiency` of the signal
    (label 1). `scores` should not saturate: use `log_ratio`."""
    labels = np.asarray(labels)
    signal = labels == 1
    if not signal.any():
        raise ValueError("a working point needs signal examples (label 1)")
    w = None if weights is None else _weights(weights, len(labels))[signal]
    return (labels == 0) & (np.asarray(scores) >= working_point(np.asarray(scores)[signal], efficiency, w))


@dataclass(frozen=True)
class Rejection:
    """Background rejection at a signal-efficiency working point: 1 / (weighted fraction of background passing),
    with the central 68 % interval from the Clopper-Pearson interval of that fraction.

    When no background passes, `lower_bound` is set and `value` is the (effective) background count: the most the
    split can measure, not a measurement; `high` is then infinite."""

    value: float
    low: float
    high: float
    passing: int  # background examples passing the cut
    background: int  # background examples
    lower_bound: bool

    def text(self) -> str:
        if self.lower_bound:
            return f">= {self.value:.0f} (0 pass)"  # a count of background examples: all its digits
        return f"{number(self.value)} [{number(self.low)}, {number(self.high)}]"


def number(value: float, digits: int = 3) -> str:
    """`value` to `digits` significant figures, without exponent or thousands separator (so that an interval
    "[1230, 45600]" reads unambiguously)."""
    if not math.isfinite(value):
        return "inf" if value > 0 else "nan"
    if value == 0:
        return "0"
    decimals = digits - 1 - math.floor(math.log10(abs(value)))
    return f"{round(value, decimals):.{max(decimals, 0)}f}"


def rejection(labels: np.ndarray, scores: np.ndarray, efficiency: float, weights: np.ndarray | None = None) -> Rejection:
    """Rejection of background (label 0) at the cut on `scores` that keeps `efficiency` of the signal (label 1):
    total background weight / background weight passing."""
    labels = np.asarray(labels)
    w = _weights(weights, len(labels))
    background = labels == 0
    if not background.any():
        raise ValueError("a rejection needs background examples (label 0)")
    passed = passing_background(labels, scores, efficiency, w)[background]
    fraction, low, high = weighted_efficiency(passed, w[background])
    if fraction > 0:
        return Rejection(1 / fraction, 1 / high, 1 / low, int(passed.sum()), int(background.sum()), False)
    return Rejection(effective_count(w[background]), 1 / high, math.inf, 0, int(background.sum()), True)


def rejection_at(labels: np.ndarray, scores: np.ndarray, efficiency: float, weights: np.ndarray | None = None) -> float:
    """`rejection(...).value`, for callers that want the number alone."""
    return rejection(labels, scores, efficiency, weights).value


# ----------------------------------------------------------------------------------------------------------------------
# Metrics of a split


def _valid_mask(task: TaskSpec, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Entries whose truth is defined: label >= 0, `only_where` == 1, and real elements for per-element tasks."""
    if task.kind == "regression":
        truth = torch.stack([batch[f"target_{t}"].float() for t in task.targets or []], dim=-1)
        valid = torch.isfinite(truth).all(dim=-1)
    else:
        valid = batch[task.label_key] >= 0
    if task.only_where:
        valid = valid & (batch[task.only_where] == 1)
    if valid.ndim == 2 and "mask" in batch and batch["mask"].shape[-1] == valid.shape[-1]:
        valid = valid & (batch["mask"][:, 0] > 0)
    return valid


def _example_weights(batch: dict[str, torch.Tensor], valid: torch.Tensor) -> torch.Tensor:
    if "weight" not in batch:
        return torch.ones_like(valid, dtype=torch.float32)
    weights = batch["weight"].float()
    return weights[:, None].expand_as(valid) if weights.dim() < valid.dim() else weights


def _per_entry(output: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Output rows of the valid entries: [B, K] or per element [B, P, K] / [B, K, P] -> [N, K]."""
    if valid.ndim == 1:
        return output[valid]
    if output.ndim == 3 and output.shape[1] != valid.shape[1]:
        output = output.transpose(1, 2)
    return output[valid]


def class_probabilities(task: TaskSpec, logits: torch.Tensor) -> torch.Tensor:
    logits = logits.float()
    if task.kind == "binary" and logits.shape[-1] == 1:
        p = torch.sigmoid(logits[:, 0])
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(logits, dim=-1)


def class_log_probabilities(task: TaskSpec, logits: torch.Tensor) -> torch.Tensor:
    """log of `class_probabilities`, computed from the logits (log-softmax, log-sigmoid), so it keeps the
    resolution that the probabilities lose near 1."""
    logits = logits.float()
    if task.kind == "binary" and logits.shape[-1] == 1:
        x = logits[:, 0]
        return torch.stack([torch.nn.functional.logsigmoid(-x), torch.nn.functional.logsigmoid(x)], dim=1)
    return torch.log_softmax(logits, dim=-1)


class Collector:
    """Per-rank accumulation of validation results for every task: per valid example the class probabilities
    (`scores`), for tasks with ROC metrics their logs (`log_probs`), the label (or `pred` and `true`), the example
    weight (`weight`, 1 where the data carry none), the pT where the batch has one, and the `KEPT_COLUMNS` the
    batch has (per-example tasks only)."""

    def __init__(self, spec: JobSpec):
        self.spec = spec
        self.loss_sum = {t.name: 0.0 for t in spec.tasks}
        self.count = {t.name: 0.0 for t in spec.tasks}
        self.parts: dict[str, dict[str, list[np.ndarray]]] = {t.name: {} for t in spec.tasks}

    def _keep(self, task: str, key: str, value: torch.Tensor) -> None:
        self.parts[task].setdefault(key, []).append(value.detach().float().cpu().numpy())

    @torch.no_grad()
    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor], losses: dict[str, torch.Tensor]) -> None:
        for task in self.spec.tasks:
            valid = _valid_mask(task, batch)
            if not bool(valid.any()):
                continue
            # Task losses are (example-weighted) means over the valid entries of the batch, so
            # sum(mean * weight sum) / sum(weight sums) over batches and ranks is the mean over the split.
            weights = _example_weights(batch, valid)[valid]
            n = float(weights.sum())
            self.loss_sum[task.name] += float(losses[task.name]) * n
            self.count[task.name] += n
            self._keep(task.name, "weight", weights)
            rows = _per_entry(outputs[task.name], valid)
            if task.kind == "regression":
                truth = torch.stack([batch[f"target_{t}"] for t in task.targets or []], dim=-1)[valid]
                self._keep(task.name, "pred", rows)
                self._keep(task.name, "true", truth)
            else:
                self._keep(task.name, "scores", class_probabilities(task, rows))
                if rows.shape[-1] <= MAX_CLASSES_FOR_ROC:  # only ROC metrics need them: spare Sophon's 188 classes
                    self._keep(task.name, "log_probs", class_log_probabilities(task, rows))
                self._keep(task.name, "label", batch[task.label_key][valid])
            if valid.ndim == 1:
                for key in KEPT_COLUMNS:
                    if key in batch:
                        self._keep(task.name, key, batch[key][valid])
                for key in PT_KEYS:
                    if key in batch:
                        self._keep(task.name, "pt", batch[key][valid])
                        break

    def local(self) -> dict[str, Any]:
        return {
            "loss_sum": self.loss_sum,
            "count": self.count,
            "arrays": {t: {k: np.concatenate(v) for k, v in parts.items()} for t, parts in self.parts.items()},
        }

    def reduce(self, prefix: str = "val") -> tuple[dict[str, float], dict[str, Any]]:
        """Metrics over all ranks (every rank gets the same dict) and, on rank 0, the merged arrays for plots."""
        payload = self.local()
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return compute_metrics(self.spec, payload, prefix), payload
        rank = dist.get_rank()
        gathered: list[Any] | None = [None] * dist.get_world_size() if rank == 0 else None
        dist.gather_object(payload, gathered, dst=0)
        merged: dict[str, Any] = {}
        result: list[Any] = [None]
        if rank == 0:
            merged = merge_payloads(gathered or [])
            result[0] = compute_metrics(self.spec, merged, prefix)
        dist.broadcast_object_list(result, src=0)
        return result[0], merged


def merge_payloads(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    tasks = payloads[0]["loss_sum"].keys()
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for task in tasks:
        keys = {k for p in payloads for k in p["arrays"][task]}
        arrays[task] = {k: np.concatenate([p["arrays"][task][k] for p in payloads if k in p["arrays"][task]]) for k in keys}
    return {
        "loss_sum": {t: sum(p["loss_sum"][t] for p in payloads) for t in tasks},
        "count": {t: sum(p["count"][t] for p in payloads) for t in tasks},
        "arrays": arrays,
    }


def _put_rejection(out: dict[str, float], name: str, found: Rejection) -> None:
    out[name] = found.value
    out[name + LOWER_BOUND_SUFFIX] = float(found.lower_bound)


def accuracy(log_probs: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> tuple[float, float, float]:
    """(value, low, high): the weighted fraction of examples whose arg-max is the label, 68 % Clopper-Pearson."""
    return weighted_efficiency(np.asarray(log_probs).argmax(axis=1) == np.asarray(labels), weights)


def classification_metrics(task: TaskSpec, log_probs: np.ndarray, labels: np.ndarray,
                           weights: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy, AUC and rejections from log-probabilities (`log_probabilities`), weighted by `weights`."""
    from sklearn.metrics import roc_auc_score  # at first validation: sklearn and pandas add ~2 s to every worker's start

    labels = labels.astype(np.int64)
    w = _weights(weights, len(labels))
    out = {"accuracy": accuracy(log_probs, labels, w)[0]}
    k = log_probs.shape[1]
    present = np.unique(labels)
    if k == 2:
        if len(present) == 2:
            disc = log_ratio(log_probs)
            out["auc"] = float(roc_auc_score(labels, disc, sample_weight=w))
            for eff in SIGNAL_EFFICIENCIES:
                _put_rejection(out, f"rejection_at_{round(eff * 100)}", rejection(labels, disc, eff, w))
    elif k <= MAX_CLASSES_FOR_ROC and len(present) == k:
        # one-vs-rest macro average, as scikit-learn's multi_class="ovr", on scores that do not saturate
        out["auc"] = float(np.mean([roc_auc_score(labels == c, one_vs_rest(log_probs, c), sample_weight=w)
                                    for c in range(k)]))
        names = task.classes or [str(i) for i in range(k)]
        background = labels == 0
        for c in range(1, k):
            # ParT convention: signal class c against class 0 with s_c / (s_c + s_0), which ranks as log(s_c / s_0)
            pick = background | (labels == c)
            found = rejection((labels[pick] == c).astype(int), log_ratio(log_probs[pick], c, 0), 0.5, w[pick])
            _put_rejection(out, f"rejection_at_50_{names[c]}", found)
    return out


def confusion(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    from sklearn.metrics import confusion_matrix  # at first use: sklearn and pandas add ~2 s to every worker's start

    k = scores.shape[1]
    return confusion_matrix(labels.astype(np.int64), scores.argmax(axis=1), labels=list(range(k)))


def response(target: str, pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, bool]:
    """Per-example response: the ratio predicted/true for log-ratio targets (`log_*`), else the residual.
    Returns (response, is_ratio)."""
    if target.startswith("log_"):
        return np.exp(pred - true), True
    return pred - true, False


def response_numbers(r: np.ndarray, is_ratio: bool, weights: np.ndarray | None = None) -> tuple[float, float]:
    """(median, resolution) of a response: IQR / median for a ratio, the IQR of the residual otherwise."""
    q25, median, q75 = weighted_quantile(r, [0.25, 0.5, 0.75], weights)
    iqr = q75 - q25
    return float(median), float(iqr / median if is_ratio and median != 0 else iqr)


def regression_metrics(task: TaskSpec, pred: np.ndarray, true: np.ndarray,
                       weights: np.ndarray | None = None) -> dict[str, float]:
    out: dict[str, float] = {}
    for i, target in enumerate(task.targets or []):
        median, resolution = response_numbers(*response(target, pred[:, i], true[:, i]), weights)
        out[f"{target}_response_median"] = median
        out[f"{target}_resolution"] = resolution
        if i == 0:
            out["response_median"], out["resolution"] = median, resolution
    return out


def compute_metrics(spec: JobSpec, payload: dict[str, Any], prefix: str = "val") -> dict[str, float]:
    """Scalar metrics `<prefix>_loss`, `<prefix>_<task>_<metric>` from a (merged) Collector payload."""
    metrics: dict[str, float] = {}
    total = 0.0
    for task in spec.tasks:
        n = payload["count"][task.name]
        if n == 0:
            continue
        loss = payload["loss_sum"][task.name] / n
        total += loss
        metrics[f"{prefix}_{task.name}_loss"] = loss
        arrays = payload["arrays"][task.name]
        weights = arrays.get("weight")
        # A diverged model predicts NaN: score what is finite rather than fail the whole evaluation.
        if task.kind == "regression":
            finite = np.isfinite(arrays["pred"]).all(axis=1)
            w = None if weights is None else weights[finite]
            found = regression_metrics(task, arrays["pred"][finite], arrays["true"][finite], w) if finite.any() else {}
        else:
            log_probs = log_probabilities(arrays)
            finite = np.isfinite(log_probs).all(axis=1)
            found = classification_metrics(task, log_probs[finite], arrays["label"][finite],
                                           None if weights is None else weights[finite]) if finite.any() else {}
        metrics.update({f"{prefix}_{task.name}_{k}": v for k, v in found.items()})
    metrics[f"{prefix}_loss"] = total
    return {k: (v if math.isfinite(v) else float("nan")) for k, v in metrics.items()}
