"""The baseline of an event classifier (AOT): gradient-boosted trees on the event features and the leading objects.

What an analysis would try before a transformer: scikit-learn's `HistGradientBoostingClassifier` on one row per
event, the job's event features (`data.inputs.event_features`, e.g. HT, MET, jet counts) followed by the six
stored features (E, pT, eta, phi, mass, b-tag) of the `LEADING_OBJECTS` leading objects, flattened; a missing
object is NaN (the trees send it down its own branch). It is fitted on the **train split** with the same example
weights as the transformer's loss (`weight`), early-stopped on 10 % of it, and evaluated on the same split as the
transformer. Its predictions come back as a Collector-style payload (with `gen_xsec_weight` and `label_process`),
so the report computes both models' numbers, significance included, with the same functions.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier

from hepml_dist.errors import UserError
from hepml_dist.evaluate.baseline import read_columns
from hepml_dist.evaluate.significance import NEEDED_COLUMNS

LEADING_OBJECTS = 4
"""Objects (pT-ordered as stored) whose features enter the baseline."""
OBJECT_FEATURES = ("E", "pT", "eta", "phi", "mass", "btag")
"""The stored per-object features, in stored order."""
VERSION = 1  # bump when the inputs or settings change, to refit cached baselines


def quantity_names(event_features: Sequence[str]) -> list[str]:
    return [*event_features, *(f"obj{i}_{f}" for i in range(LEADING_OBJECTS) for f in OBJECT_FEATURES)]


def read_events(patterns, label: str, event_features: Sequence[str], max_events: int | None = None
                ) -> dict[str, np.ndarray]:
    """The columns the baseline needs of a split, in stored order."""
    wanted = ["obj_n", "obj_features", *(f"event_{n}" for n in event_features), label, "weight", *NEEDED_COLUMNS]
    return read_columns(patterns, wanted, "the event-classifier baseline needs an events-met dataset "
                        "(hepml data generate events-met)", max_examples=max_events)


def event_rows(raw: dict[str, np.ndarray], event_features: Sequence[str]) -> np.ndarray:
    """float32 [N, F + LEADING_OBJECTS x 6]: event features, then the leading objects' features (NaN if absent)."""
    objects = raw["obj_features"][:, :LEADING_OBJECTS].astype(np.float32)
    if objects.shape[1] < LEADING_OBJECTS:  # a dataset storing fewer objects
        objects = np.pad(objects, ((0, 0), (0, LEADING_OBJECTS - objects.shape[1]), (0, 0)))
    present = np.arange(LEADING_OBJECTS)[None, :] < raw["obj_n"][:, None]
    objects = np.where(present[:, :, None], objects, np.nan)
    events = [raw[f"event_{n}"].astype(np.float32)[:, None] for n in event_features]
    return np.concatenate([*events, objects.reshape(len(objects), -1)], axis=1)


def fit_and_predict(train: dict[str, np.ndarray], test: dict[str, np.ndarray], *, task: str, label: str,
                    event_features: Sequence[str], seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(payload on the test events, facts) of the baseline fitted on the train events."""
    start = time.perf_counter()
    truth = train[label].astype(np.int64)
    if len(np.unique(truth)) < 2 or len(truth) < 50:
        raise UserError(f"baseline: {len(truth)} training events with classes {np.unique(truth).tolist()}; "
                        "generate more data")
    model = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.1, max_leaf_nodes=31, l2_regularization=1.0,
                                           min_samples_leaf=20, early_stopping=True, validation_fraction=0.1,
                                           n_iter_no_change=20, random_state=seed)
    model.fit(event_rows(train, event_features), truth, sample_weight=train["weight"].astype(np.float64))
    raw = model.decision_function(event_rows(test, event_features)).astype(np.float64)
    # log p from the raw score (log-sigmoid), which keeps the resolution that probabilities lose near 1
    log_probs = np.stack([-np.logaddexp(0.0, raw), -np.logaddexp(0.0, -raw)], axis=1)
    arrays = {"scores": np.exp(log_probs).astype(np.float32), "log_probs": log_probs.astype(np.float32),
              "label": test[label].astype(np.int64), "weight": test["weight"].astype(np.float32),
              **{c: test[c] for c in NEEDED_COLUMNS}}
    payload = {"arrays": {task: arrays}, "count": {task: float(len(raw))}, "loss_sum": {}}
    facts = {"train_events": int(len(truth)), "fit_seconds": time.perf_counter() - start,
             "iterations": int(model.n_iter_), "quantities": quantity_names(event_features)}
    return payload, facts
