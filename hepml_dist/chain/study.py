"""The study table at the end of a chain (`hepml chain study`): the models of a pretrain / fine-tune study side by
side, as arXiv:2503.19165 compares OmniJet-alpha's 9 tau models (3 tasks x scratch / frozen / finetune).

Each run is named `<task>-<mode>` (`tagging-scratch`, `decaymode-frozen`, ...; the part after the last `-` is the
mode). From each run directory it reads metrics.json (`hepml evaluate`: `<split>_<model task>_<metric>`) and the
validation losses in metrics.jsonl (the training loop's records), and writes
  OUT/study.html   one self-contained page: the table (rows = task and metric, columns = modes, the best value of a
                   row in bold), the runs, and per task one plot of validation loss vs step with every mode
  OUT/study.md     the same table and notes in markdown, with the plots as OUT/curves-<task>.png
A run that is missing, not evaluated or without validation records shows as such in its cell, with a note.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any

import matplotlib

matplotlib.use("Agg")
logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)  # mplhep styles name fonts we may lack

import matplotlib.pyplot as plt  # noqa: E402
import mplhep  # noqa: E402
import typer  # noqa: E402

from hepml_dist import files  # noqa: E402
from hepml_dist.chain.plan import plan_chain  # noqa: E402
from hepml_dist.errors import UserError  # noqa: E402
from hepml_dist.evaluate.metrics import LOWER_BOUND_SUFFIX, number  # noqa: E402
from hepml_dist.evaluate.report_html import CSS  # noqa: E402
from hepml_dist.track.images import figure_png  # noqa: E402
from hepml_dist.track.records import read_metrics, training_records  # noqa: E402

MODES = ("scratch", "frozen", "finetune")
"""The ways of training of arXiv:2503.19165, in the order of the table's columns (other modes follow)."""
MODE_COLOURS = {"scratch": "#7f7f7f", "frozen": "#3f90da", "finetune": "#e76300"}
CURVE_KEY = "val_loss"


@dataclass(frozen=True)
class MetricRow:
    """A metric the table shows: its name within a model task (a regex), how it reads, which way is better."""

    pattern: str
    label: str  # `{0}`: the pattern's first group
    better: Callable[[list[float]], float] | None
    digits: int


METRIC_ROWS = (
    MetricRow(r"auc", "ROC AUC", max, 4),
    MetricRow(r"rejection_at_(\d+)", "background rejection at {0} % signal efficiency", max, 3),
    MetricRow(r"accuracy", "accuracy", max, 4),
    MetricRow(r"response_median", "response median", None, 4),
    MetricRow(r"resolution", "response resolution (IQR / median)", min, 3),
)
"""What the table reports of each run, in this order (tau ID: AUC and rejection; decay mode: accuracy; kinematics:
pT response and resolution); metrics.json has more (per-class rejections, each target's response)."""


@dataclass
class StudyRun:
    """One named run directory and what was read from it."""

    name: str
    task: str
    mode: str
    path: Path
    split: str = ""
    metrics: dict[tuple[str, str], float] = field(default_factory=dict)  # (model task, metric) -> value
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val_loss)
    state: str = "ok"  # or "missing", "not evaluated"
    notes: list[str] = field(default_factory=list)


def task_and_mode(name: str) -> tuple[str, str]:
    """`tagging-frozen` -> ("tagging", "frozen"); a name without `-` is a task of one run, its mode `run`."""
    task, dash, mode = name.rpartition("-")
    return (task, mode) if dash and task and mode else (name, "run")


def split_metric_names(metrics: dict[str, Any], split: str) -> dict[tuple[str, str], float]:
    """`<split>_<model task>_<metric>` -> {(model task, metric): value}; model tasks are those with a `_loss`."""
    prefix = f"{split}_"
    tasks = sorted((k[len(prefix):-len("_loss")] for k in metrics
                    if k.startswith(prefix) and k.endswith("_loss") and k != f"{split}_loss"), key=len, reverse=True)
    found: dict[tuple[str, str], float] = {}
    for key, value in metrics.items():
        task = next((t for t in tasks if key.startswith(f"{prefix}{t}_")), None)
        if task is not None and isinstance(value, (int, float)):
            found[(task, key[len(prefix) + len(task) + 1:])] = float(value)
    return found


