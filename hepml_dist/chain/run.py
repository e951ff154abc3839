"""`hepml chain run`: the stages of a chain as `hepml ...` subprocesses, in dependency order, on this machine.

Each stage runs exactly the command line of its PlannedStage (`hepml` is this Python's `-m hepml_dist.cli`), in its
own session, with its output in <workdir>/logs/<stage>.log. A stage starts once everything it needs has finished
and, when other stages are running, only while the CPUs (and GPUs) of all running stages fit the machine (one stage
larger than the machine runs alone). A stage that already finished is skipped: a job whose run directory's latest
checkpoint says `finished`, a step whose output marker exists (a dataset's manifest.json, the evaluated metrics.json,
the report) - unless the chain recorded a different command line for it. An interrupted job resumes: `hepml train`
into the same run directory continues from its latest checkpoint. SIGINT/SIGTERM are passed on to the running
stages once each (a job checkpoints and stops; a second signal stops it at once), and no new stage starts.

<workdir>/chain-state.json (written atomically) holds per stage: state (pending, running, done, skipped, failed,
interrupted, blocked), start and end (UTC), duration_s, returncode, argv and log.
"""

import json
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from hepml_dist import files
from hepml_dist.chain.plan import COMPLETE_MARKER, LOGS, STATE_FILE, ChainPlan, PlannedStage, machine_cpus
from hepml_dist.run_files import latest_checkpoint, read_state

POLL_S = 0.3
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_chain_state(plan: ChainPlan) -> dict[str, Any]:
    path = plan.workdir / STATE_FILE
    if path.is_file():
        try:
            state = json.loads(path.read_text())
            if isinstance(state.get("stages"), dict):
                return state
        except ValueError:
            pass  # an unreadable state file is rebuilt from the outputs
    return {"chain": plan.spec.name, "file": str(plan.path), "stages": {}}


def output_complete(stage: PlannedStage) -> bool:
    """The stage's outputs say it finished (a job: its latest checkpoint is the final one)."""
    if stage.kind == "job":
        latest = latest_checkpoint(Path(stage.outputs["run_dir"]))
        try:
            return latest is not None and bool(read_state(latest).get("finished"))
        except (OSError, ValueError):
            return False
    return COMPLETE_MARKER[stage.kind](stage.outputs).exists()


def finished(stage: PlannedStage, recorded: dict[str, Any] | None) -> bool:
    """Skip the stage: its outputs are complete, and the chain did not record another command line for it."""
    if recorded and recorded.get("argv") not in (None, list(stage.argv)):
        return False
    return output_complete(stage)


def command(stage: PlannedStage) -> list[str]:
    """The stage's argv with `hepml` as this interpreter's hepml, so it runs without the venv on PATH."""
    argv = list(stage.argv)
    return [sys.executable, "-m", "hepml_dist.cli", *argv[1:]] if argv[0] == "hepml" else argv


