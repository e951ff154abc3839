"""The MLPF part of `hepml report`: jet and MET response of MLPF next to the rule-based particle flow
(`mlpf_baseline.py`), and per-class particle efficiency, fake rate and response (`mlpf_particles.py`), overall and
per process, from what `hepml evaluate` stored in metrics.json's `mlpf`."""

from __future__ import annotations

import html
import math

import matplotlib.pyplot as plt
import mplhep
import numpy as np
from matplotlib.ticker import NullFormatter

from hepml_dist.errors import UserError
from hepml_dist.evaluate import mlpf
from hepml_dist.evaluate.mlpf_particles import PARTICLE_PT_BINS
from hepml_dist.evaluate.report_html import Section

PANELS = (
    ("jet_response_vs_pt", "median", "jet response median", r"gen-jet $p_T$ [GeV]"),
    ("jet_response_vs_pt", "iqr_over_median", "jet response IQR / median", r"gen-jet $p_T$ [GeV]"),
    ("met_response_vs_met", "median", "MET response median", "gen MET [GeV]"),
    ("met_response_vs_met", "iqr_over_median", "MET response IQR / median", "gen MET [GeV]"),
)
TABLE_ROWS = (("jet_response_median", "jet response median"), ("jet_resolution", "jet response IQR / median"),
              ("jet_match_fraction", "gen jets matched"), ("met_response_median", "MET response median"),
              ("met_resolution", "MET response IQR / median"))


def _stored_results(run) -> dict:
    results = run.evaluation.get("mlpf")
    if not isinstance(results, dict):
        raise UserError(f"{run.path}/metrics.json has no MLPF jet and MET response (`mlpf`): it was written by an "
                        f"older `hepml evaluate`; run `hepml evaluate {run.path}` again, then `hepml report`")
    return results


def response_figure(results: dict, title: str):
    """2 x 2 panels (jet median, jet IQR/median vs gen-jet pT; the same for MET) with MLPF, rule-based PF, target."""
    with plt.style.context(mplhep.style.CMS):
        figure, axes = plt.subplots(2, 2, figsize=(14, 11))
        for ax, (key, stat, ylabel, xlabel) in zip(axes.ravel(), PANELS):
            series = mlpf.response_series(results, key, stat)
            if not series:
                ax.text(0.5, 0.5, "no matched jets / events", ha="center", transform=ax.transAxes)
                continue
            for label, binned in series.items():
                edges = np.array(binned["edges"], dtype=float)
                centers = np.sqrt(edges[1:] * edges[:-1])
                xerr = [centers - edges[:-1], edges[1:] - centers]
                ax.errorbar(centers, np.array(binned[stat], dtype=float), xerr=xerr, fmt="o", label=label)
            if stat == "median":
                ax.axhline(1.0, color="grey", lw=0.8, ls="--")
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # labelled minor ticks overlap on short log ranges
            ax.set_xlabel(xlabel, fontsize=16)
            ax.set_ylabel(ylabel, fontsize=16)
            ax.legend(fontsize=13)
        figure.suptitle(title, fontsize=16)
    return figure


def _number(value) -> str:
    return "&ndash;" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


def _table(scopes: dict[str, dict]) -> str:
    head = "".join(f"<th>{label}</th>" for label in mlpf.SERIES_LABELS.values())
    rows = []
    for scope, results in scopes.items():
        for key, label in TABLE_ROWS:
            cells = "".join(f'<td class="num">{_number(results.get(mlpf.collection_key(c, key)))}</td>'
                            for c in mlpf.SERIES_LABELS)
            rows.append(f"<tr><th>{html.escape(scope)}: {label}</th>{cells}</tr>")
    return f"<table><tr><th>test split</th>{head}</tr>{''.join(rows)}</table>"


def mlpf_sections(run, figures) -> list[Section]:
    """Two sections: jet / MET response (a table and a figure for all events and for each process), and the
    per-class particle performance (`particle_sections`)."""
    results = _stored_results(run)
    scopes = {f"all ({results.get('events', '?')} events)": results}
    scopes |= {f"{name} ({r.get('events', '?')} events)": r for name, r in results.get("per_process", {}).items()}
    images = []
    for (scope, numbers), tag in zip(scopes.items(), ["all", *results.get("per_process", {})]):
        figure = response_figure(numbers, f"$e^+e^-$ 380 GeV, {scope}")
        images.append((figures.png(figure, f"mlpf_response_{tag}"),
                       f"{scope}: median and IQR / median of the jet response (matched jets) in bins of gen-jet pT "
                       "and of the MET response in bins of gen MET, for MLPF, the rule-based PF and the target "
                       "particles (the ceiling of the target definition)."))
    text = ("Jets: e<sup>+</sup>e<sup>&minus;</sup> anti-k<sub>T</sub> (FastJet ee_genkt, p = &minus;1), R = 0.4, "
            "p<sub>T</sub> &gt; 5 GeV, from MLPF's predicted particles, from the rule-based particle flow of the input "
            "elements (each track a charged hadron; clusters not linked to a track, or their energy beyond the linked "
            "tracks' momenta, a photon or neutral hadron), and from the target particles. Each generator jet is "
            "matched to its nearest jet at &Delta;R &lt; 0.1; response = p<sub>T</sub> reco / p<sub>T</sub> gen. "
            "MET = |&Sigma; p<sub>T</sub>|, response MET / gen MET for gen MET &ge; 10 GeV. Lower IQR / median "
            "is better.")
    response = Section("MLPF: jet and MET response vs the rule-based particle flow", "mlpf-response", text, images,
                       _table(scopes))
    return [response, *particle_sections(run, figures)]


# ----------------------------------------------------------------------------------------------------------------------
# Per-class particles (mlpf_particles.py): efficiency, fake rate, pT response, element by element

