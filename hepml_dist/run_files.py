"""The small files of a run directory that say where a run stands, read without torch.

Checkpoint folders and their state.json, checkpoints/best.json and the failure file (layout: `hepml_dist.runs`, which
re-exports everything here and adds what needs torch: writing checkpoints, loading models). Commands that only look
at runs (`hepml runs`) import this module alone, so they start in a fraction of a second.
"""

import json
from pathlib import Path
from typing import Any

CHECKPOINTS = "checkpoints"
BEST = "best.json"
FAILURE = "error.json"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temp folders of interrupted writes are ignored)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / "model.pt").is_file() and (p / "state.json").is_file())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def read_state(folder: Path) -> dict[str, Any]:
    return json.loads((Path(folder) / "state.json").read_text())


def read_best(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / CHECKPOINTS / BEST
    return json.loads(path.read_text()) if path.is_file() else None


def read_failure(run_dir: Path) -> str | None:
    """The deterministic training error the workers recorded (`runs.record_failure`), if any."""
    path = Path(run_dir) / FAILURE
    return json.loads(path.read_text())["error"] if path.is_file() else None
