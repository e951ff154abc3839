"""`hepml chain validate|run|status|submit|study`: check a chain file, run its stages in dependency order on this
machine (or submit them to SLURM), show where each stage stands, and compare the evaluated runs (docs/omnijet-chain.md)."""

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from hepml_dist.chain.plan import plan_chain
from hepml_dist.chain.run import ChainRunner, status_rows
from hepml_dist.chain.slurm import submit_command
from hepml_dist.chain.study import study_command
from hepml_dist.cli.options import JsonOutput

app = typer.Typer()
chain_app = typer.Typer(
    no_args_is_help=True,
    help="Run a chain of jobs and steps (generate, tokenize, train, evaluate, study) from one file, in dependency order.",
)

ChainFile = Annotated[Path, typer.Argument(help="Chain file (YAML: name, set, stages).")]
Workdir = Annotated[Path | None, typer.Option(
    "--workdir", help="Folder of the chain's state, logs and default outputs (default: the file's workdir, else chains/<name>).")]


@chain_app.command()
def validate(chain: ChainFile, workdir: Workdir = None) -> None:
    """Check a chain file and every job in it (needs, references, shapes of loaded weights); print the plan."""
    plan = plan_chain(chain, workdir)
    table = Table("stage", "kind", "needs", "cpus", "gpus", "command", title=f"{plan.spec.name}: {len(plan.stages)} stages, valid")
    for stage in plan.stages:
        table.add_row(stage.name, stage.kind, ", ".join(stage.needs), str(stage.cpus), str(stage.gpus), " ".join(stage.argv))
    Console(width=200).print(table)


@chain_app.command()
def run(
    chain: ChainFile,
    workdir: Workdir = None,
    max_cpus: Annotated[int | None, typer.Option(
        "--max-cpus", min=1, help="CPU cores the running stages may occupy together (default: this machine's).")] = None,
) -> None:
    """Run the chain's stages in dependency order on this machine; finished stages are skipped, interrupted ones resume."""
    plan = plan_chain(chain, workdir)
    runner = ChainRunner(plan, max_cpus=max_cpus)
    ok = runner.run()
    ending = "all stages done" if ok else f"stopped by {runner.stopping}, rerun to resume" if runner.stopping else "not finished"
    typer.echo(f"chain {plan.spec.name}: {ending}; state in {plan.workdir}/chain-state.json")
    if not ok:
        raise typer.Exit(130 if runner.stopping else 1)


@chain_app.command()
def status(chain: ChainFile, workdir: Workdir = None, as_json: JsonOutput = False) -> None:
    """Table of the chain's stages: state, duration and headline metric."""
    plan = plan_chain(chain, workdir)
    rows = status_rows(plan)
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    table = Table("stage", "kind", "state", "duration", "headline", title=f"{plan.spec.name} ({plan.workdir})")
    colours = {"done": "green", "skipped": "green", "failed": "red", "interrupted": "yellow", "running": "cyan"}
    for row in rows:
        duration = f"{row['duration_s']:.1f} s" if row["duration_s"] is not None else ""
        state = row["state"]
        table.add_row(row["stage"], row["kind"], f"[{colours.get(state, 'white')}]{state}[/]", duration, row["headline"])
    Console(width=160).print(table)



chain_app.command("submit")(submit_command)  # SLURM, one batch job per stage (hepml_dist.chain.slurm)
chain_app.command("study")(study_command)  # the page comparing the evaluated runs (hepml_dist.chain.study)
app.add_typer(chain_app, name="chain")