PARTICLE_LABELS = {"mlpf": "MLPF", "baseline": "rule-based PF"}
PARTICLE_PANELS = (
    ("efficiency_vs_pt", "value", "efficiency (same class)", r"target $p_T$ [GeV]"),
    ("fake_rate_vs_pt", "value", "fake rate (no target)", r"predicted $p_T$ [GeV]"),
    ("pt_response_vs_pt", "median", r"$p_T$ response median", r"target $p_T$ [GeV]"),
    ("pt_response_vs_pt", "iqr_over_median", r"$p_T$ response IQR / median", r"target $p_T$ [GeV]"),
)
PARTICLE_COLUMNS = (("efficiency",), ("efficiency_any",), ("fake_rate",), ("misid_rate",),
                    ("pt_response", "median"), ("pt_response", "iqr_over_median"),
                    ("energy_response", "median"), ("energy_response", "iqr_over_median"))
PARTICLE_HEADS = ("efficiency", "efficiency, any class", "fake rate", "misid. rate", "pT response median",
                  "pT IQR / median", "E response median", "E IQR / median")


def particle_figure(particles: dict[str, dict[str, dict]], title: str):
    """Rows: efficiency, fake rate, pT response median and IQR / median vs pT; one column per particle class."""
    classes = list(next(iter(particles.values())))
    with plt.style.context(mplhep.style.CMS):
        figure, axes = plt.subplots(len(PARTICLE_PANELS), len(classes), figsize=(4.6 * len(classes), 15),
                                    squeeze=False)
        for row, (key, stat, ylabel, xlabel) in enumerate(PARTICLE_PANELS):
            for col, name in enumerate(classes):
                ax = axes[row, col]
                for collection, label in PARTICLE_LABELS.items():
                    binned = particles.get(collection, {}).get(name, {}).get(key)
                    if binned is None:
                        continue
                    edges = np.array(binned["edges"], dtype=float)
                    centers = np.sqrt(edges[1:] * edges[:-1])
                    values = np.array(binned[stat], dtype=float)
                    yerr = np.array(binned["error"], dtype=float) if "error" in binned else None
                    if np.isfinite(values).any():
                        ax.errorbar(centers, values, xerr=[centers - edges[:-1], edges[1:] - centers], yerr=yerr,
                                    fmt="o", ms=4, label=label)
                if stat == "median":
                    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
                ax.set_xscale("log")
                ax.set_xlim(PARTICLE_PT_BINS[0], PARTICLE_PT_BINS[-1])  # also for panels with nothing to draw
                ax.xaxis.set_minor_formatter(NullFormatter())
                ax.tick_params(labelsize=11)
                ax.set_xlabel(xlabel, fontsize=12)
                ax.set_ylabel(ylabel, fontsize=12)
                if row == 0:
                    ax.set_title(name.replace("_", " "), fontsize=14)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=10)
        figure.suptitle(title, fontsize=16)
    return figure


def _particle_table(scopes: dict[str, dict]) -> str:
    head = "".join(f'<th colspan="2">{h}</th>' for h in PARTICLE_HEADS)
    sub = "".join(f"<th>{label}</th>" for _ in PARTICLE_HEADS for label in PARTICLE_LABELS.values())
    rows = []
    for scope, particles in scopes.items():
        for name in next(iter(particles.values())):
            cells = []
            for path in PARTICLE_COLUMNS:
                for collection in PARTICLE_LABELS:
                    value = particles.get(collection, {}).get(name)
                    for key in path:
                        value = None if value is None else value[key]
                    cells.append(f'<td class="num">{_number(value)}</td>')
            targets = particles["mlpf"][name]["targets"] if "mlpf" in particles else "?"
            rows.append(f"<tr><th>{html.escape(scope)}: {html.escape(name)} ({targets})</th>{''.join(cells)}</tr>")
    return (f"<table><tr><th rowspan=\"2\">test split: class (target particles)</th>{head}</tr><tr>{sub}</tr>"
            f"{''.join(rows)}</table>")


def particle_sections(run, figures) -> list[Section]:
    """Per-class particle efficiency, fake rate and pT / energy response: a table, and a figure for all events and
    for each process (nothing for metrics.json written before the particle evaluation existed)."""
    results = _stored_results(run)
    if "particles" not in results:
        return []
    scopes = {f"all ({results.get('events', '?')} events)": results["particles"]}
    scopes |= {f"{name} ({r.get('events', '?')} events)": r["particles"]
               for name, r in results.get("per_process", {}).items() if "particles" in r}
    images = []
    for (scope, particles), tag in zip(scopes.items(), ["all", *results.get("per_process", {})]):
        figure = particle_figure(particles, f"$e^+e^-$ 380 GeV, {scope}: particles per class")
        images.append((figures.png(figure, f"mlpf_particles_{tag}"),
                       f"{scope}: per class, the efficiency vs target pT, the fake rate vs predicted pT and the "
                       "median and IQR / median of the pT response vs target pT, MLPF and the rule-based PF."))
    text = ("Each input element carries at most one target and one reconstructed particle (particleflow's "
            "element-to-particle correspondence), so target and reconstructed particle are compared element by "
            "element. Efficiency of class c: share of the elements with a target of class c reconstructed as class "
            "c (any class: as any particle). Fake rate: share of the particles reconstructed as class c whose "
            "element has no target particle (misid. rate: whose target is another class). Response: reconstructed "
            "/ target pT (E) on the elements with a target of class c and any reconstructed particle. The rule-based "
            "PF makes only charged hadrons, photons and neutral hadrons.")
    return [Section("MLPF: particle efficiency, fake rate and response per class", "mlpf-particles", text, images,
                    _particle_table(scopes))]
