"""`hepml evaluate RUN_DIR`: the trained model on a split -> RUN_DIR/metrics.json, and its metrics and plots through
the run's results tracker: a record in metrics.jsonl, plots/*.png, TensorBoard, the run's Comet experiment."""

import json
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch

from hepml_dist import files, runs
from hepml_dist.data.loader import open_stream
from hepml_dist.errors import UserError
from hepml_dist.evaluate.families import EvaluateContext, evaluations
from hepml_dist.evaluate.loop import evaluate_batches
from hepml_dist.evaluate.metrics import compute_metrics, confusion
from hepml_dist.evaluate.plots import make_plots
from hepml_dist.spec import JobSpec
from hepml_dist.track.records import read_metrics, training_records
from hepml_dist.track.tracker import make_results_tracker

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
    trained = runs.read_run_spec(folder)  # the checkpoint's own spec.yaml (a run directory may have none)
    family = evaluations(trained)
    for evaluation in family:  # the family's evaluation reads more of the data than the model: checked before any work
        evaluation.check_inputs(runs.absolute_paths(trained), split)
    spec, payload = split_payload(folder, split, max_batches)
    report = {
        "checkpoint": str(folder),
        "split": split,
        # rows, not payload["count"]: that is the sum of the example weights (e.g. 35.9 for 36 weighted AOT events)
        "examples": {t: len(next(iter(payload["arrays"].get(t, {}).values()), [])) for t in payload["count"]},
        "metrics": compute_metrics(spec, payload, prefix=split),
        "confusion_matrices": {
            t.name: confusion(payload["arrays"][t.name]["scores"], payload["arrays"][t.name]["label"]).tolist()
            for t in spec.tasks
            if t.kind != "regression" and "scores" in payload["arrays"][t.name]
        },
    }
    context = EvaluateContext(folder, run_dir, spec, split, payload, max_batches, run_dir / "plots")
    for evaluation in family:  # what the family adds: MLPF's jet/MET response, a search's significance, ...
        extra = dict(evaluation.results(context) or {})
        report["metrics"].update(extra.pop("metrics", {}))
        report.update(extra)
    files.write_text(run_dir / "metrics.json", json.dumps(report, indent=1))
    state = runs.read_state(folder)
    figures = make_plots(spec, payload, training_records(read_metrics(run_dir)))
    tracker = make_results_tracker(spec, run_dir, split)
    try:
        tracker.log_metrics(tracked_names(report["metrics"], split), step=state.get("step", 0), epoch=state.get("epoch"))
        for name, figure in figures.items():
            tracker.log_figure(name, figure, step=state.get("step", 0))
    finally:
        tracker.close()
        for figure in figures.values():
            plt.close(figure)
    return report


def tracked_names(metrics: dict[str, float], split: str) -> dict[str, float]:
    """Metrics as the trackers get them: test metrics by their own names; those of the train and val splits as
    `eval_<name>`, apart from the `train_*` and `val_*` metrics the training loop logs (on part of the split)."""
    return metrics if split == "test" else {f"eval_{name}": value for name, value in metrics.items()}
