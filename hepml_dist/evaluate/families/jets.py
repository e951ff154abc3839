"""Evaluation of jet taggers (ParT, Sophon, Multi/SingleParTau; OmniJet-alpha's fine-tuned heads use it too).

The per-task metrics and sections (ROC and rejection, confusion matrix, pT response) are the report's generic ones.
What this family adds is the classical baseline a physicist would build from the same jets, gradient-boosted trees
on jet-level quantities (`evaluate/baseline.py`), in one of two forms:

- tau jobs (any task named as MultiParTau's: tau_id, charge, decay_mode, kinematics): the tau baseline, one model per
  tau task on the MultiParTau definitions;
- other whole-jet classification tasks (JetClass, JetClass-II): one classifier of the task's label on the same
  jet-level quantities plus the stored substructure (soft-drop mass, N-subjettiness ratios) where the data hold it.
"""

from __future__ import annotations

import html
import time
from pathlib import Path
from typing import Any

import numpy as np

from hepml_dist import runs
from hepml_dist.data.expressions import evaluate, inputs_of
from hepml_dist.errors import UserError
from hepml_dist.evaluate import baseline as bl
from hepml_dist.evaluate.families.base import Evaluation, require_columns
from hepml_dist.evaluate.report_facts import PREDICTIONS, load_predictions, save_predictions
from hepml_dist.omnijet.generate import token_manifest

BASELINE_DIR = "baseline"
BASELINE_VERSION = 3  # bump when the baselines' quantities or models change, to refit cached baselines
SUBSTRUCTURE = ("jet_sdmass", "jet_tau1", "jet_tau2", "jet_tau3", "jet_tau4")
"""Stored substructure the jet-class baseline adds when every shard holds it."""
TAU_FIX = "use an fcc-tau dataset (hepml data generate fcc-tau, or hepml data convert --schema fcc-tau), or --no-baseline"
JETS_FIX = "use a dataset with the stored jet columns (docs/architecture.md, \"Stored columns\"), or --no-baseline"


def tau_tasks(spec) -> list[str]:
    return [t.name for t in spec.tasks if t.name in bl.TAU_TASKS]


def class_task(spec):
    """The whole-jet classification task the jet-class baseline fits (the first), when the job is no tau job."""
    if tau_tasks(spec):
        return None
    return next((t for t in spec.tasks if t.kind in ("binary", "multiclass") and t.only_where is None), None)


def declare(spec) -> list[Evaluation]:
    if spec.data.train is None:
        return []
    if tau_tasks(spec):
        return [Evaluation("tau baseline", check_baseline_inputs=_check_tau, baseline=tau_baseline,
                           baseline_description="gradient-boosted trees on jet-level quantities",
                           baseline_html=tau_baseline_html)]
    if class_task(spec) is not None:
        return [Evaluation("jet-class baseline", check_baseline_inputs=_check_classes, baseline=class_baseline,
                           baseline_description="gradient-boosted trees on jet-level quantities and substructure",
                           baseline_html=class_baseline_html)]
    return []


def jet_source(patterns, split: str) -> tuple[Any, str | None]:
    """(the jets of a split, the selection that made its examples): the split itself, or, for OmniJet-alpha token
    data (which keep the per-jet columns but not the constituents), the split of the jets the tokens were made from
    and the `hepml data tokenize --where` selection, so the trees see the same jets as the tokens' model."""
    manifest = token_manifest(patterns) if patterns is not None else None
    if manifest is None or "tokenizer" not in manifest.meta or not manifest.source_files:
        return patterns, None
    return str(Path(manifest.source_files[0]) / split), manifest.meta.get("where")


def _selected(raw: dict[str, np.ndarray], where: str | None) -> dict[str, np.ndarray]:
    if not where:
        return raw
    keep = np.broadcast_to(np.asarray(evaluate(where, raw)).astype(bool), (len(next(iter(raw.values()))),))
    return {k: v[keep] for k, v in raw.items()}


def _read_tau_jets(patterns, split: str, max_jets: int | None = None) -> dict[str, np.ndarray]:
    source, where = jet_source(patterns, split)
    if not where:
        return bl.read_split(source, max_jets)
    # the selection's columns are per-jet columns of the source (checked by `hepml data tokenize`)
    wanted = [*bl.STORED_COLUMNS, *bl.TRUTH_COLUMNS]
    found = bl.read_columns(source, wanted, f"the tau baseline needs them; {TAU_FIX}",
                            optional=[bl.WEIGHT_COLUMN, *sorted(inputs_of(where) - set(wanted))])
    return {k: v[:max_jets] for k, v in _selected(found, where).items()}


