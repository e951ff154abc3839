"""`hepml report RUN_DIR`: one self-contained HTML page about a trained and evaluated run.

What it shows: the run's facts (job, spec hash, data, steps, wall time, jets/s, workers), the training curves, and
for each task the physics a group meeting asks for: the tagging ROC with the background rejection at 50 % and 70 %
signal efficiency, the decay-mode confusion matrix, the pT response and resolution in bins of pT, the charge
misidentification rate. Wherever the job is a tau job, a gradient-boosted baseline on jet-level quantities
(`baseline.py`), trained on the same train split and evaluated on the same test jets, sits next to the transformer.

Inputs, all written by the engine: RUN_DIR/spec.yaml, metrics.jsonl, metrics.json (`hepml evaluate`), the
evaluated checkpoint, params.json. The per-jet predictions of the transformer are RUN_DIR/predictions-<split>.npz
(`save_predictions`); if `hepml evaluate` did not leave them, they are computed here once from the evaluated
checkpoint with the engine's Collector, exactly as `hepml evaluate` does, and kept. The baseline's predictions are
cached in RUN_DIR/baseline/. The page embeds every image (base64 PNG) and needs nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from hepml_dist.errors import UserError

WORKING_POINTS = (0.5, 0.7)
"""Signal efficiencies at which the report quotes background rejection."""
REPORT_NAME = "report.html"
PREDICTIONS = "predictions-{split}.npz"
BASELINE_DIR = "baseline"
BASELINE_VERSION = 2  # bump when the baseline's quantities or models change, to refit cached baselines


# ----------------------------------------------------------------------------------------------------------------------
# Predictions: Collector payloads on disk


def save_predictions(path: str | Path, payload: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write a Collector payload (`arrays[task][key]`, `count`, `loss_sum`) and `meta` to one .npz, atomically."""
    path = Path(path)
    flat = {f"{task}.{key}": np.asarray(value) for task, arrays in payload["arrays"].items() for key, value in arrays.items()}
    info = {**meta, "count": payload.get("count", {}), "loss_sum": payload.get("loss_sum", {})}
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        np.savez_compressed(f, __meta__=np.array(json.dumps(info)), **flat)
    os.replace(tmp, path)
    return path


