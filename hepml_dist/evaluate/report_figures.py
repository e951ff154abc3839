"""Figures of the run report (`hepml report`): the transformer and the baseline on the same axes.

Each function takes plain numpy arrays keyed by the model's name and returns a matplotlib Figure in the mplhep
ROOT style, labelled like a simulation plot of a physics group. Statistical uncertainties are drawn wherever a
number is estimated from finitely many jets: Clopper-Pearson (68 %) for efficiencies and rates, bootstrap for
medians and widths. Working points come from `metrics.rejection`, the same numbers as the report's summary and
`metrics.json`; a rejection whose cut passes no background is drawn as an upward arrow (a lower bound). Nothing
here reads files; `report.py` gathers the arrays.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
# mathtext glyph fallbacks of the ROOT style's TeX Gyre font are reported per glyph: not the reader's business
logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
logging.getLogger("matplotlib.mathtext").setLevel(logging.ERROR)

import matplotlib.pyplot as plt  # noqa: E402
import mplhep  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from hepml_dist.evaluate.metrics import binomial, rejection  # noqa: E402

STYLE = mplhep.style.ROOT
# One colour per model, the same in every figure: the network, the baseline, the uncorrected reference.
COLOURS = {"transformer": "#3f90da", "baseline": "#e42536", "reco jet": "#717581"}
FALLBACK_COLOURS = ("#3f90da", "#e42536", "#f89c20", "#964a8b", "#717581", "#92dadd")
MARKERS = {"transformer": "o", "baseline": "s", "reco jet": "^"}
DECAY_MODE_NAMES = {
    "h": r"$h^\pm$", "h_pi0": r"$h^\pm\pi^0$", "h_2pi0": r"$h^\pm{\geq}2\pi^0$", "3h": r"$3h^\pm$",
    "3h_pi0": r"$3h^\pm{\geq}1\pi^0$", "other": "other",
}


def colour(name: str, index: int = 0) -> str:
    return COLOURS.get(name, FALLBACK_COLOURS[index % len(FALLBACK_COLOURS)])


def pretty_class(name: str) -> str:
    return DECAY_MODE_NAMES.get(name, name)


def label_axes(ax, right: str = "", left: str = "Simulation", x: float = 0.0, y: float = 1.015, transform=None) -> None:
    """**hepml_dist** *Simulation* top left and the sample top right, as experiments label their plots."""
    transform = transform or ax.transAxes
    name = ax.text(x, y, "hepml_dist", transform=transform, fontsize=17, fontweight="bold", va="bottom")
    ax.annotate(left, xy=(1, 0), xycoords=name, xytext=(6, 0), textcoords="offset points", fontsize=15,
                fontstyle="italic", va="bottom")
    if right:
        ax.text(1.0, y, right, transform=ax.transAxes, fontsize=13, va="bottom", ha="right")


def integer_steps(ax) -> None:
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))


# ----------------------------------------------------------------------------------------------------------------------
# Training curves


def training_figure(records: Sequence[Mapping[str, Any]], sample: str = "") -> Figure:
    """Losses (training per task and total, validation total), validation scores, learning rate vs step."""
    def series(key: str) -> tuple[np.ndarray, np.ndarray]:
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None and np.isfinite(r[key])]
        return (np.array([p[0] for p in points]), np.array([p[1] for p in points])) if points else (np.array([]),) * 2

    task_losses = sorted({k for r in records for k in r if k.startswith("train_") and k.endswith("_loss")} - {"train_loss"})
    val_scores = sorted({k for r in records for k in r if k.startswith("val_") and (k.endswith("_accuracy") or k.endswith("_auc"))})
    with plt.style.context(STYLE):
        fig, (loss_ax, val_ax, lr_ax) = plt.subplots(3, 1, figsize=(9, 10), sharex=True, height_ratios=[3, 2, 1])
        for i, key in enumerate(task_losses):
            steps, values = series(key)
            loss_ax.plot(steps, values, lw=1.2, alpha=0.8, ls="--", color=FALLBACK_COLOURS[(i + 2) % 6],
                         label=key.removeprefix("train_").removesuffix("_loss") + " (train)")
        steps, values = series("train_loss")
        loss_ax.plot(steps, values, lw=2, color="black", label="total (train)")
        steps, values = series("val_loss")
        loss_ax.plot(steps, values, "o", ms=7, color=COLOURS["baseline"], label="total (validation)")
        loss_ax.set_yscale("log")
        loss_ax.set_ylabel("loss")
        loss_ax.legend(fontsize=11, ncol=2, loc="upper right")
        label_axes(loss_ax, right=sample)
        for i, key in enumerate(val_scores):
            steps, values = series(key)
            val_ax.plot(steps, values, "o-", ms=5, lw=1.5, color=FALLBACK_COLOURS[i % 6],
                        label=key.removeprefix("val_").replace("_", " "))
        val_ax.set_ylabel("validation")
        if val_scores:
            val_ax.legend(fontsize=11, ncol=2, loc="best", framealpha=0.8)
        steps, values = series("lr")
        lr_ax.plot(steps, values, color="black", lw=1.5)
        lr_ax.set_ylabel("learning\nrate", fontsize=20)
        lr_ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:.0e}" if v else "0"))
        lr_ax.set_ylim(0, None)
        lr_ax.set_xlabel("optimizer step")
        integer_steps(lr_ax)
        fig.align_ylabels()
    return fig


# ----------------------------------------------------------------------------------------------------------------------
# Tagging: ROC


def roc_points(labels: np.ndarray, scores: np.ndarray, weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(signal efficiency, background efficiency) along the score, weighted by `weights` if given."""
    fpr, tpr, _ = roc_curve(labels, scores, sample_weight=weights)
    return tpr, fpr