def read_run(name: str, path: Path) -> StudyRun:
    task, mode = task_and_mode(name)
    run = StudyRun(name, task, mode, Path(path))
    if not run.path.is_dir():
        run.state = "missing"
        run.notes.append(f"{name}: run directory {path} does not exist (did its stage run?)")
        return run
    report_path = run.path / "metrics.json"
    try:
        report = json.loads(report_path.read_text())
        run.split = str(report["split"])
        run.metrics = split_metric_names(report["metrics"], run.split)
    except FileNotFoundError:
        run.state = "not evaluated"
        run.notes.append(f"{name}: no metrics.json in {path}: run `hepml evaluate {path}`")
    except (OSError, ValueError, KeyError, TypeError) as err:
        run.state = "not evaluated"
        run.notes.append(f"{name}: {report_path} is unreadable ({err!r}): run `hepml evaluate {path}` again")
    run.curve = [(int(r["step"]), float(r[CURVE_KEY])) for r in training_records(read_metrics(run.path))
                 if isinstance(r.get(CURVE_KEY), (int, float)) and math.isfinite(r[CURVE_KEY]) and "step" in r]
    if not run.curve:
        run.notes.append(f"{name}: no {CURVE_KEY} records in {run.path / 'metrics.jsonl'}: no learning curve")
    return run


def ordered(values: list[str], first: tuple[str, ...] = ()) -> list[str]:
    """Distinct values: those of `first` in its order, then the others as they come."""
    seen = list(dict.fromkeys(values))
    return [v for v in first if v in seen] + [v for v in seen if v not in first]


@dataclass
class Row:
    task: str
    model_task: str
    label: str
    cells: dict[str, str]  # mode -> text
    best: set[str]  # modes with the best value


def table_rows(runs: list[StudyRun], modes: list[str]) -> list[Row]:
    """Per task, one row per reported metric of its runs (METRIC_ROWS order); cells say why a value is absent."""
    rows = []
    for task in ordered([r.task for r in runs]):
        by_mode = {r.mode: r for r in runs if r.task == task}
        model_tasks = ordered([mt for r in by_mode.values() for mt, _ in r.metrics])
        names = {name for r in by_mode.values() for _, name in r.metrics}
        keys = [(mt, name, metric) for mt in model_tasks for metric in METRIC_ROWS
                for name in sorted(names, key=_natural) if re.fullmatch(metric.pattern, name)]
        if not keys:  # nothing evaluated: one row that says so for every mode
            rows.append(Row(task, "", "(no metrics)", {m: _absent(by_mode.get(m)) for m in modes}, set()))
            continue
        for model_task, name, metric in keys:
            values = {m: r.metrics[(model_task, name)] for m, r in by_mode.items() if (model_task, name) in r.metrics}
            finite = [v for v in values.values() if math.isfinite(v)]
            best = set()
            if metric.better and len(finite) > 1:
                target = metric.better(finite)
                best = {m for m, v in values.items() if v == target}
            cells = {}
            for m in modes:
                if m in values:
                    bound = by_mode[m].metrics.get((model_task, name + LOWER_BOUND_SUFFIX)) == 1.0
                    cells[m] = (">= " if bound else "") + number(values[m], metric.digits)
                else:
                    cells[m] = _absent(by_mode.get(m))
            label = metric.label.format(*re.fullmatch(metric.pattern, name).groups())
            rows.append(Row(task, model_task, label, cells, best))
    return rows


def _natural(name: str) -> tuple[str, int]:
    digits = re.search(r"(\d+)$", name)
    return (name[: digits.start()], int(digits.group(1))) if digits else (name, -1)


def _absent(run: StudyRun | None) -> str:
    if run is None:
        return "no run"
    return run.state if run.state != "ok" else "-"


def curves_figure(task: str, runs: list[StudyRun]):  # type: ignore[no-untyped-def]
    """Validation loss against the optimizer step, one line per mode of `task`."""
    with plt.style.context(mplhep.style.ROOT):
        fig, ax = plt.subplots(figsize=(7, 5))
        for run in runs:
            steps, values = zip(*run.curve)
            ax.plot(steps, values, "o-", markersize=3, color=MODE_COLOURS.get(run.mode),
                    label=run.mode)
        if all(v > 0 for run in runs for _, v in run.curve):
            ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("validation loss")
        ax.set_title(task, fontsize=20)
        ax.legend()
    return fig


