"""Checkpoints: self-describing folders (spec + weights + training state), written atomically.

Layout (see docs/architecture.md): RUN_DIR/checkpoints/step-NNNNNNNN/{spec.yaml, model.pt, training.pt, state.json}
and, for DeepSpeed runs, `deepspeed/` with every rank's shard files instead of training.pt. A checkpoint is written
into a hidden temporary folder (`.step-N.tmp`) by all ranks and renamed by rank 0 once complete, so a folder named
`step-*` is always whole; `checkpoints/best.json` names the best one by the validation metric. Only the last
`keep_last` checkpoints and the best are kept.
"""

import base64
import io
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from hepml_dist.errors import UserError
from hepml_dist.spec import JobSpec, SpecError, dump_spec, load_job

CHECKPOINTS = "checkpoints"
BEST = "best.json"
DEEPSPEED_TAG = "deepspeed"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_checkpoint_files(
    folder: Path,
    spec: JobSpec,
    model_state: dict[str, torch.Tensor],
    state: dict[str, Any],
    training_state: dict[str, Any] | None = None,
) -> None:
    """spec.yaml, model.pt (fp32 CPU tensors), state.json and optionally training.pt into an existing folder."""
    (folder / "spec.yaml").write_text(dump_spec(spec))
    torch.save({k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype) for k, v in model_state.items()}, folder / "model.pt")
    if training_state is not None:
        torch.save(training_state, folder / "training.pt")
    (folder / "state.json").write_text(json.dumps(state, indent=1))


def temp_folder(run_dir: Path, step: int) -> Path:
    """The hidden folder a checkpoint is assembled in; the name is deterministic so every rank can find it."""
    return Path(run_dir) / CHECKPOINTS / f".{checkpoint_name(step)}.tmp"


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


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temp folders of interrupted writes are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / "model.pt").is_file() and (p / "state.json").is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def remove_stale_temp_folders(run_dir: Path) -> None:
    """Leftovers of checkpoints whose writing was interrupted (a crash or a kill mid-save)."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for tmp in root.glob(".step-*"):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


FAILURE = "error.json"


def record_failure(run_dir: Path, message: str) -> None:
    """A deterministic training error (e.g. a non-finite loss) for the driver to report; cleared at the next start."""
    _write_text_atomic(Path(run_dir) / FAILURE, json.dumps({"error": message}))


def read_failure(run_dir: Path) -> str | None:
    path = Path(run_dir) / FAILURE
    return json.loads(path.read_text())["error"] if path.is_file() else None


def clear_failure(run_dir: Path) -> None:
    (Path(run_dir) / FAILURE).unlink(missing_ok=True)


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "state.json").read_text())


def read_best(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / CHECKPOINTS / BEST
    return json.loads(path.read_text()) if path.is_file() else None


def update_best(run_dir: Path, name: str, metrics: dict[str, float], metric: str | None, mode: str) -> bool:
    """Record `name` in best.json if its `metric` beats the recorded best; returns whether it did."""
    if metric is None or metric not in metrics or not np.isfinite(metrics[metric]):
        return False
    value = float(metrics[metric])
    best = read_best(run_dir)
    if best is not None and (Path(run_dir) / CHECKPOINTS / best["checkpoint"]).is_dir():
        better = value < best["value"] if mode == "min" else value > best["value"]
        if not better:
            return False
    record = {"checkpoint": name, "metric": metric, "value": value, "mode": mode, "step": metrics.get("step")}
    _write_text_atomic(Path(run_dir) / CHECKPOINTS / BEST, json.dumps(record, indent=1))
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


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder from a run directory (best if recorded, else latest) or a checkpoint folder itself."""
    path = Path(path)
    if (path / "model.pt").is_file() and (path / "spec.yaml").is_file():
        return path
    if not path.exists():
        raise UserError(f"{path}: no such run directory or checkpoint")
    best = path / CHECKPOINTS / BEST
    if best.is_file():
        chosen = path / CHECKPOINTS / json.loads(best.read_text())["checkpoint"]
        if (chosen / "model.pt").is_file():
            return chosen
    found = list_checkpoints(path)
    if not found:
        raise UserError(f"{path}: no checkpoint found (expected {CHECKPOINTS}/step-*/model.pt); has the run saved one yet?")
    return found[-1]


def load_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    folder = resolve_checkpoint(path)
    return torch.load(folder / "model.pt", map_location="cpu", weights_only=True)


def load_trained(path: str | Path) -> tuple[JobSpec, nn.Module]:
    """Rebuild a trained model from a run directory or checkpoint folder, with no other input."""
    from hepml_dist.models import build_model  # the registry imports torch model code; keep it out of spec loading

    folder = resolve_checkpoint(path)
    try:
        spec = load_job(folder / "spec.yaml")
    except SpecError as err:
        raise UserError(f"{folder}/spec.yaml is not a valid job spec:\n{err}") from None
    model = build_model(spec)
    state = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"{folder}/model.pt does not match the model built from its spec.yaml "
            f"(missing: {missing[:5]}, unexpected: {unexpected[:5]})"
        )
    model.eval()
    return spec, model


# ----------------------------------------------------------------------------------------------------------------
# RNG states travel in state.json as base64 text, one entry per rank.


def _tensor_to_text(t: torch.Tensor) -> str:
    buffer = io.BytesIO()
    torch.save(t, buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def _text_to_tensor(text: str) -> torch.Tensor:
    return torch.load(io.BytesIO(base64.b64decode(text)), weights_only=True)


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": _tensor_to_text(torch.get_rng_state()),
        "numpy": json.dumps(_numpy_state()),
        "python": json.dumps(_python_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_tensor_to_text(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(_text_to_tensor(state["torch"]))
    numpy_state = json.loads(state["numpy"])
    np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_text_to_tensor(s) for s in state["cuda"]])


def _numpy_state() -> list[Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), pos, has_gauss, cached]


def _python_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]
