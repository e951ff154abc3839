"""One row per run directory for `hepml runs`: where each run stands, read from its files alone (no torch).

A run's state, first match wins:

    running      a training process logs to it now (RUN_DIR/running.json: a live pid on this host, or refreshed
                 within the last 30 min from another host)
    failed       the workers recorded a training error (RUN_DIR/error.json, cleared when the run is started again)
    starting     `hepml train` wrote its spec.yaml after the run's last log and checkpoint, within the last 30 min:
                 Ray and the workers are starting
    finished     its latest checkpoint says so (state.json `finished`)
    stopped      its latest checkpoint was written on a stop request (SIGTERM/SIGUSR1, `hepml stop`, Tune)
    interrupted  none of these: killed, crashed or never checkpointed; `hepml train` on it again resumes it

The spec is read as plain YAML, not validated, so that runs of older versions of the spec are still listed.
"""

import math
import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from hepml_dist import run_files
from hepml_dist.errors import UserError
from hepml_dist.track.records import (
    METRICS_FILE,
    SILENT_AFTER_S,
    read_metrics,
    training_in_progress,
    training_records,
)

SPEC_FILE = "spec.yaml"
NOT_RUNS = {run_files.CHECKPOINTS, "tensorboard", "comet", "plots", "ray", "baseline"}  # never hold run directories
MAX_DEPTH = 4  # runs/<name>, runs/tune/trials/<trial>: deep enough, and a stray home folder is not walked


@dataclass
class RunRow:
    name: str
    path: str
    family: str | None
    state: str
    step: int
    total_steps: int | None
    epoch: int | None
    """The epoch the last logged step belongs to, counted from 1."""
    epochs: int | None
    best_metric: str | None
    best_value: float | None
    best_step: int | None
    last_val_loss: float | None
    started: str | None
    """Local time of the first logged step (else of the run's spec.yaml), ISO format to the second."""
    error: str | None


def find_runs(root: Path) -> list[Path]:
    """The run directories at or below `root` (folders holding spec.yaml outside checkpoint folders), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such folder (give the folder your runs are in, e.g. runs/ or cluster.storage_path)")
    found = []
    for folder, subfolders, names in os.walk(root):
        depth = len(Path(folder).relative_to(root).parts)
        if SPEC_FILE in names:
            found.append(Path(folder))
            subfolders.clear()  # a run directory holds no other runs
        elif depth >= MAX_DEPTH:
            subfolders.clear()
        subfolders[:] = sorted(s for s in subfolders if s not in NOT_RUNS and not s.startswith("."))
    return sorted(found)


def run_state(run_dir: Path, latest: Path | None, latest_state: dict[str, Any]) -> str:
    if training_in_progress(run_dir):
        return "running"
    if run_files.read_failure(run_dir):
        return "failed"
    if _launched_since_last_activity(run_dir, latest):
        return "starting"
    if latest_state.get("finished"):
        return "finished"
    if latest_state.get("stopped"):
        return "stopped"
    return "interrupted"


def _launched_since_last_activity(run_dir: Path, latest: Path | None) -> bool:
    """spec.yaml (rewritten by every launch) is newer than the last log and checkpoint, and recent."""
    written = _mtime(run_dir / SPEC_FILE)
    activity = max(_mtime(run_dir / METRICS_FILE), _mtime(latest / "state.json") if latest else 0.0)
    return written > activity + 1.0 and time.time() - written < SILENT_AFTER_S  # 1 s: a copied run's jitter


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def summarize(run_dir: Path, root: Path | None = None) -> RunRow:
    """The row of one run directory, named by its path relative to `root` (else by its folder name)."""
    run_dir = Path(run_dir)
    spec = _read_spec(run_dir)
    latest = run_files.latest_checkpoint(run_dir)
    state = run_files.read_state(latest) if latest else {}
    records = training_records(read_metrics(run_dir))
    last = records[-1] if records else {}
    # the latest of the last logged step and the latest checkpoint (a stop checkpoints between two log steps)
    newest = max([last, state], key=lambda source: int(source.get("step") or 0))
    step, epoch = int(newest.get("step") or 0), newest.get("epoch")
    metric, value, best_step = _best(run_dir, spec, records)
    val_losses = [r["val_loss"] for r in records if isinstance(r.get("val_loss"), (int, float))]
    training, checkpoint = spec.get("training") or {}, spec.get("checkpoint") or {}
    return RunRow(
        name=str(run_dir.relative_to(root)) if root and run_dir != root else run_dir.name,
        path=str(run_dir.resolve()),
        family=(spec.get("model") or {}).get("family"),
        state=run_state(run_dir, latest, state),
        step=step,
        total_steps=_total_steps(spec),
        epoch=int(epoch) + 1 if epoch is not None else None,
        epochs=training.get("epochs"),
        best_metric=metric or checkpoint.get("keep_best_by"),
        best_value=value,
        best_step=best_step,
        last_val_loss=val_losses[-1] if val_losses else None,
        started=_started(run_dir, records),
        error=run_files.read_failure(run_dir),
    )


def summarize_all(root: Path) -> list[dict[str, Any]]:
    return [asdict(summarize(run_dir, root)) for run_dir in find_runs(root)]


def _read_spec(run_dir: Path) -> dict[str, Any]:
    try:
        spec = yaml.safe_load((run_dir / SPEC_FILE).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return spec if isinstance(spec, dict) else {}


def _total_steps(spec: dict[str, Any]) -> int | None:
    training, data = spec.get("training") or {}, spec.get("data") or {}
    if training.get("steps"):
        return int(training["steps"])
    if training.get("epochs") and data.get("steps_per_epoch"):
        return int(training["epochs"]) * int(data["steps_per_epoch"]) // int(training.get("grad_accum") or 1)
    return None


def _best(run_dir: Path, spec: dict[str, Any], records: list[dict[str, Any]]) -> tuple[str | None, float | None, int | None]:
    """(metric, best value, its step): the best checkpoint's (best.json), else the best logged value of the job's
    checkpoint.keep_best_by (a run that has not checkpointed yet)."""
    best = run_files.read_best(run_dir)
    if best:
        step = best.get("step")
        if step is None and str(best.get("checkpoint", "")).startswith("step-"):
            step = int(best["checkpoint"].removeprefix("step-"))  # best.json of training records no step
        return best.get("metric"), best.get("value"), step
    checkpoint = spec.get("checkpoint") or {}
    metric = checkpoint.get("keep_best_by", "val_loss")
    points = [(r[metric], r.get("step")) for r in records
              if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    if not metric or not points:
        return metric, None, None
    value, step = (max if checkpoint.get("best_mode") == "max" else min)(points, key=lambda point: point[0])
    return metric, value, step


def _started(run_dir: Path, records: list[dict[str, Any]]) -> str | None:
    """The first launch: spec.yaml's time for a run never resumed, else its first logged step's (a resume
    rewrites spec.yaml)."""
    times = [r["time"] for r in records if isinstance(r.get("time"), (int, float))] + [_mtime(run_dir / SPEC_FILE)]
    when = min(t for t in times if t > 0) if any(t > 0 for t in times) else None
    return datetime.fromtimestamp(when).isoformat(timespec="seconds") if when else None
