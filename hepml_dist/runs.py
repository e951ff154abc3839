"""Run directories and their checkpoint folders: where they are, what is in them, how to read them back.

Everything about a run directory that is not training itself lives here, so that evaluation, prediction, export,
tokenizing and generation read runs without importing the training engine.

    RUN_DIR/                           <cluster.storage_path or ./runs>/<job name>
      spec.yaml                        the resolved job spec
      metrics.jsonl, comet/            what rank 0 logged (hepml_dist.track)
      tensorboard/, running.json       TensorBoard event files; the mark of a run in progress (hepml_dist.track)
      error.json                       a deterministic training failure for the driver to report (then removed)
      checkpoints/step-00001234/       one complete checkpoint per folder (see write_checkpoint_files)
        spec.yaml, model.pt, state.json, training.pt (DDP) or deepspeed/ (every rank's shards)
      checkpoints/.step-00001234.tmp   a checkpoint being assembled: never read
      checkpoints/best.json            {"checkpoint": "step-...", "metric": ..., "value": ..., "mode": ...}

A folder named `step-*` is always whole: it is assembled under a hidden temporary name and renamed once complete.
Weights are read with `torch.load(weights_only=True)` only. The readers of the small files (checkpoint listing,
state.json, best.json, the failure file) live in `hepml_dist.run_files`, which needs no torch; they are used from here.
"""

import json
import math
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hepml_dist import files
from hepml_dist.errors import UserError
from hepml_dist.models import build_model
from hepml_dist.run_files import (  # noqa: F401 - the readers live there (no torch); callers use them from here
    BEST,
    CHECKPOINTS,
    FAILURE,
    checkpoint_name,
    latest_checkpoint,
    list_checkpoints,
    read_best,
    read_failure,
    read_run_spec,
    read_state,
)
from hepml_dist.spec import JobSpec, SpecError, dump_spec, load_job

DEEPSPEED_TAG = "deepspeed"  # the sub-folder of a checkpoint that holds DeepSpeed's per-rank shard files


# ----------------------------------------------------------------------------------------------------------------
# Where runs live


def default_run_dir(spec: JobSpec) -> Path:
    return Path(spec.cluster.storage_path or "runs").resolve() / spec.name


def _absolute(value: str | list[str] | None) -> str | list[str] | None:
    if value is None:
        return None
    if isinstance(value, list):
        return [_absolute(v) for v in value]  # type: ignore[misc]
    if "://" in value or value.startswith("pipe:") or os.path.isabs(value):
        return value
    return str(Path(value).resolve())


def absolute_paths(spec: JobSpec) -> JobSpec:
    """The spec with local data paths and init_from made absolute (workers and actors run in other directories)."""
    data = spec.data.model_copy(update={k: _absolute(getattr(spec.data, k)) for k in ("train", "val", "test")})
    if data.groups:
        data = data.model_copy(update={"groups": [g.model_copy(update={"train": _absolute(g.train)}) for g in data.groups]})
    training = spec.training.model_copy(update={"init_from": _absolute(spec.training.init_from)})
    return spec.model_copy(update={"data": data, "training": training})


def run_dir_of(folder: Path) -> Path:
    """The run directory a checkpoint folder belongs to (a folder outside a run is its own run directory)."""
    folder = Path(folder)
    return folder.parent.parent if folder.parent.name == CHECKPOINTS else folder


def write_run_spec(run_dir: Path, spec: JobSpec) -> None:
    files.write_text(Path(run_dir) / "spec.yaml", dump_spec(spec))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint folders


def checkpoint_folder(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / checkpoint_name(step)


def temp_folder(run_dir: Path, step: int) -> Path:
    """The hidden folder a checkpoint is assembled in; the name is deterministic so every rank can find it."""
    return Path(run_dir) / CHECKPOINTS / f".{checkpoint_name(step)}.tmp"


def write_checkpoint_files(folder: Path, spec: JobSpec, model_state: dict[str, torch.Tensor], state: dict[str, Any],
                           training_state: dict[str, Any] | None = None) -> None:
    """spec.yaml, model.pt (fp32 CPU tensors), state.json and optionally training.pt into an existing folder."""
    (folder / "spec.yaml").write_text(dump_spec(spec))
    cpu = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype) for k, v in model_state.items()}
    torch.save(cpu, folder / "model.pt")
    if training_state is not None:
        torch.save(training_state, folder / "training.pt")
    (folder / "state.json").write_text(json.dumps(state, indent=1))


def commit_folder(tmp: Path, folder: Path) -> Path:
    """Rename a complete temporary folder to its final name (replacing an older one of the same step)."""
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    return folder


