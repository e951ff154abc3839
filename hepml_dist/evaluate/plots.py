"""Evaluation plots: ROC (background rejection vs signal efficiency), confusion matrices, regression response and
resolution vs pT, and training curves. Each function returns a matplotlib Figure; `make_plots` builds them all.

The numbers drawn are those of `metrics.py`: ROC curves on the log-likelihood ratio, working points from
`metrics.rejection` (an upward arrow where no background passes: a lower bound), weighted quantiles for the
response, all weighted by the example weights where the payload carries them."""

import logging
from typing import Any

import matplotlib

matplotlib.use("Agg")
logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)  # mplhep styles name fonts we may lack

import matplotlib.pyplot as plt  # noqa: E402
import mplhep  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import roc_curve

from hepml_dist.evaluate.metrics import (  # noqa: E402
    SIGNAL_EFFICIENCIES,
    confusion,
    log_probabilities,
    log_ratio,
    rejection,
    response,
    response_numbers,
)
from hepml_dist.spec import JobSpec  # noqa: E402
from hepml_dist.spec.tasks import TaskSpec  # noqa: E402

STYLE = mplhep.style.ROOT
# (top, bottom) axis labels of the response figure by the kinds of its targets (True: a ratio, `log_*`; False: a
# residual, e.g. delta eta): the IQR / median of a residual centred on 0 would be meaningless, so it is its IQR
AXIS_LABELS = {
    frozenset({True}): ("median response (pred / true)", "resolution (IQR / median)"),
    frozenset({False}): ("median residual (pred - true)", "IQR of the residual (pred - true)"),
    frozenset({True, False}): ("median: ratio pred / true,\nresidual pred - true",
                               "ratio: IQR / median,\nresidual: IQR"),
}


def _class_names(task: TaskSpec, k: int) -> list[str]:
    return list(task.classes) if task.classes else [str(i) for i in range(k)]


def roc_figure(task: TaskSpec, log_probs: np.ndarray, labels: np.ndarray, weights: np.ndarray | None = None) -> Figure:
    """Background rejection (log) vs signal efficiency; multiclass: each class against class 0 (ParT convention),
    on log(p_c / p_0). Working points at `SIGNAL_EFFICIENCIES` (binary) or 50 % (multiclass)."""
    names = _class_names(task, log_probs.shape[1])
    w = np.ones(len(labels)) if weights is None else np.asarray(weights, dtype=np.float64)
    with plt.style.context(STYLE):
        fig, ax = plt.subplots(figsize=(7, 6))
        bounds = [0.0]
        for c in range(1, log_probs.shape[1]):
            pick = (labels == 0) | (labels == c)
            if len(np.unique(labels[pick])) < 2:
                continue
            signal, disc = (labels[pick] == c).astype(int), log_ratio(log_probs[pick], c, 0)
            fpr, tpr, _ = roc_curve(signal, disc, sample_weight=w[pick])
            keep = fpr > 0
            line = ax.plot(tpr[keep], 1.0 / fpr[keep], label=f"{names[c]} vs {names[0]}")[0]
            for eff in SIGNAL_EFFICIENCIES if log_probs.shape[1] == 2 else (0.5,):
                found = rejection(signal, disc, eff, w[pick])
                bounds.append(found.value if found.lower_bound else 0.0)
                if found.lower_bound:  # no background passes: an upward arrow from the background count
                    ax.annotate("", xy=(eff, found.value * 3), xytext=(eff, found.value),
                                arrowprops=dict(arrowstyle="-|>", color=line.get_color(), lw=1.5))
                else:
                    ax.errorbar([eff], [found.value], yerr=[[found.value - found.low], [found.high - found.value]],
                                fmt="none", color=line.get_color(), capsize=3)
                ax.plot([eff], [found.value], "o", color=line.get_color(), ms=5)
        ax.set_yscale("log")
        if max(bounds) > 0:  # autoscaling ignores annotations: keep the arrows of lower bounds in view
            ax.set_ylim(None, max(ax.get_ylim()[1], 4 * max(bounds)))
        ax.set_xlabel("signal efficiency")
        ax.set_ylabel("background rejection")
        ax.set_title(task.name)
        ax.legend(fontsize="small")
    return fig


def confusion_figure(task: TaskSpec, scores: np.ndarray, labels: np.ndarray) -> Figure:
    """Row-normalised confusion matrix (each true class sums to 1)."""
    matrix = confusion(scores, labels).astype(float)
    matrix /= np.clip(matrix.sum(axis=1, keepdims=True), 1, None)
    names = _class_names(task, scores.shape[1])
    with plt.style.context(STYLE):
        size = max(5.0, 0.8 * len(names) + 2)
        fig, ax = plt.subplots(figsize=(size, size))
        image = ax.imshow(matrix, cmap="Blues", vmin=0, vmax=1)
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize="small")
        ax.set_yticks(range(len(names)), names, fontsize="small")
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        if len(names) <= 12:
            for (i, j), value in np.ndenumerate(matrix):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize="x-small", color="white" if value > 0.5 else "black")
        fig.colorbar(image, ax=ax, fraction=0.046)
        ax.set_title(task.name)
    return fig