def mark_rejection(ax, x: float, found, marker: str, colour_: str) -> None:
    """A working point: the rejection with its 68 % interval, or an upward arrow from a lower bound."""
    if found.lower_bound:
        ax.annotate("", xy=(x, found.value * 3), xytext=(x, found.value), zorder=5,
                    arrowprops=dict(arrowstyle="-|>", color=colour_, lw=2))
    else:
        ax.errorbar([x], [found.value], yerr=[[found.value - found.low], [found.high - found.value]], color=colour_,
                    lw=1.5, capsize=3, zorder=5, fmt="none")
    ax.plot([x], [found.value], marker, ms=9, color=colour_, mec="black", zorder=6)


def roc_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]], working_points: Sequence[float],
               signal: str = "signal", background: str = "background", sample: str = "") -> Figure:
    """Background rejection vs signal efficiency for each model, working points marked, ratio to the baseline.

    `curves[name] = (labels, discriminant, weights or None)`. The dotted line is the statistical floor: one
    background jet passing. Markers: `metrics.rejection` with its 68 % interval; arrows: lower bounds."""
    with plt.style.context(STYLE):
        fig, (ax, ratio_ax) = plt.subplots(2, 1, figsize=(9, 9), sharex=True, height_ratios=[3, 1])
        grid = np.linspace(0.3, 1.0, 141)
        rejections: dict[str, np.ndarray] = {}
        n_background = 1
        for i, (name, (labels, scores, weights)) in enumerate(curves.items()):
            tpr, fpr = roc_points(labels, scores, weights)
            n_background = max(n_background, int((labels == 0).sum()))
            keep = (fpr > 0) & (tpr >= 0.25)
            ax.plot(tpr[keep], 1 / fpr[keep], lw=2, color=colour(name, i), label=name)
            floor = 1.0 / max(int((labels == 0).sum()), 1)
            rejections[name] = 1.0 / np.maximum(np.interp(grid, tpr, fpr), floor)
            for wp in working_points:
                mark_rejection(ax, wp, rejection(labels, scores, wp, weights), MARKERS.get(name, "o"), colour(name, i))
        ax.axhline(n_background, ls=":", color="grey", lw=1)
        ax.text(0.31, n_background * 1.15, f"1 of {n_background:,} {background}s", color="grey", fontsize=11)
        for wp in working_points:
            ax.axvline(wp, ls="--", color="grey", lw=0.8)
            ratio_ax.axvline(wp, ls="--", color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_ylim(1, n_background * 6)  # room for the arrows of lower bounds
        ax.set_ylabel(f"{background} rejection (1 / efficiency)")
        ax.legend(loc="lower left", fontsize=13)
        label_axes(ax, right=sample)
        names = list(rejections)
        if len(names) >= 2:
            reference = names[1]
            for i, name in enumerate(names):
                ratio_ax.plot(grid, rejections[name] / rejections[reference], lw=2, color=colour(name, i))
            ratio_ax.axhline(1, color="black", lw=0.8)
            ratio_ax.set_ylabel(f"ratio to\n{reference}", fontsize=14)
            ratio_ax.set_yscale("log")
        ratio_ax.set_xlim(0.3, 1.0)
        ratio_ax.set_xlabel(f"{signal} efficiency")
        fig.align_ylabels()
    return fig


def discriminant_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]], signal: str = "signal",
                        background: str = "background", sample: str = "") -> Figure:
    """Distributions of each model's discriminant log(p_signal / p_background) for signal and background, unit area."""
    with plt.style.context(STYLE):
        fig, axes = plt.subplots(1, len(curves), figsize=(7.5 * len(curves), 6.5), squeeze=False)
        for i, (ax, (name, (labels, disc, weights))) in enumerate(zip(axes[0], curves.items())):
            weights = np.ones(len(disc)) if weights is None else np.asarray(weights)
            finite = np.isfinite(disc)
            low, high = np.percentile(disc[finite], [0.5, 99.95])  # a few saturated outliers would squash the rest
            bins = np.linspace(low, high, 60)
            for value, text, style in ((1, signal, dict(histtype="stepfilled", alpha=0.35)),
                                       (0, background, dict(histtype="step", lw=2))):
                pick = finite & (labels == value)
                chosen = np.clip(disc[pick], low, high)
                ax.hist(chosen, bins=bins, weights=weights[pick], density=True, color=colour(name, i) if value else "black",
                        label=f"{text} ({len(chosen):,})", **style)
            ax.set_yscale("log")
            ax.set_xlabel(f"{name}: log(p$_{{{signal}}}$ / p$_{{{background}}}$)")
            ax.set_ylabel("fraction of jets / bin width" if i == 0 else "")
            ax.legend(fontsize=12, loc="upper center")
            label_axes(ax, right=sample if i == len(curves) - 1 else "")
        fig.tight_layout()
    return fig


