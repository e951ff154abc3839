"""`hepml data generate`: make a dataset with Pythia 8 and a parametrised detector."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.console import Console

from hepml_dist.cli.options import Fractions
from hepml_dist.data.commands import parse_fractions
from hepml_dist.generate import PROCESS_MODULES, get_process
from hepml_dist.generate.runner import default_workers, generate_dataset

app = typer.Typer()
ProcessName = Literal[tuple(PROCESS_MODULES)]  # the choices shown in --help

PROCESS_HELP = ("fcc-tau (Z->tautau / Z->qq jets, 91.2 GeV), jetclass-lite (13 TeV boosted jets, 5 classes), "
                "jetclass2-lite (13.6 TeV JetClass-II-like jets for Sophon: resonances of any mass, QCD), "
                "clic-events (380 GeV ttbar/qq events for MLPF), events-met (13 TeV ZH(nunu bb) vs backgrounds)")


@app.command()
def generate(
    process: Annotated[ProcessName, typer.Argument(help=PROCESS_HELP, show_default=False)],
    events: Annotated[int, typer.Option("--events", "-n", help="Collision events to generate (all samples).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Dataset directory to write (train/, val/, test/).")],
    seed: Annotated[int, typer.Option(help="Random seed: the same seed gives byte-identical shards.")] = 0,
    workers: Annotated[int | None, typer.Option(help="Worker processes (default: the CPU cores available).")] = None,
    fractions: Fractions = "0.7,0.1,0.2",
    pythia: Annotated[list[str] | None, typer.Option(
        "--pythia", help="Extra Pythia setting for every sample, e.g. 'PartonLevel:MPI = on' (repeatable).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace a dataset already in --out.")] = False,
    classes: Annotated[str | None, typer.Option(
        help="jetclass2-lite: the classes to generate, comma-separated: class names of the jetclass2 schema "
             "(X_bb, X_YY_bbqq, QCD_light, ...), the parts Res2P, Res34P, QCD, or X_bs (not a Sophon class). "
             "Default Res2P,Res34P,QCD.")] = None,
    mass_range: Annotated[str | None, typer.Option(
        help="jetclass2-lite: mass range of the resonance X, lo,hi in GeV (default 15,250).")] = None,
    detector: Annotated[Literal["realistic", "ideal"] | None, typer.Option(
        help="fcc-tau: detector response: realistic (beam spot, tracking efficiency and fakes, particle-flow "
             "confusion, gamma gamma -> hadrons overlay, jet-signed impact parameters) or ideal (resolutions "
             "only). Default realistic.", show_default=False)] = None,
    overlay_rate: Annotated[float | None, typer.Option(
        help="fcc-tau, realistic detector: mean number of soft gamma gamma -> hadrons particles overlaid per "
             "event (default 2).", show_default=False)] = None,
    background_only: Annotated[bool, typer.Option(
        "--background-only", help="fcc-tau: Z -> q qbar events only, from their own random stream (a "
        "background-only test set: add --fractions 0,0,1).")] = False,
) -> None:
    """Generate a dataset with Pythia 8 and a parametrised detector (physics and limits: docs/generators.md)."""
    spec = get_process(process)
    given = (("classes", classes), ("mass_range", mass_range), ("detector", detector),
             ("overlay_rate", None if overlay_rate is None else repr(overlay_rate)),
             ("background_only", "true" if background_only else None))
    options = {name: value for name, value in given if value is not None}
    report = generate_dataset(spec, events, out, seed=seed, workers=workers or default_workers(),
                              splits=parse_fractions(fractions, "--fractions"), pythia_settings=pythia or [],
                              overwrite=overwrite, options=options)
    console = Console()
    manifest = report.manifest
    counts = {split: info.examples for split, info in manifest.splits.items()}
    console.print(f"[bold]{spec.name}[/bold]: {report.events} events -> {report.examples} {spec.example}s "
                  f"({', '.join(f'{k} {v}' for k, v in counts.items())}) in {out}")
    console.print(f"speed: {report.events_per_cpu_second:.0f} events/s per core, "
                  f"{report.examples / max(report.cpu_seconds, 1e-9):.0f} {spec.example}s/s per core; "
                  f"wall {report.wall_seconds:.1f} s")
    for label, names in spec.classes.items():
        merged: dict[int, int] = {}
        for info in manifest.splits.values():
            for value, n in info.class_counts.get(label, {}).items():
                merged[int(value)] = merged.get(int(value), 0) + n
        if label == "label_particle_class":
            merged.pop(0, None)  # padding and elements without a target
        defined = sum(n for v, n in merged.items() if v >= 0)
        if not defined:
            continue
        parts = [f"{names[v] if v < len(names) else v} {100 * n / defined:.1f}%"
                 for v, n in sorted(merged.items()) if v >= 0]
        undefined = f" (label -1 on {merged[-1]} examples)" if merged.get(-1) else ""
        console.print(f"{label}: " + ", ".join(parts) + undefined)
