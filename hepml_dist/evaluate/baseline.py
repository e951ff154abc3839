"""A simple, honest baseline for the tau tasks: gradient-boosted trees on jet-level quantities.

It answers the question a physicist asks of any network: what does it add over a classical analysis of the same
jets? The baseline sees one row of jet-level quantities per jet (`JET_QUANTITIES`: counts of charged candidates,
photons and neutral hadrons, energy fractions, the jet mass, the mass of the charged candidates, the jet width,
the leading-track impact-parameter significance, the jet charge, ...), which is what a cut-based or BDT tau
identification is built from, and fits scikit-learn's `HistGradientBoosting*` on the **train split** of the same
dataset the transformer trained on:

- `tau_id`: classifier on all jets (label_is_tau);
- `charge`: classifier on tau jets (label_charge);
- `decay_mode`: 6-class classifier on tau jets (label_decay_mode);
- `kinematics`: regressor of `log(pT_vis / pT_jet)` on tau jets (only the pT target).

Predictions on the **test split** come back in the layout of `hepml_dist.evaluate.metrics.Collector` payloads
(`arrays[task]` = `scores`/`label`/`pt`, or `pred`/`true`/`pt`), so the report computes the metrics of both models
with the same functions on the same jets. Early stopping uses 10 % of the training jets; no test jet is seen.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

from hepml_dist.data.reader import iter_shard_chunks
from hepml_dist.data.shards import ShardResolver
from hepml_dist.errors import UserError

# What each jet-level quantity is, in the order of the feature matrix. All are computed from stored columns
# (docs/architecture.md, "Stored columns"), vectorised over the jets.
JET_QUANTITIES: dict[str, str] = {
    "jet_pt": "reconstructed jet pT (GeV)",
    "jet_eta": "jet pseudorapidity",
    "jet_mass": "jet invariant mass (GeV)",
    "n_constituents": "number of particle-flow candidates (at most the stored 20)",
    "n_charged": "number of charged candidates (prongs)",
    "n_photons": "number of photons (PID 22)",
    "n_neutral_hadrons": "number of neutral hadrons (PID 130)",
    "n_leptons": "number of electrons and muons",
    "charge_sum": "sum of the candidate charges",
    "lead_pt_fraction": "pT of the leading candidate / jet pT",
    "lead_charged_pt_fraction": "pT of the leading charged candidate / jet pT",
    "charged_pt_fraction": "summed pT of charged candidates / jet pT",
    "photon_pt_fraction": "summed pT of photons / jet pT",
    "neutral_hadron_pt_fraction": "summed pT of neutral hadrons / jet pT",
    "width": "pT-weighted mean Delta R of the candidates to the jet axis",
    "max_delta_r": "largest Delta R of a candidate to the jet axis",
    "charged_mass": "invariant mass of the charged candidates (GeV)",
    "lead_track_d0_significance": "|d0| / sigma(d0) of the leading charged candidate",
    "lead_track_dz_significance": "|dz| / sigma(dz) of the leading charged candidate",
    "max_d0_significance": "largest |d0| / sigma(d0) of the charged candidates",
    "lead_track_charge": "charge of the leading charged candidate",
    "jet_charge": "pT-weighted charge of the charged candidates, sum(q pT) / sum(pT)",
}

STORED_COLUMNS = (
    "part_px", "part_py", "part_pz", "part_energy", "part_charge", "part_pid", "part_n",
    "part_d0val", "part_d0err", "part_dzval", "part_dzerr", "jet_pt", "jet_eta", "jet_phi", "jet_mass",
)
WEIGHT_COLUMN = "weight"
TRUTH_COLUMNS = ("label_is_tau", "label_charge", "label_decay_mode", "target_log_pt_ratio", "gen_tau_pt")
TAU_TASKS = ("tau_id", "charge", "decay_mode", "kinematics")
"""The tasks the baseline fits (the MultiParTau task names); others of a job are ignored."""

_TINY = 1e-9


def jet_quantities(raw: dict[str, np.ndarray]) -> np.ndarray:
    """float32 [N, len(JET_QUANTITIES)] from the stored columns of N jets (padding slots ignored)."""
    px, py, pz, energy = (raw[c].astype(np.float64) for c in ("part_px", "part_py", "part_pz", "part_energy"))
    n, length = px.shape
    real = np.arange(length)[None, :] < raw["part_n"][:, None]
    charge = np.where(real, raw["part_charge"], 0.0)
    pid = np.abs(np.where(real, raw["part_pid"], 0))
    charged = real & (charge != 0)
    photon = real & (pid == 22)
    neutral_hadron = real & (pid == 130)
    lepton = real & ((pid == 11) | (pid == 13))

    pt = np.where(real, np.hypot(px, py), 0.0)
    eta = np.arcsinh(pz / np.maximum(pt, _TINY))
    dphi = np.remainder(np.arctan2(py, px) - raw["jet_phi"][:, None] + np.pi, 2 * np.pi) - np.pi
    delta_r = np.where(real, np.hypot(eta - raw["jet_eta"][:, None], dphi), 0.0)
    jet_pt = np.maximum(raw["jet_pt"].astype(np.float64), _TINY)
    rows = np.arange(n)

    def fraction(mask: np.ndarray) -> np.ndarray:
        return (pt * mask).sum(axis=1) / jet_pt

    charged_pt = pt * charged
    lead_charged = charged_pt.argmax(axis=1)
    has_track = charged.any(axis=1)

    def lead_track(values: np.ndarray) -> np.ndarray:
        return np.where(has_track, values[rows, lead_charged], 0.0)

    d0_sig = np.where(charged, np.abs(raw["part_d0val"]) / np.maximum(raw["part_d0err"], _TINY), 0.0)
    dz_sig = np.where(charged, np.abs(raw["part_dzval"]) / np.maximum(raw["part_dzerr"], _TINY), 0.0)
    sums = [(c * charged).sum(axis=1) for c in (px, py, pz, energy)]
    charged_mass = np.sqrt(np.maximum(sums[3] ** 2 - sums[0] ** 2 - sums[1] ** 2 - sums[2] ** 2, 0.0))

    columns = {
        "jet_pt": raw["jet_pt"],
        "jet_eta": raw["jet_eta"],
        "jet_mass": raw["jet_mass"],
        "n_constituents": real.sum(axis=1),
        "n_charged": charged.sum(axis=1),
        "n_photons": photon.sum(axis=1),
        "n_neutral_hadrons": neutral_hadron.sum(axis=1),
        "n_leptons": lepton.sum(axis=1),
        "charge_sum": charge.sum(axis=1),
        "lead_pt_fraction": pt.max(axis=1) / jet_pt,
        "lead_charged_pt_fraction": charged_pt.max(axis=1) / jet_pt,
        "charged_pt_fraction": fraction(charged),
        "photon_pt_fraction": fraction(photon),
        "neutral_hadron_pt_fraction": fraction(neutral_hadron),
        "width": (pt * delta_r).sum(axis=1) / np.maximum(pt.sum(axis=1), _TINY),
        "max_delta_r": delta_r.max(axis=1),
        "charged_mass": charged_mass,
        "lead_track_d0_significance": lead_track(d0_sig),
        "lead_track_dz_significance": lead_track(dz_sig),
        "max_d0_significance": d0_sig.max(axis=1),
        "lead_track_charge": lead_track(charge),
        "jet_charge": (charged_pt * charge).sum(axis=1) / np.maximum(charged_pt.sum(axis=1), _TINY),
    }
    assert list(columns) == list(JET_QUANTITIES)
    return np.stack([np.asarray(v, dtype=np.float64) for v in columns.values()], axis=1).astype(np.float32)


def read_columns(patterns: str | Sequence[str], wanted: Sequence[str], needs: str, *, optional: Sequence[str] = (),
                 max_examples: int | None = None) -> dict[str, np.ndarray]:
    """Columns of one split (a split folder, glob or list of shards), in stored order, at most `max_examples` rows:
    every `wanted` one (a shard lacking one is a UserError saying the baseline `needs` ...) and each `optional` one
    that every shard holds."""
    resolver = ShardResolver()
    refs = resolver.resolve(patterns)
    for ref in refs:
        missing = [c for c in wanted if c not in resolver.manifests[ref.dataset].columns]
        if missing:
            raise UserError(f"baseline: {ref.source} lacks column(s) {missing}; {needs}")
    wanted = [*wanted, *(c for c in optional
                         if c not in wanted and all(c in resolver.manifests[r.dataset].columns for r in refs))]
    parts: dict[str, list[np.ndarray]] = {c: [] for c in wanted}
    count = 0
    for ref in refs:
        shapes = {c: resolver.manifests[ref.dataset].columns[c].shape for c in wanted}
        for _, arrays in iter_shard_chunks(ref.source, columns=wanted, shapes=shapes,
                                           expected_chunks=len(ref.info.chunks)):
            for c in wanted:
                parts[c].append(arrays[c])
            count += len(arrays[wanted[0]])
            if max_examples is not None and count >= max_examples:
                break
        if max_examples is not None and count >= max_examples:
            break
    return {c: np.concatenate(v)[:max_examples] for c, v in parts.items()}


def read_split(patterns: str | Sequence[str], max_examples: int | None = None) -> dict[str, np.ndarray]:
    """The tau baseline's stored columns of one split, and the example weights when every shard carries them (the
    baseline's numbers are then weighted like the model's)."""
    return read_columns(patterns, [*STORED_COLUMNS, *TRUTH_COLUMNS], "the tau baseline needs an fcc-tau dataset "
                        "(hepml data generate fcc-tau, or hepml data convert --schema fcc-tau)",
                        optional=[WEIGHT_COLUMN], max_examples=max_examples)


@dataclass
class Baseline:
    """The fitted models by task name, and how they were made (for the report)."""

    models: dict[str, Any] = field(default_factory=dict)
    train_jets: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0


EARLY_STOPPING_MIN = 20
"""Early stopping (on 10 % of the training jets) needs this many jets of the rarest class; else 100 iterations."""


def _settings(n: int, early: bool) -> dict[str, Any]:
    # L2 and a minimum leaf size keep the 6-class decay-mode fit stable: without them the rare "other" class
    # makes the boosting diverge (test accuracy 0.97 -> 0.58 at 200 iterations on 130k tau jets)
    return dict(max_iter=300 if early else 100, learning_rate=0.1, max_leaf_nodes=31, l2_regularization=1.0,
                min_samples_leaf=100 if n >= 20_000 else 20, early_stopping=early, validation_fraction=0.1,
                n_iter_no_change=20)


def classifier(seed: int, n: int, early: bool):
    return HistGradientBoostingClassifier(random_state=seed, **_settings(n, early))


def _regressor(seed: int, n: int, early: bool):
    # absolute error: the median response is what the report quotes, and it resists the tails
    return HistGradientBoostingRegressor(loss="absolute_error", random_state=seed, **_settings(n, early))


def _task_rows(raw: dict[str, np.ndarray], task: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows the task is defined on and its truth (the MultiParTau definitions: tau-only tasks on tau jets)."""
    if task == "tau_id":
        return np.ones(len(raw["label_is_tau"]), dtype=bool), raw["label_is_tau"]
    tau = raw["label_is_tau"] == 1
    if task == "kinematics":
        return tau & np.isfinite(raw["target_log_pt_ratio"]), raw["target_log_pt_ratio"]
    label = raw[f"label_{task}"]
    return tau & (label >= 0), label


