"""Physics metrics of a model on a split: loss per task, accuracy, ROC AUC, background rejection at fixed signal
efficiency, confusion matrix, and regression response (median) and resolution (IQR / median).

`Collector` gathers what each rank saw (loss sums and the predictions of valid examples); `Collector.reduce()` sends
everything to rank 0, which computes the metrics on the whole split with scikit-learn (never a mean of per-rank
means), and shares the result with every rank. Metric names follow docs/architecture.md.
"""

import math
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from sklearn.metrics import confusion_matrix, roc_auc_score, roc_curve

from hepml_dist.spec import JobSpec
from hepml_dist.spec.tasks import TaskSpec

SIGNAL_EFFICIENCIES = (0.5, 0.9)
"""Signal efficiencies at which background rejection (1 / false-positive rate) is reported."""
MAX_CLASSES_FOR_ROC = 32
"""Multiclass tasks with more classes (e.g. Sophon's 188) report accuracy and loss only."""
PT_KEYS = ("gen_tau_pt", "jet_pt")
"""Batch keys used as the pT axis of response plots, first found wins."""


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


class Collector:
    """Per-rank accumulation of validation results for every task."""

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
            n = float(_example_weights(batch, valid)[valid].sum())
            self.loss_sum[task.name] += float(losses[task.name]) * n
            self.count[task.name] += n
            rows = _per_entry(outputs[task.name], valid)
            if task.kind == "regression":
                truth = torch.stack([batch[f"target_{t}"] for t in task.targets or []], dim=-1)[valid]
                self._keep(task.name, "pred", rows)
                self._keep(task.name, "true", truth)
            else:
                self._keep(task.name, "scores", class_probabilities(task, rows))
                self._keep(task.name, "label", batch[task.label_key][valid])
            if valid.ndim == 1:
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


def rejection_at(labels: np.ndarray, scores: np.ndarray, efficiency: float) -> float:
    """1 / false-positive rate at the given true-positive rate (capped at the number of background examples)."""
    fpr, tpr, _ = roc_curve(labels, scores)
    fake_rate = float(np.interp(efficiency, tpr, fpr))
    n_background = int((labels == 0).sum())
    return 1.0 / max(fake_rate, 1.0 / max(n_background, 1))


def classification_metrics(task: TaskSpec, scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    labels = labels.astype(np.int64)
    out = {"accuracy": float((scores.argmax(axis=1) == labels).mean())}
    k = scores.shape[1]
    present = np.unique(labels)
    if k == 2:
        if len(present) == 2:
            out["auc"] = float(roc_auc_score(labels, scores[:, 1]))
            for eff in SIGNAL_EFFICIENCIES:
                out[f"rejection_at_{round(eff * 100)}"] = rejection_at(labels, scores[:, 1], eff)
    elif k <= MAX_CLASSES_FOR_ROC and len(present) == k:
        out["auc"] = float(roc_auc_score(labels, scores, multi_class="ovr", average="macro"))
        names = task.classes or [str(i) for i in range(k)]
        background = labels == 0
        for c in range(1, k):
            # ParT convention: signal class c against class 0 with the discriminant s_c / (s_c + s_0).
            pick = background | (labels == c)
            disc = scores[pick, c] / np.clip(scores[pick, c] + scores[pick, 0], 1e-12, None)
            out[f"rejection_at_50_{names[c]}"] = rejection_at((labels[pick] == c).astype(int), disc, 0.5)
    return out


def confusion(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    k = scores.shape[1]
    return confusion_matrix(labels.astype(np.int64), scores.argmax(axis=1), labels=list(range(k)))


def response(target: str, pred: np.ndarray, true: np.ndarray) -> tuple[np.ndarray, bool]:
    """Per-example response: the ratio predicted/true for log-ratio targets (`log_*`), else the residual.
    Returns (response, is_ratio)."""
    if target.startswith("log_"):
        return np.exp(pred - true), True
    return pred - true, False


def regression_metrics(task: TaskSpec, pred: np.ndarray, true: np.ndarray) -> dict[str, float]:
    out: dict[str, float] = {}
    for i, target in enumerate(task.targets or []):
        r, is_ratio = response(target, pred[:, i], true[:, i])
        q25, median, q75 = np.percentile(r, [25, 50, 75])
        iqr = q75 - q25
        resolution = iqr / median if is_ratio and median != 0 else iqr
        out[f"{target}_response_median"] = float(median)
        out[f"{target}_resolution"] = float(resolution)
        if i == 0:
            out["response_median"], out["resolution"] = float(median), float(resolution)
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
        # A diverged model predicts NaN: score what is finite rather than fail the whole evaluation.
        if task.kind == "regression":
            finite = np.isfinite(arrays["pred"]).all(axis=1)
            found = regression_metrics(task, arrays["pred"][finite], arrays["true"][finite]) if finite.any() else {}
        else:
            finite = np.isfinite(arrays["scores"]).all(axis=1)
            found = classification_metrics(task, arrays["scores"][finite], arrays["label"][finite]) if finite.any() else {}
        metrics.update({f"{prefix}_{task.name}_{k}": v for k, v in found.items()})
    metrics[f"{prefix}_loss"] = total
    return {k: (v if math.isfinite(v) else float("nan")) for k, v in metrics.items()}