def load_predictions(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(payload, meta) from `save_predictions`."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            info = json.loads(str(npz["__meta__"]))
            arrays: dict[str, dict[str, np.ndarray]] = {}
            for key in npz.files:
                if key != "__meta__":
                    task, name = key.split(".", 1)
                    arrays.setdefault(task, {})[name] = npz[key]
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{path}: unreadable predictions ({err}); delete it and run `hepml report` again") from None
    payload = {"arrays": arrays, "count": info.pop("count", {}), "loss_sum": info.pop("loss_sum", {})}
    return payload, info


def predict_checkpoint(folder: Path, split: str) -> dict[str, Any]:
    """The Collector payload of a checkpoint on a split: the loop of `hepml evaluate`, in this process."""
    import torch
    from rich.progress import Progress

    from hepml_dist.data.stream import ShardStream
    from hepml_dist.evaluate.metrics import Collector
    from hepml_dist.models import get_family
    from hepml_dist.train.checkpoint import load_trained
    from hepml_dist.train.launch import absolute_paths

    spec, model = load_trained(folder)
    spec = absolute_paths(spec)
    family = get_family(spec.model.family)
    stream = ShardStream(spec.data, split, rank=0, world_size=1, seed=spec.training.seed, training=False)
    collector = Collector(spec)
    with torch.no_grad(), Progress(transient=True) as progress:
        task = progress.add_task(f"predicting {folder.name} on {split}", total=stream.steps_per_epoch)
        for batch in stream.batches(0):
            outputs = model(batch)
            collector.update(outputs, batch, family.losses(outputs, batch, spec))
            progress.advance(task)
    return collector.local()


# ----------------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class Run:
    """What the report reads from a run directory."""

    path: Path
    spec: Any
    evaluation: dict[str, Any]
    records: list[dict[str, Any]]
    params: dict[str, Any]
    state: dict[str, Any]
    checkpoint: Path
    split: str
    launched: float | None = None
    notes: list[str] = field(default_factory=list)


def load_run(run_dir: str | Path) -> Run:
    """Read a trained and evaluated run; clear errors for what is missing."""
    import yaml

    from hepml_dist.spec import SpecError, parse_spec
    from hepml_dist.track.tracker import read_metrics

    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"{path}: no such run directory (give the folder `hepml train` wrote, e.g. runs/<job name>)")
    spec_file = path / "spec.yaml"
    if not spec_file.is_file():
        raise UserError(f"{path}: no spec.yaml, so not a run directory written by `hepml train`")
    evaluation_file = path / "metrics.json"
    if not evaluation_file.is_file():
        raise UserError(f"{path}: no evaluation (metrics.json); run `hepml evaluate {path}` first, then `hepml report {path}`")
    try:
        spec = parse_spec(yaml.safe_load(spec_file.read_text()), source=str(spec_file))
    except SpecError as err:
        raise UserError(f"{spec_file}: not a valid job spec ({err.problems[0]})") from None
    try:
        evaluation = json.loads(evaluation_file.read_text())
        checkpoint, split = Path(evaluation["checkpoint"]), str(evaluation["split"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{evaluation_file}: unreadable ({err}); run `hepml evaluate {path}` again") from None
    # metrics.json names the checkpoint as `hepml evaluate` was given it (possibly relative to another directory):
    # the run's own checkpoints folder is the reliable place to look
    own = path / "checkpoints" / checkpoint.name
    if own.is_dir() or not checkpoint.is_dir():
        checkpoint = own
    state_file = checkpoint / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    params_file = path / "params.json"
    params = json.loads(params_file.read_text()) if params_file.is_file() else {}
    return Run(path, spec, evaluation, read_metrics(path), params, state, checkpoint, split,
               launched=spec_file.stat().st_mtime)


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
    payload = predict_checkpoint(run.checkpoint, run.split)
    save_predictions(path, payload, {"checkpoint": str(run.checkpoint), "split": run.split})
    return payload


# ----------------------------------------------------------------------------------------------------------------------
# The baseline (cached per run: it is fitted on the run's own train split)


def baseline_applies(spec) -> bool:
    from hepml_dist.evaluate.baseline import TAU_TASKS

    return spec.data.train is not None and any(t.name in TAU_TASKS for t in spec.tasks)


def baseline_predictions(run: Run, max_train_jets: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(payload on the evaluated split, facts) of the baseline, fitted once per run and kept in RUN_DIR/baseline."""
    from hepml_dist.evaluate import baseline as bl
    from hepml_dist.train.launch import absolute_paths

    spec = absolute_paths(run.spec)
    tasks = [t.name for t in spec.tasks if t.name in bl.TAU_TASKS]
    key = {"version": BASELINE_VERSION, "train": spec.data.train, "test": getattr(spec.data, run.split),
           "split": run.split, "tasks": tasks, "max_train_jets": max_train_jets, "seed": spec.training.seed,
           "quantities": list(bl.JET_QUANTITIES)}
    folder = run.path / BASELINE_DIR
    cached = folder / PREDICTIONS.format(split=run.split)
    if cached.is_file():
        payload, meta = load_predictions(cached)
        if meta.get("key") == key:
            return payload, meta
    train = bl.read_split(spec.data.train, max_train_jets)
    fitted = bl.fit_baseline(train, seed=spec.training.seed, tasks=tasks)
    test = bl.read_split(getattr(spec.data, run.split))
    classes = {t.name: t.output_dim if t.kind == "multiclass" else 2 for t in spec.tasks if t.name in tasks}
    payload = bl.predict_baseline(fitted, test, classes)
    meta = {"key": key, "train_jets": fitted.train_jets, "fit_seconds": fitted.seconds,
            "iterations": {t: int(m.n_iter_) for t, m in fitted.models.items()}}
    folder.mkdir(exist_ok=True)
    save_predictions(cached, payload, meta)
    return payload, meta


# ----------------------------------------------------------------------------------------------------------------------
# Numbers


@dataclass
class Rejection:
    """Background rejection at a signal efficiency, with the background count it rests on."""

    value: float
    passing: int  # background jets passing the cut
    background: int

    def text(self) -> str:
        if self.passing == 0:
            return f"&gt; {self.background:,} (0 pass)"
        return f"{self.value:,.0f} &plusmn; {self.value / np.sqrt(self.passing):,.0f}"


def rejection(labels: np.ndarray, scores: np.ndarray, efficiency: float) -> Rejection:
    """Rejection at the score cut that keeps `efficiency` of the signal (the cut is on the signal's quantile)."""
    signal, background = scores[labels == 1], scores[labels == 0]
    cut = np.quantile(signal, 1 - efficiency)
    passing = int((background >= cut).sum())
    return Rejection(len(background) / max(passing, 1), passing, len(background))


def passing_background(labels: np.ndarray, scores: np.ndarray, efficiency: float) -> np.ndarray:
    """Bool per example: a background example passing the cut that keeps `efficiency` of the signal."""
    return (labels == 0) & (scores >= np.quantile(scores[labels == 1], 1 - efficiency))


def _shared_background(curves: dict[str, tuple[np.ndarray, np.ndarray]], background: str) -> str:
    """Which background examples pass both models' cuts: when most do, the two models keep the same, most
    signal-like background, and a difference of a few passing examples is noise, not a better model."""
    (name_a, (labels, a)), (name_b, (_, b)) = curves.items()
    parts = []
    for wp in WORKING_POINTS:
        pass_a, pass_b = passing_background(labels, a, wp), passing_background(labels, b, wp)
        parts.append(f"at {100 * wp:.0f} % {int(pass_a.sum()):,} ({name_a}) and {int(pass_b.sum()):,} ({name_b}) "
                     f"pass, {int((pass_a & pass_b).sum()):,} of them both")
    return f"{background.capitalize()} examples passing the cuts: " + "; ".join(parts) + "."


def log_ratio(scores: np.ndarray) -> np.ndarray:
    """log(p1 / p0), the discriminant of a binary classifier. Ranking by p1 alone ties confident jets at
    p1 = 1.0 in float32, while p0 keeps its relative precision down to 1e-38: the log ratio orders them all."""
    tiny = np.float64(1e-38)
    return np.log(np.maximum(scores[:, 1].astype(np.float64), tiny)) - np.log(np.maximum(scores[:, 0].astype(np.float64), tiny))


def accuracy(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Accuracy of the arg-max and its binomial error."""
    p = float((scores.argmax(axis=1) == labels).mean())
    return p, float(np.sqrt(p * (1 - p) / max(len(labels), 1)))


def pt_response(spec_task, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(pT, predicted/true, reco-jet/true) for the `log_pt_ratio` target of a regression task, if it has one."""
    targets = list(spec_task.targets or [])
    if "log_pt_ratio" not in targets:
        return None
    pred, true = arrays["pred"], arrays["true"]
    i = targets.index("log_pt_ratio") if pred.shape[1] == len(targets) else 0
    j = targets.index("log_pt_ratio") if true.shape[1] == len(targets) else 0
    return arrays["pt"], np.exp(pred[:, i] - true[:, j]), np.exp(-true[:, j])


def response_numbers(response: np.ndarray) -> tuple[float, float]:
    q25, q50, q75 = np.percentile(response, [25, 50, 75])
    return float(q50), float((q75 - q25) / q50)


# ----------------------------------------------------------------------------------------------------------------------
# Facts


def spec_hash(spec) -> str:
    """sha256 of the resolved spec (canonical JSON), first 12 hex digits: equal hashes, equal jobs."""
    text = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def dataset_facts(patterns) -> str:
    """'DIR (process, N events, seed S): train a, val b, test c jets' from the manifest of a split folder."""
    from hepml_dist.data.format import read_manifest

    if not isinstance(patterns, str) or "*" in patterns or patterns.endswith(".tar"):
        return html.escape(str(patterns))
    root = Path(patterns).parent
    try:
        manifest = read_manifest(root)
    except Exception:  # noqa: BLE001 - facts are best effort; the data may live elsewhere now
        return html.escape(str(root))
    generator = (manifest.meta or {}).get("generator") or {}
    origin = f"{generator.get('process')}, {generator.get('events'):,} events, seed {generator.get('seed')}" \
        if generator else manifest.schema
    counts = ", ".join(f"{k} {v.examples:,}" for k, v in manifest.splits.items())
    return f"<code>{html.escape(str(root))}</code> ({html.escape(str(origin))}): {counts}"


def _duration(seconds: float | None) -> str:
    if seconds is None or not np.isfinite(seconds) or seconds < 0:
        return "n/a"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def run_facts(run: Run, parameters: int | None) -> list[tuple[str, str]]:
    spec, state, records = run.spec, run.state, run.records
    train_records = [r for r in records if "jets_per_s" in r]
    rates = [r["jets_per_s"] for r in train_records[1:] or train_records]  # the first window holds start-up
    workers = state.get("world_size", spec.parallel.num_workers)
    step = int(state.get("step", 0))
    global_batch = spec.data.batch_size * workers * spec.training.grad_accum
    times = [r["time"] for r in records if r.get("time")]
    finished = max(times + [state.get("time", 0)])
    wall = finished - run.launched if run.launched and finished else None
    if times and run.launched and run.launched > min(times):
        wall_note = " (since the last launch of this run directory; earlier launches not counted)"
    elif any("resumed_from" in r for r in records):
        wall_note = " (launch to last log, including Ray start-up and a restart from a checkpoint)"
    else:
        wall_note = " (launch to last log, including Ray start-up)"
    engine = f"{spec.parallel.strategy}" + (f" ZeRO-{spec.parallel.zero_stage}" if spec.parallel.strategy == "deepspeed" else "")
    engine += f", {spec.training.multitask}, {spec.training.precision}"
    info = run.params
    facts = [
        ("job", f"<b>{html.escape(spec.name)}</b>: {html.escape(spec.description or '')}"),
        ("spec hash", f"<code>{spec_hash(spec)}</code> (sha256 of the resolved spec)"),
        ("model", f"{spec.model.family}" + (f", {parameters:,} parameters" if parameters else "")),
        ("tasks", ", ".join(html.escape(t.name) for t in spec.tasks)),
        ("training data", dataset_facts(spec.data.train)),
        ("evaluated on", f"{run.split} split, {int(max(run.evaluation.get('examples', {}).values() or [0])):,} jets; "
                         f"checkpoint <code>{html.escape(run.checkpoint.name)}</code>"),
        ("workers", f"{workers} x {', '.join(spec.parallel.accelerators)} ({html.escape(engine)})"),
        ("steps", f"{step:,} optimizer steps x {global_batch:,} jets = {step * global_batch:,} jets seen "
                  f"({step * global_batch / max(_train_examples(spec), 1):.1f} epochs of the train split)"),
        ("wall time", _duration(wall) + wall_note),
        ("throughput", f"{np.median(rates):,.0f} jets/s training (median over log windows; excludes validation "
                       "and checkpoints)" if rates else "n/a"),
        ("software", html.escape(", ".join(f"{k} {info[k]}" for k in ("torch", "ray", "python") if k in info)
                                 + (f"; commit {info['git_commit'][:10]}" if info.get("git_commit") else ""))),
        ("host", html.escape(str(info.get("driver_host", "n/a")))),
    ]
    return facts


def _train_examples(spec) -> int:
    from hepml_dist.data.format import read_manifest

    try:
        return read_manifest(Path(spec.data.train).parent).splits["train"].examples
    except Exception:  # noqa: BLE001
        return 0


def _parameters(run: Run) -> int | None:
    try:
        import torch

        state = torch.load(run.checkpoint / "model.pt", map_location="cpu", weights_only=True)
        return int(sum(v.numel() for v in state.values()))
    except Exception:  # noqa: BLE001 - a fact, not a requirement
        return None


# ----------------------------------------------------------------------------------------------------------------------
# Page assembly


def _png(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


@dataclass
class Section:
    title: str
    anchor: str
    text: str = ""
    images: list[tuple[str, str]] = field(default_factory=list)  # (base64 png, caption)
    table: str = ""


def _sample_label(spec) -> str:
    train = str(spec.data.train or "")
    return "$e^+e^-$, √s = 91.2 GeV" if "fcc-tau" in train or any(t.name == "tau_id" for t in spec.tasks) else ""


def build_report(run_dir: str | Path, *, out: str | Path | None = None, with_baseline: bool = True,
                 max_train_jets: int | None = None, log=print) -> Path:
    """Write the HTML report of a run; returns its path (RUN_DIR/report.html unless `out`)."""
    from hepml_dist.evaluate import report_figures as rf

    started = time.perf_counter()
    run = load_run(run_dir)
    spec = run.spec
    tasks = {t.name: t for t in spec.tasks}
    log(f"reading predictions of {run.checkpoint.name} on the {run.split} split")
    models = {"transformer": transformer_predictions(run)}
    baseline_meta: dict[str, Any] = {}
    if with_baseline and baseline_applies(spec):
        log("baseline: gradient-boosted trees on jet-level quantities (fitted once per run, then cached)")
        models["baseline"], baseline_meta = baseline_predictions(run, max_train_jets)
    for name, payload in models.items():
        _drop_non_finite(name, payload, run.notes)
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
            sections += _regression_section(task, present, headline, rf, sample, pt_label)
        elif task.kind == "binary" and task.only_where is None:
            sections.append(_tagging_section(task, present, headline, rf, sample))
        elif task.kind == "binary":
            sections.append(_property_section(task, present, headline, rf, sample, pt_label))
        else:
            sections.append(_multiclass_section(task, present, headline, rf, sample))
    curves = Section("Training", "training", images=[(_png(rf.training_figure(run.records, sample)),
                     "Training loss per task and in total (averaged over each log window), validation loss and "
                     "scores at every evaluation, and the learning rate, against the optimizer step.")])
    sections.insert(0, curves)

    facts = run_facts(run, _parameters(run))
    page = _html(run, facts, headline, sections, list(models), baseline_meta, time.perf_counter() - started)
    target = Path(out) if out else run.path / REPORT_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, target)
    return target


def _drop_non_finite(model: str, payload: dict[str, Any], notes: list[str]) -> None:
    """Rows with NaN/inf predictions (a diverged model) are left out of every figure and number, and counted."""
    for task, arrays in payload["arrays"].items():
        key = "scores" if "scores" in arrays else "pred" if "pred" in arrays else None
        if key is None:
            continue
        values = arrays[key].reshape(len(arrays[key]), -1)
        finite = np.isfinite(values).all(axis=1)
        if not finite.all():
            notes.append(f"{model}, {task}: {int((~finite).sum()):,} of {len(finite):,} predictions are NaN or "
                         "infinite and are left out of every number and figure")
            payload["arrays"][task] = {k: v[finite] for k, v in arrays.items()}


def _tagging_section(task, present, headline, rf, sample) -> Section:
    classes = list(task.classes or ["background", "signal"])
    curves = {m: (a["label"].astype(int), log_ratio(a["scores"])) for m, a in present.items()}
    from sklearn.metrics import roc_auc_score

    headline.append((f"{task.name}: AUC", {m: f"{roc_auc_score(l, s):.5f}" for m, (l, s) in curves.items()}))
    for wp in WORKING_POINTS:
        headline.append((f"{task.name}: {classes[0]} rejection at {100 * wp:.0f} % {classes[1]} efficiency",
                         {m: rejection(l, s, wp).text() for m, (l, s) in curves.items()}))
    sig = {"tau": r"$\tau$"}.get(classes[1], classes[1])
    figure = rf.roc_figure(curves, WORKING_POINTS, signal=sig + "-jet", background=classes[0], sample=sample)
    n_signal = int(next(iter(curves.values()))[0].sum())
    labels = next(iter(curves.values()))[0]
    text = (f"{task.name}: {classes[1]} against {classes[0]}, {n_signal:,} {classes[1]} and "
            f"{len(labels) - n_signal:,} {classes[0]} examples of the test split. Rejection = 1 / (fraction of "
            f"{classes[0]} examples passing the cut on log(p<sub>{classes[1]}</sub> / p<sub>{classes[0]}</sub>) "
            f"that keeps the stated {classes[1]} efficiency); &plusmn; is the Poisson error of the passing count.")
    if len(curves) == 2:
        text += " " + _shared_background(curves, classes[0])
    spread = rf.discriminant_figure(curves, signal=classes[1], background=classes[0], sample=sample)
    return Section(f"{task.name}: {classes[1]} vs {classes[0]} ROC", task.name, text,
                   [(_png(figure), "Background rejection against signal efficiency; markers at the working points; "
                                   "lower panel: ratio to the baseline. Dotted: a single background jet passing."),
                    (_png(spread), "The discriminant of each model for signal and background jets of the test "
                                   "split (log scale; the tails decide the rejection at high purity).")])


def _property_section(task, present, headline, rf, sample, pt_label) -> Section:
    """A binary property of a subset (tau charge): accuracy and the misidentification rate vs pT."""
    series = {}
    values = {}
    for m, a in present.items():
        acc, err = accuracy(a["scores"], a["label"].astype(int))
        values[m] = f"{100 * acc:.2f} &plusmn; {100 * err:.2f} %"
        series[m] = (a["pt"], a["scores"].argmax(axis=1) != a["label"])
    headline.append((f"{task.name}: accuracy", values))
    figure = rf.rate_figure(series, f"{task.name} misidentification [%]", pt_label=pt_label, sample=sample)
    text = f"{task.name} on the jets where {task.only_where} = 1 ({len(next(iter(series.values()))[0]):,} test jets)."
    return Section(f"{task.name}: accuracy", task.name, text, [(_png(figure), f"Wrong {task.name} assignments in bins of pT.")])


def _multiclass_section(task, present, headline, rf, sample) -> Section:
    from hepml_dist.evaluate.metrics import confusion

    values, matrices = {}, {}
    for m, a in present.items():
        acc, err = accuracy(a["scores"], a["label"].astype(int))
        values[m] = f"{100 * acc:.2f} &plusmn; {100 * err:.2f} %"
        matrices[m] = confusion(a["scores"], a["label"])
    headline.append((f"{task.name}: accuracy", values))
    classes = list(task.classes or [str(i) for i in range(next(iter(matrices.values())).shape[0])])
    figure = rf.confusion_figure(matrices, classes, sample=sample)
    n = int(next(iter(matrices.values())).sum())
    text = f"{task.name}: arg-max of the predicted class probabilities, {n:,} test jets" + (
        f" (those with {task.only_where} = 1)." if task.only_where else ".")
    return Section(f"{task.name}: confusion matrix", task.name, text,
                   [(_png(figure), "Each row (true class) sums to 100 %.")])


def _regression_section(task, present, headline, rf, sample, pt_label) -> list[Section]:
    series = {}
    for m, a in present.items():
        found = pt_response(task, a)
        if found is None:
            continue
        pt, response, reco = found
        series[m] = (pt, response)
        if "reco jet" not in series:
            series_reco = (pt, reco)
    if not series:
        return []
    series["reco jet"] = series_reco
    for label, (pt, response) in series.items():
        med, res = response_numbers(response)
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
            "interquartile range / median. Error bars: bootstrap.")
    return [Section(f"{task.name}: pT response and resolution", task.name, text,
                    [(_png(figure), "Median response (top) and resolution (bottom) in bins of the generated pT, "
                                   "from the 2nd percentile of the pT distribution upward.")])]


# ----------------------------------------------------------------------------------------------------------------------
# HTML

CSS = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1d1d1f;line-height:1.45}
h1{font-size:1.7em;margin-bottom:.1em} h2{border-bottom:2px solid #3f90da;padding-bottom:.2em;margin-top:2em}
.sub{color:#666;margin-top:0} table{border-collapse:collapse;margin:1em 0;font-size:.95em}
td,th{padding:.35em .8em;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}
th{background:#f4f6f8} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
.better{color:#1a7f37;font-weight:600} figure{margin:1.2em 0} img{max-width:100%;height:auto}
figcaption{color:#555;font-size:.9em} code{background:#f4f6f8;padding:0 .25em;border-radius:3px}
nav a{margin-right:1em} .note{color:#555;font-size:.9em}
"""


def _better(metric: str, texts: dict[str, str]) -> str | None:
    """Which model wins a headline row (None if not comparable)."""
    def number(text: str) -> float | None:
        text = text.replace("&gt;", "").replace(",", "").split("&plusmn;")[0].split("/")[-1 if "resolution" in metric else 0]
        try:
            return float(text.strip().split()[0].rstrip("%"))
        except (ValueError, IndexError):
            return None

    values = {m: number(t) for m, t in texts.items() if m in ("transformer", "baseline")}
    if len(values) < 2 or None in values.values():
        return None
    lower_is_better = "resolution" in metric
    if "response" in metric and not lower_is_better:
        return None
    best = min(values, key=values.get) if lower_is_better else max(values, key=values.get)
    return best if values["transformer"] != values["baseline"] else None


def _html(run: Run, facts, headline, sections: list[Section], models: list[str], baseline_meta, seconds: float) -> str:
    from hepml_dist.evaluate.baseline import JET_QUANTITIES

    columns = models + (["reco jet"] if any("reco jet" in v for _, v in headline) else [])
    rows = []
    for metric, values in headline:
        winner = _better(metric, values)
        cells = "".join(
            f'<td class="num{" better" if m == winner else ""}">{values.get(m, "")}</td>' for m in columns)
        rows.append(f"<tr><td>{html.escape(metric)}</td>{cells}</tr>")
    summary = (f"<table><tr><th>metric (test split)</th>{''.join(f'<th>{m}</th>' for m in columns)}</tr>"
               f"{''.join(rows)}</table>")
    facts_html = "<table>" + "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts) + "</table>"
    nav = '<a href="#summary">summary</a><a href="#facts">run</a>' + "".join(
        f'<a href="#{s.anchor}">{html.escape(s.title.split(":")[0])}</a>' for s in sections)
    body = []
    for s in sections:
        parts = [f'<h2 id="{s.anchor}">{html.escape(s.title)}</h2>']
        if s.text:
            parts.append(f"<p>{s.text}</p>")
        for png, caption in s.images:
            parts.append(f'<figure><img alt="{html.escape(s.title)}" src="data:image/png;base64,{png}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        body.append("\n".join(parts))
    if baseline_meta:
        jets = baseline_meta.get("train_jets", {})
        quantities = "".join(f"<tr><td><code>{k}</code></td><td>{html.escape(v)}</td></tr>" for k, v in JET_QUANTITIES.items())
        baseline_html = (
            '<h2 id="baseline">The baseline</h2><p>scikit-learn <code>HistGradientBoostingClassifier</code> '
            "(tau ID on all jets; charge and decay mode on tau jets) and <code>HistGradientBoostingRegressor</code> "
            "(absolute error, log(pT_vis / pT_jet) on tau jets), 31 leaves, learning rate 0.1, L2 1.0, at least 100 "
            "jets per leaf, early stopping on 10 % of the training jets. Fitted on the <b>same train split</b> as the transformer ("
            + ", ".join(f"{t} {n:,}" for t, n in jets.items())
            + f" jets) in {baseline_meta.get('fit_seconds', 0):.0f} s, evaluated on the same test jets. Its inputs, "
            f"one row per jet computed from the stored candidates:</p><table>{quantities}</table>")
        body.append(baseline_html)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in run.notes)
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(run.spec.name)}: run report</title>
<style>{CSS}</style></head><body>
<h1>{html.escape(run.spec.name)}</h1>
<p class="sub">run report of <code>{html.escape(str(run.path.resolve()))}</code>, written {generated} by
<code>hepml report</code> in {seconds:.0f} s</p>
<nav>{nav}{'<a href="#baseline">baseline</a>' if baseline_meta else ''}</nav>
<h2 id="summary">Summary</h2>{summary}
<p class="note">Green: the better of transformer and baseline. All numbers from the same test jets and the same code.</p>
<h2 id="facts">Run</h2>{facts_html}
{''.join(body)}
{f'<h2>Notes</h2><ul>{notes}</ul>' if notes else ''}
</body></html>
"""