# ----------------------------------------------------------------------------------------------------------------------
# Decay modes: confusion matrices


def confusion_figure(matrices: Mapping[str, np.ndarray], classes: Sequence[str], sample: str = "") -> Figure:
    """Row-normalised confusion matrices (each true class sums to 100 %), side by side, cells in percent."""
    names = [pretty_class(c) for c in classes]
    k = len(names)
    with plt.style.context(STYLE):
        fig, axes = plt.subplots(1, len(matrices), figsize=(7.2 * len(matrices) + 1, 7.6), squeeze=False,
                                 gridspec_kw={"wspace": 0.12})
        image = None
        for ax, (name, counts) in zip(axes[0], matrices.items()):
            counts = np.asarray(counts, dtype=float)
            fractions = counts / np.clip(counts.sum(axis=1, keepdims=True), 1, None)
            image = ax.imshow(100 * fractions, cmap="Blues", vmin=0, vmax=100)
            for (i, j), value in np.ndenumerate(100 * fractions):
                if counts[i].sum() == 0:
                    continue
                text = f"{value:.1f}" if value >= 0.05 else "0"
                ax.text(j, i, text, ha="center", va="center", fontsize=11, color="white" if value > 55 else "black")
            ax.set_xticks(range(k), names, rotation=40, ha="right", fontsize=13)
            ax.set_yticks(range(k), names if ax is axes[0][0] else [], fontsize=13)
            ax.minorticks_off()
            ax.tick_params(length=0)
            ax.set_xlabel("predicted decay mode", fontsize=15)
            if ax is axes[0][0]:
                ax.set_ylabel("true decay mode", fontsize=15)
            accuracy = np.trace(counts) / max(counts.sum(), 1)
            ax.text(0.5, 1.015, f"{name}: accuracy {100 * accuracy:.1f} %", transform=ax.transAxes, fontsize=14,
                    ha="center", va="bottom", color=colour(name))
        label_axes(axes[0][0], y=1.09)
        if sample:
            axes[0][-1].text(1.0, 1.09, sample, transform=axes[0][-1].transAxes, fontsize=13, va="bottom", ha="right")
        bar = fig.colorbar(image, ax=axes[0].tolist(), fraction=0.025, pad=0.02)
        bar.set_label("fraction of the true class [%]", fontsize=14)
    return fig


