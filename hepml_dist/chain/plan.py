"""A chain file resolved into the command lines that run it, in dependency order.

Outputs get absolute paths (a job's run directory defaults to <workdir>/runs/<stage>, a step's output to
<workdir>/data/<stage>), references are replaced by them, every job stage is loaded with the chain's and its own
overrides (a job that does not load names the stage), and a job whose `training.init_from` is another stage's run
directory is checked against that stage's model: the tensors it would copy (its `init_modules`, as the training
engine selects them) must have the same shapes, compared on models built on the meta device (no memory, no time).
"""

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from math import ceil
from pathlib import Path

import torch

from hepml_dist.chain.spec import (
    ChainError,
    ChainSpec,
    EvaluateStep,
    GenerateStep,
    JobStage,
    ReportStep,
    StudyStep,
    TokenizeStep,
    all_needs,
    override_strings,
    read_chain,
    resolve,
    resolved_stage,
)
from hepml_dist.locations import find_job
from hepml_dist.models import build_model
from hepml_dist.spec import JobSpec, SpecError, load_job

STATE_FILE = "chain-state.json"
LOGS = "logs"


@dataclass(frozen=True)
class PlannedStage:
    name: str
    kind: str  # "job" or the step name
    needs: tuple[str, ...]
    argv: tuple[str, ...]  # the hepml command line that runs it
    outputs: dict[str, str]  # "run_dir"/"out" -> absolute path
    cpus: int
    gpus: int


@dataclass(frozen=True)
class ChainPlan:
    """A validated chain: its file, working directory, the parsed spec and the stages in the order they can run."""

    path: Path
    workdir: Path
    spec: ChainSpec
    stages: tuple[PlannedStage, ...]
    jobs: dict[str, JobSpec]
    """The loaded job spec of every job stage."""

    def stage(self, name: str) -> PlannedStage:
        return next(s for s in self.stages if s.name == name)


def default_workdir(spec: ChainSpec) -> Path:
    return Path(spec.workdir or Path("chains") / spec.name).resolve()


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())


# What each kind of stage makes: name -> (stage, stage name, workdir) -> {output: path}
OUTPUTS: dict[str, Callable[..., dict[str, str]]] = {
    "job": lambda s, name, w: {"run_dir": _absolute(s.run_dir) if s.run_dir else str(w / "runs" / name)},
    "generate": lambda s, name, w: {"out": _absolute(s.out) if s.out else str(w / "data" / name)},
    "tokenize": lambda s, name, w: {"out": _absolute(s.out) if s.out else str(w / "data" / name)},
    "evaluate": lambda s, name, w: {"out": str(Path(_absolute(s.run)) / "metrics.json")},
    "report": lambda s, name, w: {"out": _absolute(s.out) if s.out else str(Path(_absolute(s.run)) / "report.html")},
    "study": lambda s, name, w: {"out": _absolute(s.out) if s.out else str(w / "study")},
}

# The file whose existence says a step finished (a job's run directory says so itself: hepml_dist.chain.run)
COMPLETE_MARKER: dict[str, Callable[[dict[str, str]], Path]] = {
    "generate": lambda o: Path(o["out"]) / "manifest.json",
    "tokenize": lambda o: Path(o["out"]) / "manifest.json",
    "evaluate": lambda o: Path(o["out"]),
    "report": lambda o: Path(o["out"]),
    "study": lambda o: Path(o["out"]) / "study.html",
}


def _optional(flag: str, value: object) -> tuple[str, ...]:
    return () if value is None else (flag, str(value))


def _generate(s: GenerateStep, out: dict[str, str], plan_info: dict) -> tuple[str, ...]:
    workers = s.workers or s.cpus or 1
    return ("hepml", "data", "generate", s.process, "--events", str(s.events), "--out", out["out"], "--seed",
            str(s.seed), "--workers", str(workers), *_optional("--fractions", s.fractions))


def _tokenize(s: TokenizeStep, out: dict[str, str], plan_info: dict) -> tuple[str, ...]:
    return ("hepml", "data", "tokenize", _absolute(s.tokenizer), "--data", _absolute(s.data), "--out", out["out"],
            *_optional("--max-length", s.max_length), *_optional("--where", s.where))


def _evaluate(s: EvaluateStep, out: dict[str, str], plan_info: dict) -> tuple[str, ...]:
    return ("hepml", "evaluate", _absolute(s.run), "--split", s.split, *_optional("--max-batches", s.max_batches))


def _report(s: ReportStep, out: dict[str, str], plan_info: dict) -> tuple[str, ...]:
    return ("hepml", "report", _absolute(s.run), "--out", out["out"], "--baseline" if s.baseline else "--no-baseline")


def _study(s: StudyStep, out: dict[str, str], plan_info: dict) -> tuple[str, ...]:
    runs = plan_info["study_runs"]  # job stage -> run directory; the stage name is the run's <task>-<mode>
    return ("hepml", "chain", "study", *(f"{name}={runs[name]}" for name in s.stages or runs), "--out", out["out"],
            "--title", plan_info["title"])


STEP_COMMANDS: dict[str, Callable[..., tuple[str, ...]]] = {
    "generate": _generate, "tokenize": _tokenize, "evaluate": _evaluate, "report": _report, "study": _study,
}
"""Step kind -> the hepml command line of a (resolved) step."""


