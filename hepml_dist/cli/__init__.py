"""The `hepml` command line: load and override job specs, and run the service's verbs on them.

The CLI only loads the typed job spec and hands it on; all behaviour lives in the library. Each area of the
service defines its commands in its own `commands.py` (a Typer `app`); the table below says which module serves
which command, and only that module is imported when the command runs (hepml_dist.cli.lazy).
"""

import typer

from hepml_dist import __version__
from hepml_dist.cli.lazy import LazyCommand, lazy_group

DATA_COMMANDS: dict[str, LazyCommand] = {
    "convert": LazyCommand("hepml_dist.data.commands", "Convert ROOT/parquet files into shards. Rerun the same command to resume an interrupted conversion."),
    "generate": LazyCommand("hepml_dist.generate.commands", "Generate a dataset with Pythia 8 and a parametrised detector (physics and limits: docs/generators.md)."),
    "verify": LazyCommand("hepml_dist.data.commands", "Check every shard's size, sha256 and example counts against the manifest; exit 1 naming bad shards."),
    "inspect": LazyCommand("hepml_dist.data.commands", "Counts per split and class, and the range of every column (padding excluded)."),
    "weights": LazyCommand("hepml_dist.data.commands", "Compute Sophon-style flat 2D weights per class group and store them with the dataset."),
    "tokenize": LazyCommand("hepml_dist.omnijet.commands", "Turn a jet dataset into OmniJet token shards with a trained tokenizer (resumes an interrupted run)."),
    "plot": LazyCommand("hepml_dist.data.commands", "Histograms of every stored feature and label, one curve per class, as PNG files."),
}

COMMANDS: dict[str, LazyCommand] = {
    "validate": LazyCommand("hepml_dist.spec.commands", "Check job files; print every problem as `file: field: message`. Exit 0 if all are valid, else 2."),
    "show": LazyCommand("hepml_dist.spec.commands", "Print the fully resolved job (extends and overrides applied) as YAML."),
    "jobs": LazyCommand("hepml_dist.spec.commands", "Table of the jobs in a folder: model family, tasks and parallel strategy."),
    "sample": LazyCommand("hepml_dist.omnijet.commands", "Sample jets from a trained OmniJet-alpha backbone and decode them to constituents (pT, Delta eta, Delta phi)."),
    "train": LazyCommand("hepml_dist.train.commands", "Train a job: DDP or DeepSpeed workers on this machine or a Ray cluster. Re-running it resumes the run."),
    "evaluate": LazyCommand("hepml_dist.evaluate.commands", "Metrics (metrics.json) and plots (plots/*.png) of a trained run on a split."),
    "submit": LazyCommand("hepml_dist.launch.commands", "Submit a job to a running Ray cluster through the Jobs API; prints the submission id."),
    "status": LazyCommand("hepml_dist.launch.commands", "Status of a submitted job: PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."),
    "logs": LazyCommand("hepml_dist.launch.commands", "Logs of a submitted job; --follow streams them until the job ends."),
    "wait": LazyCommand("hepml_dist.launch.commands", "Wait for a submitted job to end; the exit status says how it ended."),
    "stop": LazyCommand("hepml_dist.launch.commands", "Stop a submitted job (its processes get SIGTERM, then SIGKILL); --wait until it has ended."),
    "list": LazyCommand("hepml_dist.launch.commands", "Table of the cluster's jobs: id, status, start, end, entrypoint."),
    "runs": LazyCommand("hepml_dist.track.commands", "Table of the runs under a folder (default runs/): state, step, epoch, best metric, last val_loss, start."),
    "report": LazyCommand("hepml_dist.evaluate.commands", "Write a self-contained HTML report: run facts, training curves, ROC, confusion, response, the baseline."),
    "predict": LazyCommand("hepml_dist.inference.commands", "Run a trained model over shards or raw ROOT/parquet files; write one row per jet or event."),
    "tune": LazyCommand("hepml_dist.tune.commands", "Hyper-parameter search with Ray Tune; the best trial's spec is written as a job YAML."),
    "export": LazyCommand("hepml_dist.inference.commands", "Export trained models for inference (ONNX)."),
    "slurm": LazyCommand("hepml_dist.launch.commands", "Run a job on a SLURM cluster: one Ray node per SLURM node inside the container, `hepml train` on the head."),
    "chain": LazyCommand("hepml_dist.chain.commands", "Run a chain of jobs and steps (generate, tokenize, train, evaluate, study) from one file, in dependency order."),
}

app = typer.Typer(
    cls=lazy_group(COMMANDS, catch_errors=True),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help=f"hepml_dist {__version__}: train transformer models for jets and events on Ray clusters from one job file.",
)
data_app = typer.Typer(
    cls=lazy_group(DATA_COMMANDS),
    no_args_is_help=True,
    help="Make, check and look at datasets: convert, generate, verify, inspect, weights, tokenize, plot.",
)
app.add_typer(data_app, name="data")


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"hepml_dist {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print the version and exit."),
) -> None:
    """hepml_dist: train transformer models for jets and events on Ray clusters from one job file."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
