"""Checkpoints: self-describing folders (spec + weights + training state), written atomically.

Layout (see docs/architecture.md): RUN_DIR/checkpoints/step-NNNNNNNN/{spec.yaml, model.pt, training.pt, state.json}.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from hepml_dist.errors import UserError
from hepml_dist.spec import JobSpec, SpecError, dump_spec, load_job

CHECKPOINTS = "checkpoints"
BEST = "best.json"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def write_model_checkpoint(folder: Path, spec: JobSpec, model: nn.Module, state: dict | None = None) -> Path:
    """Write spec.yaml, model.pt and state.json into `folder` atomically (temp folder, then rename)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        (tmp / "spec.yaml").write_text(dump_spec(spec))
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp / "model.pt")
        (tmp / "state.json").write_text(json.dumps(state or {}, indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temp folders of interrupted writes are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / "model.pt").is_file())


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
