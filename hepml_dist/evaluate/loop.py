"""Running a model over batches: the one loop shared by validation (every rank), `hepml evaluate`, `hepml report`
and `hepml predict`.

`run_model` yields each batch (moved to the device) with the model's outputs, without gradients and under the
job's autocast; `evaluate_batches` feeds them to a Collector (losses and the predictions of valid examples), which
the caller reduces over all ranks (`Collector.reduce`, validation) or reads locally (`Collector.local`). Families
that declare summed metrics (`ModelFamily.metrics`) get a SummedCollector with the same interface instead.
"""

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from rich.progress import Progress

from hepml_dist.evaluate.metrics import Collector
from hepml_dist.evaluate.summed_metrics import SummedCollector
from hepml_dist.models import get_family
from hepml_dist.precision import autocast
from hepml_dist.spec import JobSpec

Batch = dict[str, Any]
Forward = Callable[[Batch], dict[str, torch.Tensor]]


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def run_model(forward: Forward, batches: Iterable[Batch], *, device: torch.device, precision: str = "fp32",
              limit: int | None = None, progress: str | None = None) -> Iterator[tuple[Batch, dict[str, torch.Tensor]]]:
    """(batch on `device`, outputs of `forward`) for each batch, at most `limit` of them, with no gradients and
    `precision`'s autocast; `progress` names a transient progress bar (total: `limit`)."""
    bar = Progress(transient=True) if progress else None
    task = bar.add_task(progress, total=limit) if bar else None
    if bar:
        bar.start()
    try:
        for i, batch in enumerate(batches):
            if limit is not None and i >= limit:
                break
            batch = to_device(batch, device)
            with torch.no_grad(), autocast(device, precision):
                outputs = forward(batch)
            yield batch, outputs
            if bar:
                bar.advance(task)
    finally:
        if bar:
            bar.stop()


def evaluate_batches(forward: Forward, batches: Iterable[Batch], spec: JobSpec, *, device: torch.device,
                     precision: str = "fp32", limit: int | None = None,
                     progress: str | None = None) -> Collector | SummedCollector:
    """The losses and predictions of `forward` on `batches`, gathered in a Collector of this process."""
    family = get_family(spec.model.family)
    # a family whose outputs the per-task Collector cannot keep declares summed metrics (OmniJet's pretraining)
    summed = family.metrics(spec) if family.metrics else None
    collector = SummedCollector(spec, summed) if summed else Collector(spec)
    for batch, outputs in run_model(forward, batches, device=device, precision=precision, limit=limit,
                                    progress=progress):
        collector.update(outputs, batch, family.losses(outputs, batch, spec))
    return collector