def _markdown_table(rows: list[Row], modes: list[str]) -> str:
    lines = ["| task | metric | " + " | ".join(modes) + " |", "|---|---|" + "---:|" * len(modes)]
    for row in rows:
        cells = [f"**{row.cells[m]}**" if m in row.best else row.cells[m] for m in modes]
        task = f"{row.task} (`{row.model_task}`)" if row.model_task else row.task
        lines.append(f"| {task} | {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _html_table(rows: list[Row], modes: list[str]) -> str:
    head = "<tr><th>task</th><th>metric</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in modes) + "</tr>"
    body = []
    for row in rows:
        cells = "".join(f'<td class="num{" better" if m in row.best else ""}">{html.escape(row.cells[m])}</td>'
                        for m in modes)
        task = html.escape(row.task) + (f" <code>{html.escape(row.model_task)}</code>" if row.model_task else "")
        body.append(f"<tr><td>{task}</td><td>{html.escape(row.label)}</td>{cells}</tr>")
    return f"<table>{head}{''.join(body)}</table>"


def _runs_facts(runs: list[StudyRun]) -> list[tuple[str, str, str, str, str, str]]:
    return [(r.name, r.task, r.mode, str(r.path), r.split or r.state,
             str(r.curve[-1][0]) if r.curve else "-") for r in runs]


RUN_COLUMNS = ("run", "task", "mode", "run directory", "evaluated on", "last validation step")


def write_study(runs: dict[str, Path], out_dir: Path, title: str) -> Path:
    """Write OUT/study.html and OUT/study.md for the named run directories; returns the HTML page's path."""
    if not runs:
        raise UserError("no runs to compare: name them as NAME=RUN_DIR, e.g. tagging-frozen=runs/tagging-frozen")
    study = [read_run(name, Path(path)) for name, path in runs.items()]
    seen: dict[tuple[str, str], str] = {}
    for run in study:
        other = seen.setdefault((run.task, run.mode), run.name)
        if other != run.name:
            raise UserError(f"runs {other!r} and {run.name!r} are both task {run.task!r}, mode {run.mode!r}: "
                            "name each run <task>-<mode> once")
    modes = ordered([r.mode for r in study], MODES)
    rows = table_rows(study, modes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images: list[tuple[str, str, str]] = []  # (task, file name, base64 png)
    notes = [note for run in study for note in run.notes]
    for task in ordered([r.task for r in study]):
        with_curves = sorted((r for r in study if r.task == task and r.curve),
                             key=lambda r: modes.index(r.mode))
        if not with_curves:
            notes.append(f"{task}: no learning curves (no run of this task has {CURVE_KEY} records)")
            continue
        figure = curves_figure(task, with_curves)
        try:
            png = figure_png(figure, dpi=110)
        finally:
            plt.close(figure)
        name = f"curves-{re.sub(r'[^A-Za-z0-9_.-]+', '_', task)}.png"
        with files.replacing(out_dir / name) as tmp:
            tmp.write_bytes(png)
        images.append((task, name, base64.b64encode(png).decode()))
    splits = sorted({r.split for r in study if r.split})
    split_note = (f"All numbers on the {splits[0]} split" if len(splits) == 1
                  else f"Numbers on the splits {', '.join(splits)} (the runs were evaluated on different splits)"
                  if splits else "No run was evaluated")
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    markdown = [f"# {title}", "", f"Written {generated} by `hepml chain study`. {split_note}, from each run's "
                "metrics.json (`hepml evaluate`); bold: the best mode of a row.", "", _markdown_table(rows, modes), "",
                "## Runs", "", "| " + " | ".join(RUN_COLUMNS) + " |", "|" + "---|" * len(RUN_COLUMNS)]
    markdown += ["| " + " | ".join(f"`{c}`" if i == 3 else c for i, c in enumerate(fact)) + " |"
                 for fact in _runs_facts(study)]
    if images:
        markdown += ["", "## Learning curves", "", "Validation loss against the optimizer step, one line per mode.", ""]
        markdown += [f"![{task}]({name})\n" for task, name, _ in images]
    if notes:
        markdown += ["", "## Notes", "", *(f"- {note}" for note in notes)]
    files.write_text(out_dir / "study.md", "\n".join(markdown) + "\n")
    facts = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in fact) + "</tr>" for fact in _runs_facts(study))
    figures = "".join(f'<figure><img alt="{html.escape(task)}" src="data:image/png;base64,{png}"><figcaption>'
                      f"{html.escape(task)}: validation loss vs optimizer step, one line per mode</figcaption></figure>"
                      for task, _, png in images)
    note_items = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="sub">written {generated} by <code>hepml chain study</code>: {len(study)} runs</p>
