"""Profiling of a few training steps (`training.profile`): torch.profiler on every rank, and a table of where each
millisecond of a step goes.

The training step marks its phases with `phase(name)` (a `torch.profiler.record_function`, a few microseconds when
no profiler runs). `StepProfiler` runs the profiler from the end of step `start_step - 1` to the end of the last
profiled step, so the wait for each profiled step's batch is inside, and writes RUN_DIR/profile/rank<r>.txt, .json
and .trace.json (a Chrome trace for ui.perfetto.dev). Each rank profiles itself; nothing here is a collective.
"""

import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from hepml_dist import files
from hepml_dist.spec.training import ProfileSpec

# The phases of one optimizer step, in the order they happen (train_step and LogWindow.timed mark them).
PHASES = ("data_wait", "to_device", "forward", "losses", "step_flags", "backward", "optimizer")
PREFIX = "hepml/"
TOP_OPERATORS = 20


def phase(name: str) -> record_function:
    """The profiler range of one phase of a step (see PHASES)."""
    return record_function(PREFIX + name)


class StepProfiler:
    """Profiles optimizer steps start_step .. start_step + steps - 1 of this rank; `after_step` after every step."""

    def __init__(self, spec: ProfileSpec, run_dir: Path, rank: int, device: torch.device, step: int):
        self.first, self.last = spec.start_step, spec.start_step + spec.steps - 1
        self.enabled = spec.steps > 0 and step < self.first  # a run resumed past the window profiles nothing
        self.folder, self.rank, self.device = Path(run_dir) / "profile", rank, device
        self.profiler: profile | None = None
        self.started_at, self.start_step = 0.0, 0
        self.after_step(step)  # a window that starts right here (start_step 1, or a resume just before it)

    def after_step(self, step: int) -> str | None:
        """`step` optimizer steps are done; returns a one-line summary when the profile has just been written."""
        if not self.enabled:
            return None
        if self.profiler is None and step == self.first - 1:
            self._start(step)
        elif self.profiler is not None and step >= self.last:
            return self._finish(step)
        return None

    def close(self, step: int) -> str | None:
        """The run ends (or stops) while profiling: write what was profiled."""
        if self.profiler is not None and step > self.start_step:
            return self._finish(step)
        return None

    def _start(self, step: int) -> None:
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.profiler = profile(activities=activities)
        self.profiler.__enter__()
        self.started_at, self.start_step = time.perf_counter(), step

    def _finish(self, step: int) -> str:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the last step's kernels belong to its wall time
        wall = time.perf_counter() - self.started_at
        profiler, self.profiler, self.enabled = self.profiler, None, False
        profiler.__exit__(None, None, None)
        steps = step - self.start_step
        summary = summarize(profiler.key_averages(), wall, steps, self.start_step + 1)
        self.folder.mkdir(parents=True, exist_ok=True)
        stem = self.folder / f"rank{self.rank}"
        files.write_json(stem.with_suffix(".json"), summary)
        with files.replacing(stem.with_suffix(".txt")) as tmp:
            tmp.write_text(format_summary(summary))
        with files.replacing(stem.with_suffix(".trace.json")) as tmp:
            profiler.export_chrome_trace(str(tmp))
        phases = ", ".join(f"{name.replace('_', ' ')} {ms:.1f}" for name, ms in summary["phases_ms"].items())
        return (f"profile of steps {summary['first_step']}-{summary['last_step']} written to {stem}.txt: "
                f"{summary['wall_ms']:.1f} ms per step ({phases}, rest {summary['rest_ms']:.1f} ms)")


def summarize(events: Any, wall_s: float, steps: int, first_step: int) -> dict[str, Any]:
    """Milliseconds per step in each phase (CPU wall time of its ranges), the rest, and the top operators."""
    per_step = 1e-3 / steps  # profiler times are in microseconds
    by_key = {e.key: e for e in events}
    phases = {name: by_key[PREFIX + name].cpu_time_total * per_step if PREFIX + name in by_key else 0.0
              for name in PHASES}
    wall_ms = wall_s * 1e3 / steps
    operators = sorted((e for e in events if not e.key.startswith(PREFIX)), key=lambda e: e.self_cpu_time_total,
                       reverse=True)[:TOP_OPERATORS]
    return {
        "first_step": first_step,
        "last_step": first_step + steps - 1,
        "steps": steps,
        "threads": torch.get_num_threads(),
        "wall_ms": wall_ms,
        "phases_ms": phases,
        "rest_ms": max(0.0, wall_ms - sum(phases.values())),
        "operators": [{"name": e.key, "self_cpu_ms": e.self_cpu_time_total * per_step, "calls": e.count / steps,
                       **({"device_ms": e.device_time_total * per_step} if getattr(e, "device_time_total", 0) else {})}
                      for e in operators],
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The rank<r>.txt table."""
    wall = max(summary["wall_ms"], 1e-9)
    lines = [f"Steps {summary['first_step']}-{summary['last_step']} ({summary['steps']} steps, "
             f"{summary['threads']} torch threads): {wall:.2f} ms per step", "",
             f"{'phase':<12} {'ms/step':>9} {'share':>7}"]
    for name, ms in [*summary["phases_ms"].items(), ("rest", summary["rest_ms"])]:
        lines.append(f"{name:<12} {ms:>9.2f} {ms / wall:>7.1%}")
    lines += ["", "rest: Python between steps, logging, the profiler's own bookkeeping.", "",
              f"{'operator (by own CPU time)':<44} {'ms/step':>9} {'calls/step':>11}"]
    for op in summary["operators"]:
        lines.append(f"{op['name'][:44]:<44} {op['self_cpu_ms']:>9.2f} {op['calls']:>11.1f}")
    return "\n".join(lines) + "\n"
