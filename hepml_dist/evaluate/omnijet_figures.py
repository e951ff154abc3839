"""Histograms and comparison figures shared by the OmniJet-alpha tokenizer and generation evaluations.

Evaluation stores histograms as plain JSON (`histogram`: bin edges and counts per sample), so `hepml report` can
draw them without the jets; `comparison_figure` draws one panel per observable, samples as unit-area step
histograms over a ratio panel to the reference sample, in the report's mplhep style.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from hepml_dist.evaluate import report_figures as rf

BINS = 40


def edges_for(values: np.ndarray, log: bool = False, integer: bool = False, bins: int = BINS) -> np.ndarray:
    """Bin edges over the central 99 % of `values` (log-spaced for `log`, one bin per integer for `integer`)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values) & ((values > 0) if log else True)]
    if not len(values):
        return np.linspace(0.0, 1.0, bins + 1)
    low, high = np.percentile(values, [0.5, 99.5])
    if integer:
        low, high = np.floor(values.min()), np.ceil(values.max())
        step = max(1.0, np.ceil((high - low + 1) / bins))
        return np.arange(low - 0.5, high + step + 0.5, step)
    if high <= low:
        low, high = low - 0.5, high + 0.5
    if log:
        return np.geomspace(low, high, bins + 1)
    return np.linspace(low, high, bins + 1)


def histogram(edges: np.ndarray, samples: Mapping[str, np.ndarray], log: bool = False) -> dict:
    """JSON-ready histograms of several samples on the same `edges` (values outside go to the edge bins)."""
    edges = np.asarray(edges, dtype=np.float64)
    counts = {}
    for name, values in samples.items():
        values = np.asarray(values, dtype=np.float64)
        values = values[np.isfinite(values)]
        counts[name] = np.histogram(np.clip(values, edges[0], edges[-1]), edges)[0].tolist()
    return {"edges": edges.tolist(), "log": log, "counts": counts}


def _density(counts: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    total = max(counts.sum(), 1.0)
    return counts / total / widths, np.sqrt(counts) / total / widths


def draw_comparison(ax, ratio_ax, hist: dict, reference: str, xlabel: str, styles: Mapping[str, dict]) -> None:
    """Unit-area histograms of every sample of `hist` on `ax`; sample / reference with Poisson errors on `ratio_ax`."""
    edges = np.asarray(hist["edges"])
    # log-spaced bins show the fraction per bin (a density per GeV would pile up in the narrow low bins)
    widths = np.ones(len(edges) - 1) if hist.get("log") else np.diff(edges)
    centres = 0.5 * (edges[1:] + edges[:-1]) if not hist.get("log") else np.sqrt(edges[1:] * edges[:-1])
    ref_counts = np.asarray(hist["counts"][reference], dtype=float)
    ref, ref_err = _density(ref_counts, widths)
    for i, (name, counts) in enumerate(hist["counts"].items()):
        density, error = _density(np.asarray(counts, dtype=float), widths)
        style = {"color": rf.colour(name, i), "lw": 2, **styles.get(name, {})}
        label = f"{styles.get(name, {}).get('label', name)} ({int(np.sum(counts)):,})"
        ax.stairs(density, edges, **{**style, "label": label})
        if name == reference:
            relative = np.divide(ref_err, ref, out=np.zeros_like(ref), where=ref > 0)
            relative = np.r_[relative, relative[-1:]]  # step="post" holds the last bin's value to the last edge
            ratio_ax.fill_between(edges, 1 - relative, 1 + relative, step="post", color="grey", alpha=0.3, lw=0)
            continue
        shown = ref > 0
        ratio_ax.errorbar(centres[shown], density[shown] / ref[shown], yerr=error[shown] / ref[shown], fmt="o", ms=3,
                          color=style["color"])
    ratio_ax.axhline(1.0, color="black", lw=0.8)
    ratio_ax.set_ylim(0.0, 2.0)
    ratio_ax.set_ylabel(f"ratio to\n{styles.get(reference, {}).get('label', reference)}", fontsize=12)
    ax.set_ylabel("fraction per bin" if hist.get("log") else "a.u.", fontsize=14)
    ratio_ax.set_xlabel(xlabel, fontsize=15)
    if hist.get("log"):
        ax.set_xscale("log")
    ax.legend(fontsize=10, loc="best")


def comparison_figure(hists: Mapping[str, dict], labels: Mapping[str, str], reference: str,
                      styles: Mapping[str, dict], columns: int = 3, right: str = "") -> Figure:
    """One panel with a ratio panel below for each histogram of `hists` (keyed by observable)."""
    names: Sequence[str] = list(hists)
    rows = (len(names) + columns - 1) // columns
    with plt.style.context(rf.STYLE):
        fig = plt.figure(figsize=(7 * columns, 7.5 * rows))
        # each row: histograms, ratio panels, then an empty spacer that leaves room for the x labels
        grid = fig.add_gridspec(3 * rows, columns, height_ratios=[3, 1, 0.75] * rows, hspace=0.06, wspace=0.32)
        for i, name in enumerate(names):
            row, col = divmod(i, columns)
            ax = fig.add_subplot(grid[3 * row, col])
            ratio_ax = fig.add_subplot(grid[3 * row + 1, col], sharex=ax)
            ax.tick_params(labelbottom=False)
            draw_comparison(ax, ratio_ax, hists[name], reference, labels.get(name, name), styles)
            if i == 0:
                rf.label_axes(ax, right=right)
    return fig


def save_figures(figures: Mapping[str, Figure], plots_dir: Path, prefix: str) -> list[Path]:
    """PNG files `<prefix>_<name>.png` in `plots_dir` (what `hepml evaluate` leaves next to its other plots)."""
    plots_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in figures.items():
        path = plots_dir / f"{prefix}_{name}.png"
        figure.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written