def response_figure(task: TaskSpec, pred: np.ndarray, true: np.ndarray, pt: np.ndarray, bins: int = 8,
                    weights: np.ndarray | None = None) -> Figure:
    """Median response and resolution of each target in bins of pT (quantile bins, equally populated). For `log_*`
    targets the response is predicted / true and the resolution IQR / median; for the others (residual targets
    such as delta eta) the response is the residual predicted - true and the resolution its IQR."""
    targets = task.targets or []
    edges = np.unique(np.quantile(pt, np.linspace(0, 1, bins + 1)))
    centres = 0.5 * (edges[1:] + edges[:-1])
    which = np.clip(np.digitize(pt, edges[1:-1]), 0, len(centres) - 1)
    with plt.style.context(STYLE):
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 8), sharex=True)
        kinds = set()
        for i, target in enumerate(targets):
            r, is_ratio = response(target, pred[:, i], true[:, i])
            kinds.add(is_ratio)
            medians, resolutions = [], []
            for b in range(len(centres)):
                rb = r[which == b]
                if len(rb) < 5:
                    medians.append(np.nan)
                    resolutions.append(np.nan)
                    continue
                median, resolution = response_numbers(rb, is_ratio, None if weights is None else weights[which == b])
                medians.append(median)
                resolutions.append(resolution)
            label = target if is_ratio else f"{target} (residual)"
            top.plot(centres, medians, "o-", label=label)
            bottom.plot(centres, resolutions, "o-", label=label)
        top.axhline(1.0, color="grey", lw=0.8, ls="--")
        top.axhline(0.0, color="grey", lw=0.8, ls=":")
        top_label, bottom_label = AXIS_LABELS.get(frozenset(kinds), AXIS_LABELS[frozenset({True})])
        top.set_ylabel(top_label)
        bottom.set_ylabel(bottom_label)
        bottom.set_xlabel("$p_T$ [GeV]")
        top.legend(fontsize="small")
        top.set_title(task.name)
    return fig


def training_curves_figure(records: list[dict[str, Any]]) -> Figure:
    """Training and validation losses and the learning rate against the optimizer step, from metrics.jsonl."""
    with plt.style.context(STYLE):
        fig, (loss_ax, lr_ax) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=[3, 1])
        for key, style in (("train_loss", "-"), ("val_loss", "o-")):
            points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
            if points:
                steps, values = zip(*points)
                loss_ax.plot(steps, values, style, label=key)
        lrs = [(r["step"], r["lr"]) for r in records if "lr" in r]
        if lrs:
            steps, values = zip(*lrs)
            lr_ax.plot(steps, values)
        loss_ax.set_ylabel("loss")
        loss_ax.set_yscale("log")
        loss_ax.legend()
        lr_ax.set_ylabel("learning rate")
        lr_ax.set_xlabel("optimizer step")
    return fig


def search_figure(trials: list[dict[str, Any]], curves: dict[str, list[tuple[int, float]]], metric: str,
                  mode: str, log_fields: set[str] = frozenset()) -> Figure:
    """A hyper-parameter search at a glance: each trial's validation metric against the optimizer step (a line
    that ends early is a trial the scheduler cut), then the reported metric against each searched field, one
    colour per trial in every panel."""
    fields = sorted({k for t in trials for k, v in t["config"].items()
                     if isinstance(v, (int, float)) and not isinstance(v, bool)})
    ranked = [t for t in trials if isinstance(t.get("value"), float)]
    best = (min if mode == "min" else max)(ranked, key=lambda t: t["value"])["name"] if ranked else None
    last_step = max((t.get("step") or 0 for t in ranked), default=0)
    values = [v for points in curves.values() for _, v in points]
    log_y = bool(values) and min(values) > 0 and max(values) / min(values) > 20
    with plt.style.context(STYLE):
        fig, axes = plt.subplots(1, 1 + len(fields), figsize=(8 + 6 * len(fields), 6.5), squeeze=False)
        colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
        curve_ax = axes[0][0]
        for index, trial in enumerate(trials):
            colour = colours[index % len(colours)]
            is_best = trial["name"] == best
            note = " (best)" if is_best else " (cut)" if (trial.get("step") or last_step) < last_step else ""
            points = curves.get(trial["name"]) or []
            if points:
                steps, ys = zip(*points)
                curve_ax.plot(steps, ys, "o-", color=colour, ms=3, lw=2.5 if is_best else 1,
                              label=trial["name"].rsplit("_", 1)[-1] + note)
            for ax, field in zip(axes[0][1:], fields):
                x = trial["config"].get(field)
                if isinstance(trial.get("value"), float) and isinstance(x, (int, float)):
                    ax.scatter([x], [trial["value"]], color=colour, s=90 if is_best else 40,
                               edgecolors="black" if is_best else "none", zorder=3)
        curve_ax.set_xlabel("optimizer step")
        curve_ax.set_ylabel(metric)
        if len(trials) <= 12:
            curve_ax.legend(fontsize="x-small", title="trial", title_fontsize="x-small")
        for ax, field in zip(axes[0][1:], fields):
            if field in log_fields:
                ax.set_xscale("log")
            ax.set_xlabel(field)
            ax.set_ylabel(f"{metric}, last reported")
        for ax in axes[0]:
            if log_y:
                ax.set_yscale("log")
        fig.tight_layout()
    return fig


def make_plots(spec: JobSpec, payload: dict[str, Any], records: list[dict[str, Any]] | None = None) -> dict[str, Figure]:
    """Every plot that the merged Collector payload (and the training records) allow, by file name."""
    figures: dict[str, Figure] = {}
    for task in spec.tasks:
        arrays = payload["arrays"].get(task.name, {})
        if task.kind == "regression":
            if "pt" in arrays and len(arrays["pt"]) >= 20:
                figures[f"response_{task.name}"] = response_figure(task, arrays["pred"], arrays["true"], arrays["pt"],
                                                                   weights=arrays.get("weight"))
        elif "scores" in arrays and len(arrays["label"]):
            figures[f"roc_{task.name}"] = roc_figure(task, log_probabilities(arrays), arrays["label"],
                                                     arrays.get("weight"))
            figures[f"confusion_{task.name}"] = confusion_figure(task, arrays["scores"], arrays["label"])
    if records:
        figures["training_curves"] = training_curves_figure(records)
    return figures
