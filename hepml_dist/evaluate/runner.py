"""`hepml evaluate RUN_DIR`: the trained model on a split -> RUN_DIR/metrics.json and RUN_DIR/plots/*.png."""

import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch

from hepml_dist import files, runs
from hepml_dist.data.loader import open_stream
from hepml_dist.errors import UserError
from hepml_dist.evaluate.loop import evaluate_batches
from hepml_dist.evaluate.metrics import compute_metrics, confusion
from hepml_dist.evaluate.plots import make_plots
from hepml_dist.spec import JobSpec
from hepml_dist.track.tracker import read_metrics

CPU = torch.device("cpu")


def split_payload(folder: Path, split: str, max_batches: int | None = None,
                  verb: str = "evaluating") -> tuple[JobSpec, dict[str, Any]]:
    """The spec of a checkpoint folder and the Collector payload (losses, predictions of valid examples) of its
    model on `split`, computed in this process with a progress bar."""
    spec, model = runs.load_trained(folder)
    spec = runs.absolute_paths(spec)
    if getattr(spec.data, split, None) is None:
        raise UserError(f"data.{split} is not set in {folder}/spec.yaml; choose a split the job defines")
    stream = open_stream(spec.data, split, rank=0, world_size=1, seed=spec.training.seed, training=False)
    total = min(stream.steps_per_epoch, max_batches or stream.steps_per_epoch)
    collector = evaluate_batches(model, stream.batches(0), spec, device=CPU, limit=total,
                                 progress=f"{verb} {folder.name} on {split}")
    return spec, collector.local()


def evaluate_run(path: str | Path, split: str = "test", max_batches: int | None = None) -> dict[str, Any]:
    """Evaluate the best (else latest) checkpoint of a run on `split`; writes metrics.json and plots/."""
    folder = runs.resolve_checkpoint(path)
    run_dir = runs.run_dir_of(folder)
    spec, payload = split_payload(folder, split, max_batches)
    report = {
        "checkpoint": str(folder),
        "split": split,
        "examples": {t: payload["count"][t] for t in payload["count"]},
        "metrics": compute_metrics(spec, payload, prefix=split),
        "confusion_matrices": {
            t.name: confusion(payload["arrays"][t.name]["scores"], payload["arrays"][t.name]["label"]).tolist()
            for t in spec.tasks
            if t.kind != "regression" and "scores" in payload["arrays"][t.name]
        },
    }
    files.write_text(run_dir / "metrics.json", json.dumps(report, indent=1))
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    for name, figure in make_plots(spec, payload, read_metrics(run_dir)).items():
        figure.savefig(plots / f"{name}.png", dpi=120, bbox_inches="tight")
        plt.close(figure)
    return report
