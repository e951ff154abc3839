"""Validation of models whose outputs the per-task Collector cannot keep: summed metrics declared by the family.

The Collector (`evaluate/metrics.py`) keeps every valid example's prediction and truth. OmniJet-alpha's tokenizer
(its truth is its own input) and backbone (next-token scores over 8194 classes per token) fit neither: their family
declares `ModelFamily.metrics(outputs, batch, spec) -> {name: (sum, count)}`, and `SummedCollector` adds the sums
and counts over batches and ranks; metric = total sum / total count. It keeps no per-example arrays, so its payload
has empty `arrays` and zero per-task `count` (the per-task metrics have nothing to score); the losses and the
summed metrics travel in `loss_sums` and `sums`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from hepml_dist.spec import JobSpec

MetricsFn = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor], JobSpec], dict[str, tuple[float, float]] | None]


class SummedCollector:
    """The Collector's interface (`update`, `local`, `reduce`) for a family's summed metrics."""

    def __init__(self, spec: JobSpec, metrics: MetricsFn):
        self.spec, self.metrics = spec, metrics
        self.loss_sums = {t.name: [0.0, 0.0] for t in spec.tasks}  # task -> [sum of batch mean x size, examples]
        self.sums: dict[str, list[float]] = {}

    @torch.no_grad()
    def update(self, outputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
               losses: dict[str, torch.Tensor]) -> None:
        size = float(len(next(iter(batch.values()))))
        for name, loss in losses.items():
            self.loss_sums[name][0] += float(loss) * size
            self.loss_sums[name][1] += size
        for name, (total, count) in (self.metrics(outputs, batch, self.spec) or {}).items():
            entry = self.sums.setdefault(name, [0.0, 0.0])
            entry[0] += float(total)
            entry[1] += float(count)

    def local(self) -> dict[str, Any]:
        return {"loss_sum": {t: 0.0 for t in self.loss_sums}, "count": {t: 0.0 for t in self.loss_sums},
                "arrays": {t: {} for t in self.loss_sums}, "loss_sums": self.loss_sums, "sums": self.sums}

    def reduce(self, prefix: str = "val") -> tuple[dict[str, float], dict[str, Any]]:
        """Metrics over all ranks (every rank gets the same dict) and the payload."""
        names = sorted(self.sums)
        values = torch.tensor([v for t in self.loss_sums for v in self.loss_sums[t]]
                              + [v for n in names for v in self.sums[n]], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            values = values.to("cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(values)
            values = values.cpu()
        pairs = values.view(-1, 2).tolist()
        tasks = list(self.loss_sums)
        self.loss_sums = dict(zip(tasks, pairs[: len(tasks)]))
        self.sums = dict(zip(names, pairs[len(tasks):]))
        return summed_metrics(self.local(), prefix), self.local()


def _ratio(total: float, count: float) -> float:
    return total / count if count else float("nan")


def summed_metrics(payload: dict[str, Any], prefix: str) -> dict[str, float]:
    """`<prefix>_loss`, `<prefix>_<task>_loss` and `<prefix>_<name>` of every summed metric of a payload."""
    metrics = {f"{prefix}_{task}_loss": _ratio(*pair) for task, pair in payload.get("loss_sums", {}).items()}
    metrics[f"{prefix}_loss"] = sum(v for v in metrics.values() if math.isfinite(v))
    metrics.update({f"{prefix}_{name}": _ratio(*pair) for name, pair in payload.get("sums", {}).items()})
    return metrics