def _kind(stage) -> str:
    return "job" if isinstance(stage, JobStage) else stage.step


def job_file(stage: JobStage, chain_path: Path, name: str) -> Path:
    """A job stage's file: relative to the chain file, else looked up by name (hepml_dist.locations)."""
    found = find_job(stage.job, first=chain_path.parent)
    if found is None:
        raise ChainError(str(chain_path), [(f"stages.{name}.job", f"job {stage.job!r} not found (relative to "
                                                                  f"{chain_path.parent}, $HEPML_JOBS_PATH, shipped jobs)")])
    return found.resolve()


def _order(spec: ChainSpec) -> list[str]:
    """Stages in dependency order; among stages ready at the same time, the order of the file."""
    done: list[str] = []
    pending = list(spec.stages)
    while pending:
        ready = next(n for n in pending if all(d in done for d in all_needs(spec, n)))  # no cycles: checked
        done.append(ready)
        pending.remove(ready)
    return done


def plan_chain(path: str | Path, workdir: str | Path | None = None) -> ChainPlan:
    """Read, validate and resolve a chain file; ChainError (exit 2) naming stage and field for any problem."""
    path = Path(path).resolve()
    spec = read_chain(path)
    work = Path(workdir).resolve() if workdir else default_workdir(spec)
    order = _order(spec)
    outputs: dict[str, dict[str, str]] = {}
    resolved = {}
    for name in order:  # an output may depend on an earlier stage's (evaluate: RUN/metrics.json); needs come first
        resolved[name] = resolved_stage(spec.stages[name], outputs)
        outputs[name] = OUTPUTS[_kind(resolved[name])](resolved[name], name, work)
    shared = override_strings(resolve(spec.set, outputs))
    info = {"path": path, "workdir": work, "title": spec.description or spec.name,
            "study_runs": {n: o["run_dir"] for n, o in outputs.items() if "run_dir" in o}}
    problems: list[tuple[str, str]] = []
    jobs: dict[str, JobSpec] = {}
    planned: dict[str, PlannedStage] = {}
    for name in order:
        stage = resolved[name]
        kind = _kind(stage)
        if kind == "job":
            file = job_file(stage, path, name)
            overrides = [*shared, *override_strings(stage.set)]
            try:
                job = jobs[name] = load_job(file, overrides)
            except SpecError as err:
                problems += [(f"stages.{name}.set" if "--set" in p.message else f"stages.{name}.job",
                              f"{Path(p.source).name}: {p.path}: {p.message}") for p in err.problems]
                continue
            p = job.parallel
            argv = ("hepml", "train", str(file), "--run-dir", outputs[name]["run_dir"],
                    *(x for o in overrides for x in ("--set", o)))
            cpus, gpus = ceil(p.num_workers * p.cpus_per_worker), ceil(p.num_workers * p.gpus_per_worker)
        else:
            argv = STEP_COMMANDS[kind](stage, outputs[name], info)
            cpus, gpus = (getattr(stage, "workers", None) or 1) if kind == "generate" else 1, 0
        planned[name] = PlannedStage(name, kind, tuple(all_needs(spec, name)), argv, outputs[name],
                                     stage.cpus if stage.cpus is not None else cpus,
                                     stage.gpus if stage.gpus is not None else gpus)
    problems += check_init_shapes(jobs, outputs)
    if problems:
        raise ChainError(str(path), problems)
    return ChainPlan(path, work, spec, tuple(planned.values()), jobs)


def _source_stage(init_from: str, outputs: dict[str, dict[str, str]], jobs: dict[str, JobSpec]) -> str | None:
    """The job stage whose run directory (or a checkpoint in it) `init_from` names."""
    target = Path(init_from).resolve()
    for name in jobs:
        run_dir = Path(outputs[name]["run_dir"])
        if target == run_dir or run_dir in target.parents:
            return name
    return None


def _shapes(spec: JobSpec) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        return {k: tuple(v.shape) for k, v in build_model(spec).state_dict().items()}


def check_init_shapes(jobs: dict[str, JobSpec], outputs: dict[str, dict[str, str]]) -> list[tuple[str, str]]:
    """Jobs that load another stage's weights: the tensors the engine would copy (names matching `init_modules`,
    all if empty, present in both models) must agree in shape, and at least one must be selected."""
    problems = []
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    for name, job in jobs.items():
        source = _source_stage(job.training.init_from, outputs, jobs) if job.training.init_from else None
        if source is None:
            continue
        for stage in (name, source):
            if stage not in shapes:
                shapes[stage] = _shapes(jobs[stage])
        modules = job.training.init_modules
        selected = {k: v for k, v in shapes[source].items() if not modules or any(re.search(m, k) for m in modules)}
        loadable = {k: v for k, v in selected.items() if k in shapes[name]}
        wrong = [f"{k} {v} in {source} vs {shapes[name][k]} here" for k, v in loadable.items() if v != shapes[name][k]]
        where = f"stages.{name}.training.init_from"
        if wrong:
            problems.append((where, f"stage {source!r}: {len(wrong)} tensor(s) to load have another shape: "
                                    f"{'; '.join(wrong[:4])}; make the sizes agree (the chain's `set`)"))
        elif not loadable:
            problems.append((where, f"stage {source!r}: training.init_modules {modules} select none of its tensors "
                                    "that this model has"))
    return problems


def machine_cpus() -> int:
    """CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
