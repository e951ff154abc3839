"""`hepml evaluate RUN_DIR`: the trained model on a split -> RUN_DIR/metrics.json and RUN_DIR/plots/*.png."""

import json
import os
from pathlib import Path
from typing import Any

import torch

from hepml_dist.errors import UserError
from hepml_dist.evaluate.metrics import Collector, compute_metrics, confusion
from hepml_dist.evaluate.plots import make_plots
from hepml_dist.train.checkpoint import resolve_checkpoint
from hepml_dist.train.launch import absolute_paths


def evaluate_run(path: str | Path, split: str = "test", max_batches: int | None = None) -> dict[str, Any]:
    """Evaluate the best (else latest) checkpoint of a run on `split`, in this process, with a progress bar."""
    from rich.progress import Progress

    from hepml_dist.data.stream import ShardStream
    from hepml_dist.models import get_family
    from hepml_dist.track.tracker import read_metrics
    from hepml_dist.train.checkpoint import load_trained

    folder = resolve_checkpoint(path)
    run_dir = folder.parent.parent if folder.parent.name == "checkpoints" else folder
    spec, model = load_trained(folder)
    spec = absolute_paths(spec)
    if getattr(spec.data, split, None) is None:
        raise UserError(f"data.{split} is not set in {folder}/spec.yaml; choose a split the job defines")
    family = get_family(spec.model.family)
    stream = ShardStream(spec.data, split, rank=0, world_size=1, seed=spec.training.seed, training=False)
    collector = Collector(spec)
    total = min(stream.steps_per_epoch, max_batches or stream.steps_per_epoch)
    with torch.no_grad(), Progress(transient=True) as progress:
        task = progress.add_task(f"evaluating {folder.name} on {split}", total=total)
        for i, batch in enumerate(stream.batches(0)):
            if i >= total:
                break
            outputs = model(batch)
            collector.update(outputs, batch, family.losses(outputs, batch, spec))
            progress.advance(task)
    payload = collector.local()
    metrics = compute_metrics(spec, payload, prefix=split)
    report = {
        "checkpoint": str(folder),
        "split": split,
        "examples": {t: payload["count"][t] for t in payload["count"]},
        "metrics": metrics,
        "confusion_matrices": {
            t.name: confusion(payload["arrays"][t.name]["scores"], payload["arrays"][t.name]["label"]).tolist()
            for t in spec.tasks
            if t.kind != "regression" and "scores" in payload["arrays"][t.name]
        },
    }
    tmp = run_dir / ".metrics.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    os.replace(tmp, run_dir / "metrics.json")
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    import matplotlib.pyplot as plt

    for name, figure in make_plots(spec, payload, read_metrics(run_dir)).items():
        figure.savefig(plots / f"{name}.png", dpi=120, bbox_inches="tight")
        plt.close(figure)
    return report