<h2 id="table">The models side by side</h2>{_html_table(rows, modes)}
<p class="note">{html.escape(split_note)}, from each run's metrics.json (<code>hepml evaluate</code>). Green: the best
mode of a row.</p>
<h2 id="runs">Runs</h2><table><tr>{''.join(f'<th>{c}</th>' for c in RUN_COLUMNS)}</tr>{facts}</table>
{f'<h2 id="curves">Learning curves</h2>{figures}' if figures else ''}
{f'<h2 id="notes">Notes</h2><ul>{note_items}</ul>' if note_items else ''}
</body></html>
"""
    return files.write_text(out_dir / "study.html", page)


def parse_run_arguments(arguments: list[str]) -> dict[str, Path]:
    """NAME=RUN_DIR arguments -> {name: run dir}."""
    runs: dict[str, Path] = {}
    for argument in arguments:
        name, equals, path = argument.partition("=")
        if not equals or not name or not path:
            raise UserError(f"{argument!r}: write NAME=RUN_DIR, e.g. tagging-frozen=runs/omnijet-tau-tagging-frozen, "
                            "or name one chain file")
        if name in runs:
            raise UserError(f"run name {name!r} given twice")
        runs[name] = Path(path)
    return runs


@dataclass(frozen=True)
class ChainStudy:
    runs: dict[str, Path]
    out: Path
    title: str


def chain_study(chain: Path, workdir: Path | None, out: Path | None) -> ChainStudy:
    """The runs a chain's study step compares (its `stages`, default every job stage) by stage name, its output
    folder (the study step's whose `out` is `out`, else the only one) and the chain's description as title."""
    plan = plan_chain(chain, workdir)
    studies = [stage for stage in plan.stages if stage.kind == "study"]
    wanted = str(out.resolve()) if out else None
    study = next((s for s in studies if s.outputs["out"] == wanted), studies[0] if len(studies) == 1 else None)
    names = list(getattr(plan.spec.stages[study.name], "stages", None) or []) if study else []
    names = names or [stage.name for stage in plan.stages if stage.kind == "job"]
    not_jobs = [name for name in names if name not in plan.jobs]
    if not_jobs:
        raise UserError(f"{chain}: the study compares job stages; {', '.join(not_jobs)} is not one")
    folder = out or (Path(study.outputs["out"]) if study else plan.workdir / "study")
    return ChainStudy({name: Path(plan.stage(name).outputs["run_dir"]) for name in names}, folder,
                      plan.spec.description or plan.spec.name)


def study_command(
    runs: Annotated[list[str], typer.Argument(help="Runs as NAME=RUN_DIR with NAME = <task>-<mode>, e.g. "
                                              "tagging-frozen=runs/omnijet-tau-tagging-frozen; or one chain file: "
                                              "its job stages, named by stage.")],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Folder for study.html, study.md and the plots (default: ./study; for a chain, its "
        "study step's out, else <workdir>/study).")] = None,
    title: Annotated[str | None, typer.Option("--title", help="Title of the page (default: the chain's "
                                                             "description).")] = None,
    workdir: Annotated[Path | None, typer.Option(
        "--workdir", help="With a chain file: the chain's working directory (default: the file's workdir, else "
        "chains/<name>).")] = None,
) -> None:
    """Table of evaluated runs side by side (rows: task and metric, columns: modes) with learning curves per task."""
    if len(runs) == 1 and "=" not in runs[0] and runs[0].endswith((".yaml", ".yml")):
        found = chain_study(Path(runs[0]), workdir, out)
        page = write_study(found.runs, found.out, title or found.title)
    else:
        page = write_study(parse_run_arguments(runs), out or Path("study"), title or "Pretraining study")
    typer.echo(f"wrote {page} and {page.with_name('study.md')}")