def fit_baseline(train: dict[str, np.ndarray], seed: int = 0, tasks: Sequence[str] = TAU_TASKS) -> Baseline:
    """Fit one gradient-boosted model per task on the train-split jets."""
    start = time.perf_counter()
    x = jet_quantities(train)
    baseline = Baseline()
    for task in tasks:
        rows, truth = _task_rows(train, task)
        if rows.sum() < 20:
            raise UserError(f"baseline: only {int(rows.sum())} training jets for task {task}; generate more data")
        if task == "kinematics":
            model = _regressor(seed, int(rows.sum()), early=rows.sum() >= 10 * EARLY_STOPPING_MIN)
        else:
            classes, counts = np.unique(truth[rows], return_counts=True)
            if len(classes) < 2:
                raise UserError(f"baseline: the training jets of task {task} hold a single class; generate more data")
            model = classifier(seed, int(rows.sum()), early=counts.min() >= EARLY_STOPPING_MIN)
        model.fit(x[rows], truth[rows])
        baseline.models[task] = model
        baseline.train_jets[task] = int(rows.sum())
    baseline.seconds = time.perf_counter() - start
    return baseline


def predict_baseline(baseline: Baseline, test: dict[str, np.ndarray], num_classes: dict[str, int] | None = None
                     ) -> dict[str, Any]:
    """Predictions on the test jets as a Collector-style payload: {"arrays": {task: {...}}, "count": {...}}."""
    x = jet_quantities(test)
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for task, model in baseline.models.items():
        rows, truth = _task_rows(test, task)
        pt = test["gen_tau_pt"][rows].astype(np.float32)
        if task == "kinematics":
            pred = model.predict(x[rows]).astype(np.float32)
            arrays[task] = {"pred": pred[:, None], "true": truth[rows].astype(np.float32)[:, None], "pt": pt}
        else:
            k = (num_classes or {}).get(task, 2 if task in ("tau_id", "charge") else 6)
            scores = np.zeros((int(rows.sum()), k), dtype=np.float32)
            scores[:, model.classes_.astype(int)] = model.predict_proba(x[rows])  # classes absent in training: 0
            arrays[task] = {"scores": scores, "label": truth[rows].astype(np.int64), "pt": pt}
        if WEIGHT_COLUMN in test:
            arrays[task]["weight"] = test[WEIGHT_COLUMN][rows].astype(np.float32)
    return {"arrays": arrays, "count": {t: float(len(a["pt"])) for t, a in arrays.items()}}
