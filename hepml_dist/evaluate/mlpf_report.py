"""The MLPF part of `hepml report`: jet and MET response of MLPF next to the rule-based particle flow
(`mlpf_baseline.py`), overall and per process, from what `hepml evaluate` stored in metrics.json's `mlpf`."""

from __future__ import annotations

import html
import math

import matplotlib.pyplot as plt
import mplhep
import numpy as np
from matplotlib.ticker import NullFormatter

from hepml_dist import runs
from hepml_dist.errors import UserError
from hepml_dist.evaluate import mlpf
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


def require_data(run) -> None:
    """Stop before any work when the evaluated split's data lack what the MLPF evaluation needs."""
    spec = runs.absolute_paths(run.spec)
    mlpf.require_columns(getattr(spec.data, run.split), run.split)


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
    """One section: the response table and a response figure for all events and for each process."""
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
    return [Section("MLPF: jet and MET response vs the rule-based particle flow", "mlpf-response", text, images,
                    _table(scopes))]