class ChainRunner:
    """Runs a planned chain; `run()` returns whether every stage is done."""

    def __init__(self, plan: ChainPlan, max_cpus: int | None = None, console: Console | None = None):
        self.plan, self.console = plan, console or Console()
        self.max_cpus = max_cpus or machine_cpus()
        self.max_gpus = torch.cuda.device_count()
        self.state = read_chain_state(plan)
        self.running: dict[str, tuple[subprocess.Popen, Any, float, Any]] = {}
        self.stopping: str | None = None

    # -- bookkeeping ------------------------------------------------------------------------------------------
    def record(self, name: str, **fields: Any) -> None:
        self.state["stages"].setdefault(name, {}).update(fields)
        self.state["updated"] = _now()
        files.write_json(self.plan.workdir / STATE_FILE, self.state)

    def _fits(self, stage: PlannedStage) -> bool:
        if not self.running:
            return True  # a stage larger than the machine runs alone
        used = [self.plan.stage(n) for n in self.running]
        return (sum(s.cpus for s in used) + stage.cpus <= self.max_cpus
                and sum(s.gpus for s in used) + stage.gpus <= self.max_gpus)

    # -- running ----------------------------------------------------------------------------------------------
    def _start(self, stage: PlannedStage, progress: Progress) -> None:
        log_path = self.plan.workdir / LOGS / f"{stage.name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = log_path.open("a")
        log.write(f"== {_now()} {' '.join(stage.argv)}\n")
        log.flush()
        process = subprocess.Popen(command(stage), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)  # signals reach it through the chain only (once)
        task = progress.add_task(f"{stage.name} ({stage.kind})", total=None)
        if not progress.console.is_terminal:  # no live display: one line per event, for logs
            progress.console.print(f"{_now()} {stage.name}: started, log {log_path}")
        self.running[stage.name] = (process, log, time.monotonic(), task)
        self.record(stage.name, state="running", start=_now(), end=None, duration_s=None, returncode=None,
                    argv=list(stage.argv), log=str(log_path))

    def _reap(self, progress: Progress) -> dict[str, str]:
        """The stages that ended since the last call, with how they ended."""
        ended = {}
        for name, (process, log, started, task) in list(self.running.items()):
            code = process.poll()
            if code is None:
                continue
            log.close()
            del self.running[name]
            duration = round(time.monotonic() - started, 2)
            outcome = "done" if code == 0 else ("interrupted" if self.stopping else "failed")
            if outcome == "done" and not output_complete(self.plan.stage(name)):
                outcome = "interrupted"  # e.g. a job stopped by SLURM's SIGUSR1 exits 0 with a checkpoint to resume
            self.record(name, state=outcome, end=_now(), duration_s=duration, returncode=code)
            ended[name] = outcome
            mark = {"done": "[green]done", "failed": "[red]FAILED", "interrupted": "[yellow]interrupted"}[outcome]
            progress.update(task, description=f"{name} {mark}[/] in {duration:.1f} s", total=1, completed=1)
            if not progress.console.is_terminal:
                progress.console.print(f"{_now()} {name}: {outcome} in {duration:.1f} s (exit {code})")
            if outcome == "failed":
                tail = Path(self.state["stages"][name]["log"]).read_text(errors="replace").splitlines()[-15:]
                progress.console.print(f"[red]stage {name} failed (exit {code}); last lines of its log:[/]\n"
                                       + "\n".join(tail))
        return ended

    def _on_signal(self, signum, frame) -> None:
        self.stopping = signal.Signals(signum).name
        for process, *_ in self.running.values():
            if process.poll() is None:
                process.send_signal(signum)

    def run(self) -> bool:
        self.plan.workdir.mkdir(parents=True, exist_ok=True)
        self.state.update(chain=self.plan.spec.name, file=str(self.plan.path), started=_now())
        previous = {s: signal.signal(s, self._on_signal) for s in SIGNALS}
        pending = list(self.plan.stages)
        outcome: dict[str, str] = {}
        try:
            with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                          console=self.console) as progress:
                while pending or self.running:
                    outcome.update(self._reap(progress))
                    for stage in list(pending):
                        if self.stopping:
                            break
                        needs = [outcome.get(n) for n in stage.needs]
                        if any(o in ("failed", "interrupted", "blocked") for o in needs):
                            pending.remove(stage)
                            outcome[stage.name] = "blocked"
                            self.record(stage.name, state="blocked", argv=list(stage.argv))
                            continue
                        if not all(o in ("done", "skipped") for o in needs):
                            continue
                        if finished(stage, self.state["stages"].get(stage.name)):
                            pending.remove(stage)
                            outcome[stage.name] = "skipped"
                            self.record(stage.name, state="skipped", argv=list(stage.argv))
                            progress.console.print(f"[dim]{stage.name}: finished earlier, skipped[/]")
                            continue
                        if self._fits(stage):
                            pending.remove(stage)
                            self._start(stage, progress)
                    if self.stopping and not self.running:
                        break
                    if self.running:
                        time.sleep(POLL_S)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        self.state["ended"] = _now()
        files.write_json(self.plan.workdir / STATE_FILE, self.state)
        return all(outcome.get(s.name) in ("done", "skipped") for s in self.plan.stages)


# ---------------------------------------------------------------------------------------------------------------
# hepml chain status


def headline(stage: PlannedStage) -> str:
    """One number that says how a stage did: a job's first AUC / accuracy / loss of its evaluated metrics.json, else
    its best checkpoint's metric; a dataset's number of examples."""
    if stage.kind == "job":
        run_dir = Path(stage.outputs["run_dir"])
        metrics = _read_json(run_dir / "metrics.json").get("metrics") or {}
        for word in ("auc", "accuracy", "resolution", "loss"):
            name = next((k for k in metrics if word in k and isinstance(metrics[k], (int, float))), None)
            if name:
                return f"{name} {metrics[name]:.4g}"
        best = _read_json(run_dir / "checkpoints" / "best.json")
        return f"{best['metric']} {best['value']:.4g} (best)" if "metric" in best and "value" in best else ""
    if stage.kind in ("generate", "tokenize"):
        splits = _read_json(Path(stage.outputs["out"]) / "manifest.json").get("splits") or {}
        count = sum(n for split in splits.values() for shard in split.get("shards", []) for n in shard.get("chunks", []))
        return f"{count:,} examples" if splits else ""
    return ""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def status_rows(plan: ChainPlan) -> list[dict[str, Any]]:
    """Per stage: state (as recorded, or `done` where the outputs are complete though the chain did not run it),
    duration in seconds, headline metric, and the stage's output."""
    recorded = read_chain_state(plan)["stages"]
    rows = []
    for stage in plan.stages:
        record = recorded.get(stage.name, {})
        state = record.get("state") or ("done" if output_complete(stage) else "pending")
        rows.append({"stage": stage.name, "kind": stage.kind, "state": state, "duration_s": record.get("duration_s"),
                     "headline": headline(stage), "output": next(iter(stage.outputs.values()), "")})
    return rows
