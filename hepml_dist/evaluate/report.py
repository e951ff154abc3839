"""`hepml report RUN_DIR`: one self-contained HTML page about a trained and evaluated run.

What it shows: the run's facts (job, spec hash, data, steps, wall time, jets/s, workers), the training curves, and
for each task the physics a group meeting asks for: the tagging ROC with the background rejection at 50 % and 70 %
signal efficiency, the decay-mode confusion matrix, the pT response and resolution in bins of pT, the charge
misidentification rate. Then what the job's family declares (`families/`): its own sections (MLPF jet and MET
response, an event classifier's expected significance, OmniJet-alpha's tokenizer and generation quality) and its
baseline (gradient-boosted trees on jet-level quantities for jet taggers, on event features for event classifiers),
trained on the same train split and evaluated on the same test examples, next to the transformer.

Inputs, all written by the engine: RUN_DIR/spec.yaml, metrics.jsonl, metrics.json (`hepml evaluate`), the
evaluated checkpoint, params.json. The per-jet predictions of the transformer are RUN_DIR/predictions-<split>.npz
(`save_predictions`); if `hepml evaluate` did not leave them, they are computed here once from the evaluated
checkpoint with the engine's Collector, exactly as `hepml evaluate` does, and kept. The baseline's predictions are
cached in RUN_DIR/baseline/. The page embeds every image (base64 PNG) and needs nothing else; the figures also go
to the run's results tracker (`report/<name>` in TensorBoard, Comet and plots/report/), unless `--no-track`.
"""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
from sklearn.metrics import roc_auc_score

from hepml_dist import files, runs
from hepml_dist.errors import UserError
from hepml_dist.evaluate import report_figures as rf
from hepml_dist.evaluate.families import ReportContext, evaluations
from hepml_dist.evaluate.metrics import (
    accuracy,
    confusion,
    log_probabilities,
    log_ratio,
    passing_background,
    rejection,
    response_numbers,
)
from hepml_dist.evaluate.report_facts import (
    PREDICTIONS,
    Run,
    load_predictions,
    load_run,
    parameter_count,
    run_facts,
    save_predictions,
)
from hepml_dist.evaluate.report_html import Section, render_page
from hepml_dist.evaluate.runner import split_payload
from hepml_dist.track.images import figure_png
from hepml_dist.track.tracker import NullTracker, Tracker, make_results_tracker

WORKING_POINTS = (0.5, 0.7)
"""Signal efficiencies at which the report quotes background rejection."""
REPORT_NAME = "report.html"


def transformer_predictions(run: Run) -> dict[str, Any]:
    """The evaluated checkpoint's predictions on the evaluated split: from disk, else computed and saved."""
    path = run.path / PREDICTIONS.format(split=run.split)
    if path.is_file():
        payload, meta = load_predictions(path)
        if Path(meta.get("checkpoint", "")).name == run.checkpoint.name:
            return payload
        run.notes.append(f"{path.name} was for {meta.get('checkpoint')}; recomputed for {run.checkpoint.name}")
    if not (run.checkpoint / "model.pt").is_file():
        raise UserError(f"{run.checkpoint}: the evaluated checkpoint is gone and {path.name} is missing; "
                        f"run `hepml evaluate {run.path}` again")
    payload = split_payload(run.checkpoint, run.split, verb="predicting")[1]
    save_predictions(path, payload, {"checkpoint": str(run.checkpoint), "split": run.split})
    return payload


# ----------------------------------------------------------------------------------------------------------------------
# Numbers


def _shared_background(curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], background: str) -> str:
    """Which background examples pass both models' cuts: when most do, the two models keep the same, most
    signal-like background, and a difference of a few passing examples is noise, not a better model."""
    (name_a, (labels, a, w)), (name_b, (_, b, _)) = curves.items()
    parts = []
    for wp in WORKING_POINTS:
        pass_a, pass_b = passing_background(labels, a, wp, w), passing_background(labels, b, wp, w)
        parts.append(f"at {100 * wp:.0f} % {int(pass_a.sum()):,} ({name_a}) and {int(pass_b.sum()):,} ({name_b}) "
                     f"pass, {int((pass_a & pass_b).sum()):,} of them both")
    return f"{background.capitalize()} examples passing the cuts: " + "; ".join(parts) + "."


