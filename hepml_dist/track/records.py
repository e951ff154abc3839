"""What the trackers leave in a run directory for other commands to read back, without torch or Ray.

    RUN_DIR/metrics.jsonl     one JSON object per log call: {"step", "epoch", "time", <metric>: value, ...};
                              the records of `hepml evaluate` also carry "evaluation": <split>
    RUN_DIR/running.json      {"host", "pid", "since"} while a training process logs to the run (its mtime is
                              refreshed at every log call); removed when the tracker closes
    RUN_DIR/tensorboard/      TensorBoard event files (`tensorboard --logdir runs`)
"""

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"
RUNNING_FILE = "running.json"
TENSORBOARD_DIR = "tensorboard"
EVALUATION_KEY = "evaluation"
"""The field that marks the records of `hepml evaluate` (their value: the split) apart from training's."""
SILENT_AFTER_S = 30 * 60
"""A training process on another host that has not logged for this long is taken to be gone (no pid to check)."""


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl (a torn last line from a crash is ignored)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def training_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records the training loop wrote (those of `hepml evaluate` left out)."""
    return [r for r in records if EVALUATION_KEY not in r]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process of that id: alive
        return True
    return True


def training_in_progress(run_dir: str | Path, now: float | None = None) -> bool:
    """Whether a training process is logging to the run: its running.json names a live process of this host, or
    (a process on another host) was refreshed within SILENT_AFTER_S. A process killed without closing its tracker
    leaves the file behind; then this is False."""
    path = Path(run_dir) / RUNNING_FILE
    try:
        mark = json.loads(path.read_text())
        touched = path.stat().st_mtime
    except (OSError, json.JSONDecodeError):
        return False
    if mark.get("host") == platform.node() and isinstance(mark.get("pid"), int):
        return _pid_alive(mark["pid"])
    return (now if now is not None else time.time()) - touched < SILENT_AFTER_S