# ----------------------------------------------------------------------------------------------------------------------
# Kinematics: response and resolution in bins of pT


LOW_PT_QUANTILE = 0.02
"""pT plots start at this quantile of the jets (rounded down to a bin edge): the few taus far below the jet pT
threshold have responses of order 2 and would crush the scale of every other bin."""


def pt_bins(pt: np.ndarray, width: float = 5.0, minimum: int = 50) -> np.ndarray:
    """Edges every `width` GeV from the LOW_PT_QUANTILE of `pt` up, merging sparse bins at either end."""
    low = np.floor(np.quantile(pt, LOW_PT_QUANTILE) / width) * width
    high = np.ceil(np.quantile(pt, 0.999) / width) * width
    edges = list(np.arange(low, high + width / 2, width))
    while len(edges) > 2 and ((pt >= edges[-2]) & (pt < edges[-1])).sum() < minimum:
        edges.pop(-2)
    while len(edges) > 2 and ((pt >= edges[0]) & (pt < edges[1])).sum() < minimum:
        edges.pop(1)
    return np.array(edges)


def _bootstrap(values: np.ndarray, statistic, rng: np.random.Generator, repeats: int = 40) -> float:
    """Standard deviation of `statistic` over bootstrap resamples (one vectorised draw)."""
    idx = rng.integers(0, len(values), size=(repeats, len(values)))
    return float(np.std(statistic(values[idx], axis=1)))