def percent(value: float, low: float, high: float) -> str:
    """An efficiency as "value [low, high] %" (68 % CL)."""
    return f"{100 * value:.2f} [{100 * low:.2f}, {100 * high:.2f}] %"


def pt_response(spec_task, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(pT, predicted/true, reco-jet/true) for the `log_pt_ratio` target of a regression task, if it has one."""
    targets = list(spec_task.targets or [])
    if "log_pt_ratio" not in targets or "pt" not in arrays:  # MLPF's per-element targets carry no jet pT
        return None
    pred, true = arrays["pred"], arrays["true"]
    i = targets.index("log_pt_ratio") if pred.shape[1] == len(targets) else 0
    j = targets.index("log_pt_ratio") if true.shape[1] == len(targets) else 0
    return arrays["pt"], np.exp(pred[:, i] - true[:, j]), np.exp(-true[:, j])


# ----------------------------------------------------------------------------------------------------------------------
# Facts


# ----------------------------------------------------------------------------------------------------------------------
# Page assembly


class Figures:
    """The page's figures: each is drawn once, embedded as a base64 PNG and logged as `report/<name>` at the
    evaluated step to the run's results tracker (plots/report/*.png, TensorBoard's Images tab, Comet)."""

    def __init__(self, tracker: Tracker, step: int):
        self.tracker, self.step = tracker, step

    def png(self, figure, name: str) -> str:
        png = figure_png(figure, dpi=110)
        plt.close(figure)
        self.tracker.log_image(f"report/{name}", png, step=self.step)
        return base64.b64encode(png).decode()


def _sample_label(spec) -> str:
    train = str(spec.data.train or "")
    return "$e^+e^-$, √s = 91.2 GeV" if "fcc-tau" in train or any(t.name == "tau_id" for t in spec.tasks) else ""


def build_report(run_dir: str | Path, *, out: str | Path | None = None, with_baseline: bool = True,
                 max_train_jets: int | None = None, log=print, track: bool = True) -> Path:
    """Write the HTML report of a run; returns its path (RUN_DIR/report.html unless `out`). With `track`, its
    figures also go to the run's results tracker (`Figures`)."""
    started = time.perf_counter()
    run = load_run(run_dir)
    family = evaluations(run.spec)
    spec = runs.absolute_paths(run.spec)
    for evaluation in family:  # what the family's evaluation and baseline read: checked before any work
        evaluation.check_inputs(spec, run.split)
        if with_baseline:
            evaluation.check_baseline_inputs(spec, run.split)
    tracker = make_results_tracker(run.spec, run.path, run.split) if track else NullTracker()
    try:
        page = _page(run, family, Figures(tracker, int(run.state.get("step", 0))), with_baseline, max_train_jets, log, started)
    finally:
        tracker.close()
    target = Path(out) if out else run.path / REPORT_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    return files.write_text(target, page)


def _page(run: Run, family: list, figures: Figures, with_baseline: bool, max_train_jets: int | None, log, started: float) -> str:
    spec = run.spec
    tasks = {t.name: t for t in spec.tasks}
    log(f"reading predictions of {run.checkpoint.name} on the {run.split} split")
    models = {"transformer": transformer_predictions(run)}
    baseline_meta: dict[str, Any] = {}
    baseline = next((e for e in family if e.baseline is not None), None) if with_baseline else None
    if baseline is not None:
        log(f"baseline: {baseline.baseline_description} (fitted once per run, then cached)")
        models["baseline"], baseline_meta = baseline.baseline(run, max_train_jets)
    for name, payload in models.items():
        _drop_non_finite(name, payload, run.notes)
    _note_weights(models, run.notes)
    sample = _sample_label(spec)
    pt_label = r"generated visible $\tau$ $p_T$ [GeV]" if "tau_id" in tasks else r"$p_T$ [GeV]"

    headline: list[tuple[str, dict[str, str]]] = []  # (metric, {model: text})
    sections: list[Section] = []
    for task in spec.tasks:
        present = {m: p["arrays"][task.name] for m, p in models.items() if task.name in p["arrays"]
                   and len(next(iter(p["arrays"][task.name].values()), []))}
        if not present:
            continue
        if task.kind == "regression":
            sections += _regression_section(task, present, headline, sample, pt_label, figures)
        elif task.kind == "binary" and task.only_where is None:
            sections.append(_tagging_section(task, present, headline, sample, figures))
        elif task.kind == "binary":
            sections.append(_property_section(task, present, headline, sample, pt_label, figures))
        else:
            sections.append(_multiclass_section(task, present, headline, sample, figures))
    curves = Section("Training", "training", images=[(figures.png(rf.training_figure(run.records, sample), "training"),
                     "Training loss per task and in total (averaged over each log window), validation loss and "
                     "scores at every evaluation, and the learning rate, against the optimizer step.")])
    context = ReportContext(run, models, headline, figures, sample, baseline_meta)
    for evaluation in family:  # the family's own sections
        sections += evaluation.sections(context)
    sections.insert(0, curves)

    facts = run_facts(run, parameter_count(run))
    baseline_html = baseline.baseline_html(baseline_meta) if baseline is not None else ""
    return render_page(run, facts, headline, sections, list(models), baseline_html, time.perf_counter() - started)