def _check_tau(spec, split: str) -> None:
    for name in ("train", split):
        source, _ = jet_source(getattr(spec.data, name), name)
        require_columns(source, [*bl.STORED_COLUMNS, *bl.TRUTH_COLUMNS], family=spec.model.family,
                        what="the tau baseline", split=name, fix=TAU_FIX)


def _check_classes(spec, split: str) -> None:
    label = class_task(spec).label_key
    for name in ("train", split):
        require_columns(getattr(spec.data, name), [*bl.STORED_COLUMNS, label], family=spec.model.family,
                        what="the jet-class baseline", split=name, fix=JETS_FIX)


def _cached(run, key: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]] | None:
    cached = run.path / BASELINE_DIR / PREDICTIONS.format(split=run.split)
    if cached.is_file():
        payload, meta = load_predictions(cached)
        if meta.get("key") == key:
            return payload, meta
    return None


def _keep(run, payload: dict[str, Any], meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    folder = run.path / BASELINE_DIR
    folder.mkdir(exist_ok=True)
    save_predictions(folder / PREDICTIONS.format(split=run.split), payload, meta)
    return payload, meta


def tau_baseline(run, max_train_jets: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(payload on the evaluated split, facts) of the tau baseline, fitted once per run and kept in RUN_DIR/baseline."""
    spec = runs.absolute_paths(run.spec)
    tasks = tau_tasks(spec)
    key = {"version": BASELINE_VERSION, "kind": "tau", "train": spec.data.train, "test": getattr(spec.data, run.split),
           "split": run.split, "tasks": tasks, "max_train_jets": max_train_jets, "seed": spec.training.seed,
           "quantities": list(bl.JET_QUANTITIES)}
    if (found := _cached(run, key)) is not None:
        return found
    fitted = bl.fit_baseline(_read_tau_jets(spec.data.train, "train", max_train_jets), seed=spec.training.seed,
                             tasks=tasks)
    classes = {t.name: t.output_dim if t.kind == "multiclass" else 2 for t in spec.tasks if t.name in tasks}
    payload = bl.predict_baseline(fitted, _read_tau_jets(getattr(spec.data, run.split), run.split), classes)
    meta = {"key": key, "train_jets": fitted.train_jets, "fit_seconds": fitted.seconds,
            "iterations": {t: int(m.n_iter_) for t, m in fitted.models.items()}}
    return _keep(run, payload, meta)


def _read_jets(patterns, label: str, max_jets: int | None) -> dict[str, np.ndarray]:
    return bl.read_columns(patterns, [*bl.STORED_COLUMNS, label], f"the jet-class baseline needs them; {JETS_FIX}",
                           optional=[*SUBSTRUCTURE, bl.WEIGHT_COLUMN], max_examples=max_jets)


def jet_class_quantities(raw: dict[str, np.ndarray]) -> tuple[np.ndarray, list[str]]:
    """(float32 [N, F], names): the tau baseline's jet-level quantities, then the stored substructure where held
    (soft-drop mass and the N-subjettiness ratios tau21, tau32, tau43, which separate 1-, 2- and 3-prong jets)."""
    columns, names = [bl.jet_quantities(raw)], list(bl.JET_QUANTITIES)
    if "jet_sdmass" in raw:
        columns.append(raw["jet_sdmass"][:, None])
        names.append("jet_sdmass")
    if all(f"jet_tau{i}" in raw for i in (1, 2, 3, 4)):
        taus = [raw[f"jet_tau{i}"].astype(np.float64) for i in (1, 2, 3, 4)]
        ratios = [b / np.maximum(a, 1e-9) for a, b in zip(taus[:-1], taus[1:])]
        columns.append(np.stack(ratios, axis=1))
        names += ["tau21", "tau32", "tau43"]
    return np.concatenate(columns, axis=1).astype(np.float32), names


def class_baseline(run, max_train_jets: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(payload on the evaluated split, facts) of the jet-class baseline, fitted once per run and kept."""
    spec = runs.absolute_paths(run.spec)
    task = class_task(spec)
    key = {"version": BASELINE_VERSION, "kind": "jet-class", "train": spec.data.train,
           "test": getattr(spec.data, run.split), "split": run.split, "task": task.name, "label": task.label_key,
           "max_train_jets": max_train_jets, "seed": spec.training.seed}
    if (found := _cached(run, key)) is not None:
        return found
    started = time.perf_counter()
    train = _read_jets(spec.data.train, task.label_key, max_train_jets)
    x, names = jet_class_quantities(train)
    rows = train[task.label_key] >= 0
    classes, counts = np.unique(train[task.label_key][rows], return_counts=True)
    if len(classes) < 2:
        raise UserError(f"baseline: the training jets of task {task.name} hold a single class; generate more data")
    weights = train[bl.WEIGHT_COLUMN][rows] if bl.WEIGHT_COLUMN in train else None
    model = bl.classifier(spec.training.seed, int(rows.sum()), early=counts.min() >= bl.EARLY_STOPPING_MIN)
    model.fit(x[rows], train[task.label_key][rows], sample_weight=weights)
    test = _read_jets(getattr(spec.data, run.split), task.label_key, None)
    keep = test[task.label_key] >= 0
    x_test, _ = jet_class_quantities(test)
    scores = np.zeros((int(keep.sum()), task.output_dim if task.kind == "multiclass" else 2), dtype=np.float32)
    scores[:, model.classes_.astype(int)] = model.predict_proba(x_test[keep])  # classes absent in training: 0
    arrays = {"scores": scores, "label": test[task.label_key][keep].astype(np.int64),
              "pt": test["jet_pt"][keep].astype(np.float32)}
    if bl.WEIGHT_COLUMN in test:
        arrays["weight"] = test[bl.WEIGHT_COLUMN][keep].astype(np.float32)
    payload = {"arrays": {task.name: arrays}, "count": {task.name: float(keep.sum())}}
    meta = {"key": key, "train_jets": {task.name: int(rows.sum())}, "fit_seconds": time.perf_counter() - started,
            "iterations": {task.name: int(model.n_iter_)}, "quantities": names}
    return _keep(run, payload, meta)


SETTINGS_HTML = ("31 leaves, learning rate 0.1, L2 1.0, at least 100 jets per leaf (20 below 20,000 jets), early "
                 "stopping on 10 % of the training jets")


def _quantities_table(names: list[str], **meanings: str) -> str:
    meaning = {**bl.JET_QUANTITIES, "jet_sdmass": "soft-drop mass (GeV), as stored",
               "tau21": "N-subjettiness ratio tau2 / tau1", "tau32": "tau3 / tau2", "tau43": "tau4 / tau3", **meanings}
    return "<table>" + "".join(f"<tr><td><code>{k}</code></td><td>{html.escape(meaning[k])}</td></tr>"
                               for k in names) + "</table>"


def _fitted(meta: dict[str, Any]) -> str:
    jets = meta.get("train_jets", {})
    return (f"Fitted on the <b>same train split</b> as the transformer ({', '.join(f'{t} {n:,}' for t, n in jets.items())}"
            f" jets) in {meta.get('fit_seconds', 0):.0f} s, evaluated on the same test jets.")


def tau_baseline_html(meta: dict[str, Any]) -> str:
    return ("<p>scikit-learn <code>HistGradientBoostingClassifier</code> (tau ID on all jets; charge and decay mode on "
            "tau jets) and <code>HistGradientBoostingRegressor</code> (absolute error, log(pT_vis / pT_jet) on tau "
            f"jets), {SETTINGS_HTML}. {_fitted(meta)} Its inputs, one row per jet computed from the stored "
            f"candidates:</p>{_quantities_table(list(bl.JET_QUANTITIES))}")


def class_baseline_html(meta: dict[str, Any]) -> str:
    names = meta.get("quantities", list(bl.JET_QUANTITIES))
    stored = "candidates and substructure" if len(names) > len(bl.JET_QUANTITIES) else "candidates (no substructure)"
    return (f"<p>scikit-learn <code>HistGradientBoostingClassifier</code> of the jet class, {SETTINGS_HTML}, weighted "
            f"by the example weights where the data carry them. {_fitted(meta)} Its inputs, one row per jet computed "
            f"from the stored {stored}:</p>"
            f"{_quantities_table(names, n_constituents='number of particle-flow candidates (all stored)')}")
