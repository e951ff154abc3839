"""Where the start-up of `hepml train` goes, from the process start to the end of the first optimizer step.

Wall-clock marks are taken on the driver (process start, CLI and job file, checks and data planning, embedded Ray) and
on rank 0 (worker group and process group up, model built, data streams open, engine ready, first step done); rank 0
writes the differences once, as a `startup` record of metrics.jsonl (`startup/<phase>_s`, `startup/total_s`), so
every run says what its start-up cost and `benchmarks/train.py` tabulates it. Driver and rank 0 share a clock on one
machine; on a cluster the worker phases also hold the clock offset between the nodes (small under NTP).
"""

from __future__ import annotations

import time

import psutil

PHASES: dict[str, str] = {
    "cli": "Python, imports of the CLI and the engine, the job file",
    "plan": "job checked against this machine, data planned, run directory written",
    "ray": "embedded Ray started, or the cluster joined (cluster.launcher ray only)",
    "workers": "worker group (Ray Train's, or forked from the fork server) and torch process group",
    "model": "model built (pretrained weights, frozen modules)",
    "data": "data streams planned and opened",
    "engine": "engine: DDP/DeepSpeed wrap, optimizer, schedule, resume point, tracker",
    "first_step": "first batch loaded and the first optimizer step done",
}
"""Each phase ends at the mark of its name; the first starts when the `hepml` process started."""


class StartupClock:
    """Marks in the order the phases end; travels from the driver to rank 0 in the train loop config."""

    def __init__(self, marks: dict[str, float] | None = None):
        self.marks: dict[str, float] = dict(marks or {})

    @classmethod
    def from_process_start(cls) -> StartupClock:
        return cls({"start": psutil.Process().create_time()})

    def mark(self, phase: str) -> None:
        self.marks[phase] = time.time()

    def record(self) -> dict[str, float]:
        """{startup/<phase>_s: seconds} for consecutive marks, and the total from the first mark to the last."""
        names = list(self.marks)
        record = {f"startup/{b}_s": round(self.marks[b] - self.marks[a], 3) for a, b in zip(names, names[1:])}
        if len(names) > 1:
            record["startup/total_s"] = round(self.marks[names[-1]] - self.marks[names[0]], 3)
        return record