def write_model_checkpoint(folder: Path, spec: JobSpec, model: nn.Module, state: dict | None = None) -> Path:
    """Write spec.yaml, model.pt and state.json into `folder` atomically (temp folder, then rename)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write_checkpoint_files(tmp, spec, model.state_dict(), state or {})
        commit_folder(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def remove_stale_temp_folders(run_dir: Path) -> None:
    """Leftovers of checkpoints whose writing was interrupted (a crash or a kill mid-save)."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for tmp in root.glob(".step-*"):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


def update_best(run_dir: Path, name: str, metrics: dict[str, float], metric: str | None, mode: str) -> bool:
    """Record `name` in best.json if its `metric` beats the recorded best; returns whether it did."""
    if metric is None or metric not in metrics or not math.isfinite(metrics[metric]):
        return False
    value = float(metrics[metric])
    best = read_best(run_dir)
    if best is not None and (Path(run_dir) / CHECKPOINTS / best["checkpoint"]).is_dir():
        better = value < best["value"] if mode == "min" else value > best["value"]
        if not better:
            return False
    record = {"checkpoint": name, "metric": metric, "value": value, "mode": mode, "step": metrics.get("step")}
    files.write_json(Path(run_dir) / CHECKPOINTS / BEST, record)
    return True


def prune_checkpoints(run_dir: Path, keep_last: int) -> list[Path]:
    """Delete all complete checkpoints but the last `keep_last` and the best; returns what was deleted."""
    found = list_checkpoints(run_dir)
    best = read_best(run_dir)
    protected = {p.name for p in found[-keep_last:]} | ({best["checkpoint"]} if best else set())
    removed = [p for p in found if p.name not in protected]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


# ----------------------------------------------------------------------------------------------------------------
# Reading trained models back


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a run directory (best if recorded, else latest) or a checkpoint folder itself."""
    path = Path(path)
    if (path / "model.pt").is_file() and (path / "spec.yaml").is_file():
        return path
    if not path.exists():
        raise UserError(f"{path}: no such run directory or checkpoint")
    best = path / CHECKPOINTS / BEST
    if best.is_file():
        chosen = path / CHECKPOINTS / _best_checkpoint_name(best)
        if (chosen / "model.pt").is_file():
            return chosen
    found = list_checkpoints(path)
    if not found:
        raise UserError(f"{path}: no checkpoint found (expected {CHECKPOINTS}/step-*/model.pt); has the run saved one yet?")
    return found[-1]


def _best_checkpoint_name(best: Path) -> str:
    try:
        name = json.loads(best.read_text())["checkpoint"]
    except (ValueError, KeyError, TypeError) as err:  # hand-edited: JSONDecodeError/UnicodeDecodeError are ValueErrors
        raise UserError(f"{best}: unreadable ({type(err).__name__}: {err}); fix it, or delete it to use the latest "
                        "checkpoint") from None
    if not isinstance(name, str) or Path(name).name != name:
        raise UserError(f"{best}: checkpoint {name!r} is not a folder name in {best.parent}; fix it, or delete it "
                        "to use the latest checkpoint")
    return name


def _load_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as err:
        # only the type: torch's own text for these suggests weights_only=False, which must not be followed here
        raise UserError(f"{file}: not a readable model checkpoint ({type(err).__name__}); the file is truncated or "
                        "corrupt: use another checkpoint folder of the run") from None


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    folder = resolve_checkpoint(path)
    return _load_weights(folder / "model.pt")


def load_trained(path: str | Path) -> tuple[JobSpec, nn.Module]:
    """Rebuild a trained model (eval mode, CPU) from a run directory or checkpoint folder, with no other input."""
    folder = resolve_checkpoint(path)
    try:
        spec = load_job(folder / "spec.yaml")
    except SpecError as err:
        raise UserError(f"{folder}/spec.yaml is not a valid job spec:\n{err}") from None
    model = build_model(spec)
    state = _load_weights(folder / "model.pt")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"{folder}/model.pt does not match the model built from its spec.yaml "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    model.eval()
    return spec, model


# ----------------------------------------------------------------------------------------------------------------
# A failure the workers record for the driver


def record_failure(run_dir: Path, message: str) -> None:
    """A deterministic training error (e.g. a non-finite loss) for the driver to report; cleared at the next start."""
    files.write_json(Path(run_dir) / FAILURE, {"error": message})


def clear_failure(run_dir: Path) -> None:
    (Path(run_dir) / FAILURE).unlink(missing_ok=True)
