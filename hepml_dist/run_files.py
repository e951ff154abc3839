"""The small files of a run directory that say where a run stands, read without torch.

Checkpoint folders and their state.json, checkpoints/best.json, the failure file, the stop file and spec.yaml
(layout: `hepml_dist.runs`, which re-exports everything here and adds what needs torch: writing checkpoints, loading
models). Commands that only look at runs (`hepml runs`, and `hepml train` until it has started the processes
launcher's fork server) import this module alone, so they start in a fraction of a second.
"""

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hepml_dist.errors import UserError
from hepml_dist.spec import JobSpec, SpecError, load_job

CHECKPOINTS = "checkpoints"
BEST = "best.json"
FAILURE = "error.json"
STOP_FILE = ".stop-requested"
"""Present while the driver asks the workers of a run to checkpoint and stop (hepml_dist.train.signals)."""


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


def request_stop(run_dir: Path) -> None:
    """Ask the workers of a run to checkpoint and exit (what the driver does on SIGTERM/SIGUSR1)."""
    Path(run_dir, STOP_FILE).touch()


def clear_stop(run_dir: Path) -> None:
    Path(run_dir, STOP_FILE).unlink(missing_ok=True)


def read_run_spec(run_dir: Path, overrides: Sequence[str] = ()) -> JobSpec:
    """The spec a run directory was trained with (RUN_DIR/spec.yaml), with `--set` overrides applied."""
    path = Path(run_dir) / "spec.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir}: no spec.yaml, so not a run directory written by `hepml train`")
    try:
        spec = load_job(path)
    except SpecError as err:
        raise UserError(f"{path}: not a valid job spec ({err.problems[0]})") from None
    return load_job(path, overrides) if overrides else spec  # an override's own error names its field