def median(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    return np.median(values, axis=axis)


def iqr_over_median(values: np.ndarray, axis: int | None = None) -> np.ndarray:
    q25, q50, q75 = np.percentile(values, [25, 50, 75], axis=axis)
    return (q75 - q25) / q50


def binned(pt: np.ndarray, values: np.ndarray, edges: np.ndarray, statistic, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`statistic` of `values` in each pT bin and its bootstrap uncertainty (nan where fewer than 10 entries)."""
    rng = np.random.default_rng(seed)
    which = np.digitize(pt, edges) - 1
    result, error = np.full(len(edges) - 1, np.nan), np.full(len(edges) - 1, np.nan)
    for b in range(len(edges) - 1):
        chosen = values[which == b]
        if len(chosen) >= 10:
            result[b] = float(statistic(chosen))
            error[b] = _bootstrap(chosen[:20000], statistic, rng)
    return result, error


def response_figure(series: Mapping[str, tuple[np.ndarray, np.ndarray]], quantity: str = r"$p_T$",
                    pt_label: str = r"$p_T$ [GeV]", sample: str = "") -> Figure:
    """Median response (top) and resolution IQR / median (bottom) in bins of pT, for each model.

    `series[name] = (pt, response)` with response = predicted / true."""
    all_pt = np.concatenate([pt for pt, _ in series.values()])
    edges = pt_bins(all_pt)
    centres, half = 0.5 * (edges[1:] + edges[:-1]), 0.5 * np.diff(edges)
    with plt.style.context(STYLE):
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 9), sharex=True, height_ratios=[1, 1])
        n = len(series)
        for i, (name, (pt, response)) in enumerate(series.items()):
            shift = (i - (n - 1) / 2) * 0.12 * half  # keep overlapping markers apart
            style = dict(fmt=MARKERS.get(name, "o"), ms=7, color=colour(name, i), capsize=0, lw=1.5, label=name)
            med, med_err = binned(pt, response, edges, median)
            res, res_err = binned(pt, response, edges, iqr_over_median)
            top.errorbar(centres + shift, med, xerr=half, yerr=med_err, **style)
            bottom.errorbar(centres + shift, 100 * res, xerr=half, yerr=100 * res_err, **style)
        top.axhline(1.0, color="black", lw=0.8, ls="--")
        top.set_ylabel(f"median {quantity} response\n(reconstructed / true)", fontsize=16)
        span = max(0.01, float(np.nanmax(np.abs(top.get_ylim()[1] - 1))), float(np.nanmax(np.abs(1 - top.get_ylim()[0]))))
        top.set_ylim(1 - 1.4 * span, 1 + 1.4 * span)
        top.legend(fontsize=13, ncol=len(series), loc="upper center")
        label_axes(top, right=sample)
        bottom.set_ylabel(f"{quantity} resolution\nIQR / median [%]", fontsize=16)
        bottom.set_ylim(0, None)
        bottom.set_xlabel(pt_label)
        fig.align_ylabels()
    return fig


# ----------------------------------------------------------------------------------------------------------------------
# Charge: misidentification rate vs pT


def rate_figure(series: Mapping[str, tuple[np.ndarray, np.ndarray]], ylabel: str, pt_label: str = r"$p_T$ [GeV]",
                sample: str = "") -> Figure:
    """A rate (e.g. charge misidentification) in percent vs pT: `series[name] = (pt, wrong)`, wrong boolean."""
    all_pt = np.concatenate([pt for pt, _ in series.values()])
    edges = pt_bins(all_pt, minimum=200)
    centres, half = 0.5 * (edges[1:] + edges[:-1]), 0.5 * np.diff(edges)
    with plt.style.context(STYLE):
        fig, ax = plt.subplots(figsize=(9, 6.5))
        n_models = len(series)
        for i, (name, (pt, wrong)) in enumerate(series.items()):
            which = np.digitize(pt, edges) - 1
            n = np.bincount(which[(which >= 0) & (which < len(centres))], minlength=len(centres)).astype(float)
            k = np.bincount(which[(which >= 0) & (which < len(centres))], weights=wrong[(which >= 0) & (which < len(centres))],
                            minlength=len(centres))
            rate = np.where(n > 0, k / np.maximum(n, 1), np.nan)
            low, high = binomial(k, n)  # 68 % Clopper-Pearson: asymmetric, and not zero where no jet is wrong
            total = 100 * wrong.mean()
            shift = (i - (n_models - 1) / 2) * 0.12 * half
            ax.errorbar(centres + shift, 100 * rate, xerr=half, yerr=100 * np.array([rate - low, high - rate]),
                        fmt=MARKERS.get(name, "o"), ms=7, color=colour(name, i), lw=1.5,
                        label=f"{name} (all: {total:.2f} %)")
        ax.set_ylim(0, 1.6 * ax.get_ylim()[1])  # room for the legend above the points
        ax.set_ylabel(ylabel)
        ax.set_xlabel(pt_label)
        ax.legend(fontsize=13, loc="upper left")
        label_axes(ax, right=sample)
    return fig