def _drop_non_finite(model: str, payload: dict[str, Any], notes: list[str]) -> None:
    """Rows with NaN/inf predictions (a diverged model) are left out of every figure and number, and counted."""
    for task, arrays in payload["arrays"].items():
        keys = [k for k in ("scores", "log_probs", "pred") if k in arrays]
        if not keys:
            continue
        finite = np.logical_and.reduce([np.isfinite(arrays[k].reshape(len(arrays[k]), -1)).all(axis=1) for k in keys])
        if not finite.all():
            notes.append(f"{model}, {task}: {int((~finite).sum()):,} of {len(finite):,} predictions are NaN or "
                         "infinite and are left out of every number and figure")
            payload["arrays"][task] = {k: v[finite] for k, v in arrays.items()}


def _note_weights(models: dict[str, dict[str, Any]], notes: list[str]) -> None:
    """Say so when some models' numbers are weighted and others' are not: they are then not strictly comparable."""
    weighted = {m for m, p in models.items()
                if any("weight" in a and not np.all(a["weight"] == 1) for a in p["arrays"].values())}
    if weighted and len(weighted) < len(models):
        notes.append(f"the numbers of {', '.join(sorted(weighted))} are weighted by the example weights of the data; "
                     f"those of {', '.join(sorted(set(models) - weighted))} are not (their predictions carry no weights)")


def _tagging_section(task, present, headline, sample, figures: Figures) -> Section:
    classes = list(task.classes or ["background", "signal"])
    curves = {m: (a["label"].astype(int), log_ratio(log_probabilities(a)), a.get("weight")) for m, a in present.items()}
    headline.append((f"{task.name}: AUC", {m: f"{roc_auc_score(l, s, sample_weight=w):.5f}"
                                           for m, (l, s, w) in curves.items()}))
    for wp in WORKING_POINTS:
        headline.append((f"{task.name}: {classes[0]} rejection at {100 * wp:.0f} % {classes[1]} efficiency",
                         {m: html.escape(rejection(l, s, wp, w).text()) for m, (l, s, w) in curves.items()}))
    sig = {"tau": r"$\tau$"}.get(classes[1], classes[1])
    figure = rf.roc_figure(curves, WORKING_POINTS, signal=sig + "-jet", background=classes[0], sample=sample)
    n_signal = int(next(iter(curves.values()))[0].sum())
    labels = next(iter(curves.values()))[0]
    text = (f"{task.name}: {classes[1]} against {classes[0]}, {n_signal:,} {classes[1]} and "
            f"{len(labels) - n_signal:,} {classes[0]} examples of the test split. Rejection = 1 / (fraction of "
            f"{classes[0]} examples passing the cut on log(p<sub>{classes[1]}</sub> / p<sub>{classes[0]}</sub>) "
            f"that keeps the stated {classes[1]} efficiency), weighted by the example weights where the data carry "
            f"them. In brackets: the 68 % interval from the Clopper-Pearson interval of the passing fraction. "
            f"&ge; N: no {classes[0]} example passes, so the split only shows that the rejection exceeds about its "
            f"N {classes[0]} examples.")
    if len(curves) == 2 and len({len(labels) for labels, _, _ in curves.values()}) == 1:  # the same examples
        text += " " + _shared_background(curves, classes[0])
    spread = rf.discriminant_figure(curves, signal=classes[1], background=classes[0], sample=sample)
    return Section(f"{task.name}: {classes[1]} vs {classes[0]} ROC", task.name, text,
                   [(figures.png(figure, f"{task.name}_roc"), "Background rejection against signal efficiency; markers at the working points; "
                                   "lower panel: ratio to the baseline. Dotted: a single background jet passing."),
                    (figures.png(spread, f"{task.name}_discriminant"), "The discriminant of each model for signal and background jets of the test "
                                   "split (log scale; the tails decide the rejection at high purity).")])


