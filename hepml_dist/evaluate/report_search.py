"""The report's section for event classifiers of a search (AOT): expected significance against the cut, and the
rejection of each background process. Numbers come from `significance.py`, the same as metrics.json's."""

from __future__ import annotations

import html
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from hepml_dist import runs
from hepml_dist.evaluate import baseline_events as be
from hepml_dist.evaluate import report_figures as rf
from hepml_dist.evaluate.metrics import number
from hepml_dist.evaluate.report_facts import PREDICTIONS, load_predictions, save_predictions
from hepml_dist.evaluate.report_html import Section
from hepml_dist.evaluate.significance import (
    FIXED_SIGNAL_EFFICIENCY,
    MIN_BACKGROUND_EXAMPLES,
    SearchResult,
    evaluate_search,
    signal_task,
)


def event_baseline_predictions(run, max_train_events: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(payload on the evaluated split, facts) of the event-classifier baseline, fitted once per run and cached in
    RUN_DIR/baseline/ (refitted when its key changes)."""
    spec = runs.absolute_paths(run.spec)
    task = signal_task(spec)
    features = list(spec.data.inputs.event_features)
    key = {"version": be.VERSION, "kind": "events", "train": spec.data.train, "test": getattr(spec.data, run.split),
           "split": run.split, "task": task.name, "label": task.label_key, "event_features": features,
           "max_train_events": max_train_events, "seed": spec.training.seed}
    cached = run.path / "baseline" / PREDICTIONS.format(split=run.split)
    if cached.is_file():
        payload, meta = load_predictions(cached)
        if meta.get("key") == key:
            return payload, meta
    train = be.read_events(spec.data.train, task.label_key, features, max_train_events)
    test = be.read_events(getattr(spec.data, run.split), task.label_key, features)
    payload, facts = be.fit_and_predict(train, test, task=task.name, label=task.label_key, event_features=features,
                                        seed=spec.training.seed)
    meta = {"key": key, **facts}
    cached.parent.mkdir(exist_ok=True)
    save_predictions(cached, payload, meta)
    return payload, meta


def significance_figure(results: dict[str, SearchResult], sample: str = "") -> Figure:
    """Per model: Z with its 68 % band (top) and the expected signal and background yields (bottom) against the
    signal efficiency of the cut; a marker at the best cut."""
    lumi = next(iter(results.values())).luminosity_fb
    with plt.style.context(rf.STYLE):
        figure, (top, bottom) = plt.subplots(2, 1, figsize=(8, 8), sharex=True, height_ratios=[2, 1])
        for index, (model, result) in enumerate(results.items()):
            scan, best = result.scan, result.scan.best
            best_keeps = scan.background_examples[best]
            efficiency, colour = scan.signal_efficiency, rf.colour(model, index)
            # as in the scan: cuts keeping fewer than MIN_BACKGROUND_EXAMPLES background events chase single events
            finite = np.isfinite(scan.z) & (scan.background_examples >= min(best_keeps, MIN_BACKGROUND_EXAMPLES))
            err = np.nan_to_num(scan.z_err, nan=0.0)
            top.plot(efficiency[finite], scan.z[finite], color=colour, label=model)
            top.fill_between(efficiency[finite], (scan.z - err)[finite], (scan.z + err)[finite], color=colour,
                             alpha=0.2, linewidth=0)
            top.plot([efficiency[best]], [scan.z[best]], rf.MARKERS.get(model, "o"), color=colour,
                     label=f"best cut: Z = {scan.z[best]:.2f} $\\pm$ {scan.z_err[best]:.2f}")
            bottom.plot(efficiency, scan.b, color=colour, label=f"background $b$, {model}")
            if index == 0:  # s against its own efficiency is the same line for every model
                bottom.plot(efficiency, scan.s, color="#717581", linestyle="--", label="signal $s$")
        top.set_ylabel(r"expected significance $Z$", fontsize=18)
        top.legend(loc="best", fontsize=11)
        bottom.set_yscale("log")
        bottom.set_ylabel("expected events", fontsize=18)
        bottom.set_xlabel("signal efficiency of the cut", fontsize=18)
        bottom.legend(loc="best", fontsize=10)
        bottom.set_xlim(0, 1)
        rf.label_axes(top, right=f"{lumi:g} fb$^{{-1}}$" + (f", {sample}" if sample else ""))
        figure.tight_layout()
    return figure


def rejection_table(results: dict[str, SearchResult]) -> str:
    """One row per background process: expected events, and per model the events passing its best cut and the
    rejections at the best cut and at fixed signal efficiency."""
    fixed = round(100 * FIXED_SIGNAL_EFFICIENCY)
    first = next(iter(results.values()))
    head = "<tr><th>process</th><th>expected events (no cut)</th>" + "".join(
        f"<th>{m}: expected after best cut</th><th>{m}: rejection at best cut</th>"
        f"<th>{m}: rejection at {fixed} % signal efficiency</th>" for m in results) + "</tr>"
    rows = [head]
    for name in first.rejections_at_best:
        expected = first.expected.get(name, float("nan"))
        cells = []
        for result in results.values():
            at_best, at_fixed = result.rejections_at_best.get(name), result.rejections_at_fixed.get(name)
            if at_best is None or at_fixed is None:
                cells.append("<td></td>" * 3)
                continue
            after = 0.0 if at_best.lower_bound else expected / at_best.value
            cells.append(f"<td>{number(after)}</td><td>{html.escape(at_best.text())}</td>"
                         f"<td>{html.escape(at_fixed.text())}</td>")
        rows.append(f"<tr><td>{html.escape(name)}</td><td>{number(expected)}</td>{''.join(cells)}</tr>")
    return "<table>" + "".join(rows) + "</table>"


def search_sections(run, models: dict[str, dict[str, Any]], headline: list, figures, sample: str = "",
                    baseline_meta: dict[str, Any] | None = None) -> list[Section]:
    """The significance section of an event-classifier run (none for other families), for every model."""
    spec = runs.absolute_paths(run.spec)
    results: dict[str, SearchResult] = {}
    task = ""
    for model, payload in models.items():
        found = evaluate_search(spec, payload, run.split)
        if found is not None:
            task, results[model] = found
    if not results:
        return []
    first = next(iter(results.values()))
    lumi = f"{first.luminosity_fb:g} fb<sup>-1</sup>"
    headline.append((f"{task}: expected significance at {first.luminosity_fb:g} fb^-1",
                     {m: f"{r.scan.z[r.scan.best]:.3f} &plusmn; {r.scan.z_err[r.scan.best]:.3f}"
                      for m, r in results.items()}))
    quoted = "; ".join(
        f"{m}: Z = {r.scan.z[r.scan.best]:.3f} &plusmn; {r.scan.z_err[r.scan.best]:.3f} at signal efficiency "
        f"{100 * r.scan.signal_efficiency[r.scan.best]:.1f} % (cut {r.scan.cuts[r.scan.best]:.3f}), "
        f"s = {number(r.scan.s[r.scan.best])}, b = {number(r.scan.b[r.scan.best])}" for m, r in results.items())
    text = (f"Expected yields at {lumi}: each {run.split} event counts gen_xsec_weight &times; luminosity, scaled "
            f"by (stored events of its process in the dataset) / (evaluated events of that process). For each cut "
            f"on log(p<sub>signal</sub> / p<sub>background</sub>), s and b are the expected signal and background "
            f"passing it and Z = &radic;(2((s+b) ln(1+s/b) &minus; s)); its error propagates the statistical "
            f"errors of the weighted sums (&Sigma;w&sup2;). Best cut: the largest Z among cuts keeping at least "
            f"{MIN_BACKGROUND_EXAMPLES} background events. {quoted}. The cut is chosen on the same events, so Z is "
            "slightly optimistic on a small split. Rejection = 1 / (fraction of the process's expected events "
            "passing); in brackets the 68 % Clopper-Pearson interval.")
    if baseline_meta:
        text += (f" Baseline: scikit-learn HistGradientBoostingClassifier on {len(baseline_meta['quantities'])} "
                 f"quantities per event ({html.escape(', '.join(baseline_meta['quantities']))}; a missing object "
                 f"is NaN), fitted with the example weights on {baseline_meta['train_events']:,} train events "
                 f"({baseline_meta['iterations']} iterations, {baseline_meta['fit_seconds']:.1f} s).")
    image = figures.png(significance_figure(results, sample), f"{task}_significance")
    return [Section(f"{task}: expected significance", f"{task}_significance", text,
                    [(image, "Expected significance against the signal efficiency of the cut (band: 68 % from the "
                             f"weighted counts; cuts keeping fewer than {MIN_BACKGROUND_EXAMPLES} background events "
                             "are left out), and the expected yields passing the cut.")],
                    table=rejection_table(results))]
