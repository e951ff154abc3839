"""`hepml runs compare RUN... --metric val_loss --out FILE.png`: one metric of several runs against the optimizer
step, one curve per run, in the mplhep ROOT style of the evaluation plots (hepml_dist.evaluate.plots).

The curves come from each run's metrics.jsonl (training records; a step logged twice, e.g. by a run resumed from
an earlier checkpoint, counts with its last value). Imported only by this command: matplotlib and mplhep take
most of a second to import, and the table of runs needs neither.
"""

import logging
from pathlib import Path
from typing import Annotated

import matplotlib

matplotlib.use("Agg")
logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)  # mplhep styles name fonts we may lack

import matplotlib.pyplot as plt  # noqa: E402
import mplhep  # noqa: E402
import typer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from hepml_dist import files  # noqa: E402
from hepml_dist.errors import UserError  # noqa: E402
from hepml_dist.track.records import read_metrics, training_records  # noqa: E402
from hepml_dist.track.summary import SPEC_FILE  # noqa: E402

STYLE = mplhep.style.ROOT  # as hepml_dist.evaluate.plots
MARKED_BELOW = 40  # curves with fewer points (validation metrics) get a marker on each point
FORMATS = (".png", ".pdf", ".svg")

app = typer.Typer()


def metric_curve(run_dir: Path, metric: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `metric` in a run's training records, by step, the last value of a repeated step."""
    by_step: dict[int, float] = {}
    for record in training_records(read_metrics(run_dir)):
        value = record.get(metric)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and record.get("step") is not None:
            by_step[int(record["step"])] = float(value)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def curves_of(run_dirs: list[Path], metric: str) -> dict[str, tuple[list[int], list[float]]]:
    """The curve of each run, keyed by its label (folder name; the path where two names clash)."""
    names = [d.name for d in run_dirs]
    curves = {}
    for run_dir, name in zip(run_dirs, names):
        steps, values = metric_curve(run_dir, metric)
        if not steps:
            logged = sorted({k for r in training_records(read_metrics(run_dir)) for k in r} - {"step", "epoch", "time"})
            raise UserError(f"{run_dir}: no `{metric}` in its metrics.jsonl; it has: {', '.join(logged) or 'nothing yet'}")
        curves[str(run_dir) if names.count(name) > 1 else name] = (steps, values)
    return curves


def compare_figure(curves: dict[str, tuple[list[int], list[float]]], metric: str, log_y: bool = False) -> Figure:
    with plt.style.context(STYLE):
        fig, ax = plt.subplots(figsize=(9, 6))
        for label, (steps, values) in curves.items():
            ax.plot(steps, values, "o-" if len(steps) < MARKED_BELOW else "-", ms=4, lw=1.8, label=label)
        ax.set_xlabel("optimizer step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        if log_y:
            ax.set_yscale("log")
        ax.legend(fontsize=16, loc="best")
        fig.tight_layout()
    return fig


def resolve_run(path: Path, root: Path) -> Path:
    """A run directory given as a path, or as its name under `root`."""
    for candidate in (path, root / path):
        if (candidate / SPEC_FILE).is_file():
            return candidate
    raise UserError(f"{path}: not a run directory (no spec.yaml there, nor in {root / path}); `hepml runs {root}` "
                    "lists the runs")


@app.command("compare")
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run directories, or names of runs under --root.")],
    metric: Annotated[str, typer.Option("--metric", "-m", help="Metric of metrics.jsonl to draw, e.g. val_loss, "
                                                               "train_loss, val_<task>_auc, lr.")] = "val_loss",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Image to write, .png, .pdf or .svg "
                                                                 "(default compare-<metric>.png).")] = None,
    root: Annotated[Path, typer.Option("--root", help="Where run names are looked up.")] = Path("runs"),
    log_y: Annotated[bool, typer.Option("--log-y", help="Logarithmic y axis.")] = False,
) -> None:
    """Overlay one metric of several runs against the step in one plot (PNG, PDF or SVG), one curve per run."""
    out = out or Path(f"compare-{metric}.png")
    if out.suffix.lower() not in FORMATS:
        raise UserError(f"--out {out}: give a file ending in {', '.join(FORMATS)}")
    curves = curves_of([resolve_run(path, root) for path in runs], metric)
    figure = compare_figure(curves, metric, log_y)
    out.parent.mkdir(parents=True, exist_ok=True)
    with files.replacing(out) as tmp:
        figure.savefig(tmp, format=out.suffix.lower()[1:], dpi=120, bbox_inches="tight")
    plt.close(figure)
    typer.echo(f"{metric} of {len(curves)} runs: {out}")