def _property_section(task, present, headline, sample, pt_label, figures: Figures) -> Section:
    """A binary property of a subset (tau charge): accuracy and the misidentification rate vs pT."""
    series = {}
    values = {}
    for m, a in present.items():
        values[m] = percent(*accuracy(log_probabilities(a), a["label"].astype(int), a.get("weight")))
        series[m] = (a["pt"], a["scores"].argmax(axis=1) != a["label"])
    headline.append((f"{task.name}: accuracy", values))
    figure = rf.rate_figure(series, f"{task.name} misidentification [%]", pt_label=pt_label, sample=sample)
    text = f"{task.name} on the jets where {task.only_where} = 1 ({len(next(iter(series.values()))[0]):,} test jets)."
    return Section(f"{task.name}: accuracy", task.name, text, [(figures.png(figure, f"{task.name}_misid"),
                                                                     f"Wrong {task.name} assignments in bins of pT.")])


def _multiclass_section(task, present, headline, sample, figures: Figures) -> Section:
    values, matrices = {}, {}
    for m, a in present.items():
        values[m] = percent(*accuracy(log_probabilities(a), a["label"].astype(int), a.get("weight")))
        matrices[m] = confusion(a["scores"], a["label"])
    headline.append((f"{task.name}: accuracy", values))
    classes = list(task.classes or [str(i) for i in range(next(iter(matrices.values())).shape[0])])
    figure = rf.confusion_figure(matrices, classes, sample=sample)
    n = int(next(iter(matrices.values())).sum())
    text = f"{task.name}: arg-max of the predicted class probabilities, {n:,} test jets" + (
        f" (those with {task.only_where} = 1)." if task.only_where else ".")
    return Section(f"{task.name}: confusion matrix", task.name, text,
                   [(figures.png(figure, f"{task.name}_confusion"), "Each row (true class) sums to 100 %.")])


def _regression_section(task, present, headline, sample, pt_label, figures: Figures) -> list[Section]:
    series, weights = {}, {}
    for m, a in present.items():
        found = pt_response(task, a)
        if found is None:
            continue
        pt, response, reco = found
        series[m] = (pt, response)
        weights[m] = a.get("weight")
        if "reco jet" not in series:
            series_reco, weights["reco jet"] = (pt, reco), a.get("weight")
    if not series:
        return []
    series["reco jet"] = series_reco
    for label, (pt, response) in series.items():
        med, res = response_numbers(response, True, weights[label])
        row = f"{task.name}: pT response median / resolution (IQR / median)"
        for name, text in ((f"{row}", f"{med:.4f} / {100 * res:.2f} %"),):
            found = next((h for h in headline if h[0] == name), None)
            if found is None:
                headline.append((name, {}))
                found = headline[-1]
            found[1][label] = text
    figure = rf.response_figure(series, quantity=r"$p_T$", pt_label=pt_label, sample=sample)
    text = ("Response = reconstructed visible-tau pT / true visible-tau pT, where the reconstructed pT is the jet pT "
            "corrected by the predicted log(pT_vis / pT_jet); \"reco jet\" is the uncorrected jet pT. Resolution = "
            "interquartile range / median; the summary's numbers are weighted by the example weights where the data carry "
            "them. Error bars: bootstrap.")
    return [Section(f"{task.name}: pT response and resolution", task.name, text,
                    [(figures.png(figure, f"{task.name}_response"), "Median response (top) and resolution (bottom) in bins of the generated pT, "
                                   "from the 2nd percentile of the pT distribution upward.")])]
