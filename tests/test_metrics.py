"""The classification and regression metrics against hand computations: the working-point rejection on the
log-likelihood ratio (ties at p = 1.0 resolved, lower bounds when no background passes), Clopper-Pearson intervals,
example weights (small integer weights equal repeated examples) and weighted quantiles; the response plot's labels."""

import math
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from scipy.stats import binomtest
from sklearn.metrics import roc_auc_score
from train_helpers import tiny_job

from hepml_dist.evaluate.metrics import (
    ONE_SIGMA,
    Collector,
    binomial,
    class_log_probabilities,
    class_probabilities,
    classification_metrics,
    compute_metrics,
    effective_count,
    log_ratio,
    rejection,
    weighted_efficiency,
    weighted_quantile,
)
from hepml_dist.evaluate.plots import response_figure
from hepml_dist.spec import parse_spec

BINARY = SimpleNamespace(kind="binary", classes=None, name="is_signal")


def two_class_log_probs(d: np.ndarray) -> np.ndarray:
    """log_softmax of logits (0, d): log(p1 / p0) = d."""
    d = np.asarray(d, dtype=np.float64)
    return np.stack([-np.logaddexp(0, d), d - np.logaddexp(0, d)], axis=1)


@pytest.fixture
def spec(tmp_path):
    return parse_spec(tiny_job(tmp_path))


def collect(spec, diffs, labels, weight=None):
    """The Collector's metrics for logits (0, d) of the binary task `is_signal` (the regression task rides along)."""
    n = len(diffs)
    logits = torch.stack([torch.zeros(n), torch.tensor(diffs, dtype=torch.float32)], dim=1)
    target = torch.linspace(1.0, 2.0, n)
    batch = {"label_is_signal": torch.tensor(labels), "target_log_n": target, "jet_pt": torch.full((n,), 50.0)}
    if weight is not None:
        batch["weight"] = torch.tensor(weight, dtype=torch.float32)
    outputs = {"is_signal": logits, "size": (target + 0.01 * torch.arange(n) - 0.05)[:, None]}
    collector = Collector(spec)
    collector.update(outputs, batch, {"is_signal": torch.tensor(0.5), "size": torch.tensor(0.1)})
    return compute_metrics(spec, collector.local()), collector.local()


def test_ties_at_probability_one_are_resolved_by_the_log_ratio(spec):
    # three signal jets and one background jet whose float32 probability of being signal is exactly 1.0
    diffs = [20.0, 25.0, 30.0, 22.0, -1.0, -2.0, -3.0]
    labels = [1, 1, 1, 0, 0, 0, 0]
    probs = class_probabilities(BINARY, torch.stack([torch.zeros(7), torch.tensor(diffs)], 1))
    assert (probs[[0, 1, 2, 3], 1] == 1.0).all()  # all tie on the probability
    metrics, payload = collect(spec, diffs, labels)
    arrays = payload["arrays"]["is_signal"]
    np.testing.assert_allclose(log_ratio(arrays["log_probs"]), diffs, rtol=1e-6)
    # at 50 %: the cut keeps the two most signal-like taus (d >= 25); the background jet at d = 22 fails it.
    # Cut on the probability, it would pass (1.0 >= 1.0) and give a rejection of 4.
    assert metrics["val_is_signal_rejection_at_50"] == 4.0
    assert metrics["val_is_signal_rejection_at_50_is_lower_bound"] == 1.0
    # at 90 %: all three taus are needed, the cut is at d = 20, the background jet passes: 4 / 1
    assert metrics["val_is_signal_rejection_at_90"] == 4.0
    assert metrics["val_is_signal_rejection_at_90_is_lower_bound"] == 0.0
    assert metrics["val_is_signal_auc"] == pytest.approx(roc_auc_score(labels, diffs))  # 11 of 12 pairs
    assert metrics["val_is_signal_auc"] == pytest.approx(11 / 12)


def test_single_logit_log_probabilities_match_the_probabilities():
    logits = torch.tensor([[-30.0], [-2.0], [0.0], [3.0], [40.0]])
    log_p = class_log_probabilities(BINARY, logits)
    np.testing.assert_allclose(log_p.exp(), class_probabilities(BINARY, logits), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(log_ratio(log_p.numpy()), logits[:, 0].numpy(), rtol=1e-6)  # the logit itself


def test_a_cut_that_passes_no_background_is_a_lower_bound():
    labels = np.array([0, 0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.8, 0.9])
    found = rejection(labels, scores, 0.5)
    assert found.lower_bound and found.value == 4 and found.passing == 0 and found.background == 4
    assert found.high == math.inf
    # the low end is 1 / (upper Clopper-Pearson limit of 0 of 4): 1 / (1 - 0.1587^(1/4))
    assert found.low == pytest.approx(1 / (1 - ((1 - ONE_SIGMA) / 2) ** 0.25))
    assert found.text() == ">= 4 (0 pass)"


def test_rejection_and_its_interval():
    # 10 signal at 1..10, 100 background at 0.05..5: the cut at 90 % keeps signal >= 2, passing background >= 2
    labels = np.array([1] * 10 + [0] * 100)
    scores = np.concatenate([np.arange(1, 11), np.linspace(0.05, 5, 100)])
    found = rejection(labels, scores, 0.9)
    k = int((scores[10:] >= 2).sum())
    assert found.passing == k and found.value == pytest.approx(100 / k) and not found.lower_bound
    ci = binomtest(k, 100).proportion_ci(confidence_level=ONE_SIGMA, method="exact")
    assert found.low == pytest.approx(1 / ci.high) and found.high == pytest.approx(1 / ci.low)
    assert k == 61 and found.text() == "1.64 [1.51, 1.80]"  # three significant figures, no thousands separator


def test_clopper_pearson_against_scipy():
    low, high = binomial(2, 100)
    ci = binomtest(2, 100).proportion_ci(confidence_level=ONE_SIGMA, method="exact")
    assert (low, high) == (pytest.approx(ci.low), pytest.approx(ci.high))
    ci95 = binomtest(2, 100).proportion_ci(confidence_level=0.95, method="exact")
    assert binomial(2, 100, cl=0.95) == (pytest.approx(ci95.low), pytest.approx(ci95.high))
    # the ends by hand: 0 of n -> [0, 1 - (a/2)^(1/n)], n of n -> [(a/2)^(1/n), 1]; vectorised; n = 0 undefined
    a = 1 - ONE_SIGMA
    low, high = binomial(np.array([0, 10, 3]), np.array([10, 10, 0]))
    np.testing.assert_allclose(low[:2], [0, (a / 2) ** 0.1])
    np.testing.assert_allclose(high[:2], [1 - (a / 2) ** 0.1, 1])
    assert np.isnan(low[2]) and np.isnan(high[2])
    assert weighted_efficiency(np.arange(100) < 2) == (0.02, pytest.approx(ci.low), pytest.approx(ci.high))


def test_weighted_metrics_equal_repeated_examples():
    # hand computation: signal d = 3 (w 2), 1 (w 1); background d = 2 (w 1), 0 (w 3), -1 (w 1)
    d = np.array([3.0, 1.0, 2.0, 0.0, -1.0])
    labels = np.array([1, 1, 0, 0, 0])
    w = np.array([2, 1, 1, 3, 1])
    found = classification_metrics(BINARY, two_class_log_probs(d), labels, w)
    # AUC: weighted signal-background pairs ordered right: 2 * 5 + 1 * (3 + 1) = 14 of 3 * 5
    assert found["auc"] == pytest.approx(14 / 15)
    # accuracy: arg-max wrong only for the background at d = 2 (w 1); d = 0 ties and picks class 0: 7 of 8
    assert found["accuracy"] == pytest.approx(7 / 8)
    # 50 %: the d = 3 signal alone holds 2 of 3 -> cut at 3, nothing passes -> effective background count 25 / 11
    assert found["rejection_at_50_is_lower_bound"] == 1.0
    assert found["rejection_at_50"] == pytest.approx(effective_count([1, 3, 1])) == pytest.approx(25 / 11)
    # 90 %: cut at 1, the background at d = 2 passes: 5 / 1
    assert found["rejection_at_90"] == pytest.approx(5.0) and found["rejection_at_90_is_lower_bound"] == 0.0
    repeated = classification_metrics(BINARY, two_class_log_probs(np.repeat(d, w)), np.repeat(labels, w))
    for key in ("auc", "accuracy", "rejection_at_90"):
        assert found[key] == pytest.approx(repeated[key]), key
    assert roc_auc_score(np.repeat(labels, w), np.repeat(d, w)) == pytest.approx(14 / 15)


def test_collector_keeps_weights_and_weighted_metrics_equal_repetition(spec):
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, 300)
    diffs = (rng.normal(size=300) + 0.5 * (2 * labels - 1)).tolist()
    w = rng.integers(1, 4, 300)
    weighted, payload = collect(spec, diffs, labels.tolist(), w.tolist())
    np.testing.assert_array_equal(payload["arrays"]["is_signal"]["weight"], w)
    repeated, _ = collect(spec, np.repeat(diffs, w).tolist(), np.repeat(labels, w).tolist())
    assert weighted.keys() == repeated.keys()
    for key in weighted:
        if key.startswith("val_is_signal_") and not key.endswith("_loss"):  # the regression inputs differ
            assert weighted[key] == pytest.approx(repeated[key], rel=1e-6), key
    assert weighted["val_is_signal_rejection_at_50_is_lower_bound"] == 0.0
    unweighted, payload = collect(spec, diffs, labels.tolist())
    np.testing.assert_array_equal(payload["arrays"]["is_signal"]["weight"], 1)  # no weight in the batch: ones
    assert unweighted["val_is_signal_auc"] != pytest.approx(weighted["val_is_signal_auc"], rel=1e-9)


def test_multiclass_auc_and_rejection_against_direct_computation():
    task = SimpleNamespace(kind="multiclass", classes=["bkg", "a", "b"], name="mode")
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 600)
    logits = rng.normal(size=(600, 3)) + 0.7 * np.eye(3)[labels]
    log_p = torch.log_softmax(torch.tensor(logits), 1).numpy()
    found = classification_metrics(task, log_p, labels)
    assert found["auc"] == pytest.approx(roc_auc_score(labels, np.exp(log_p), multi_class="ovr", average="macro"))
    for c, name in ((1, "a"), (2, "b")):
        pick = (labels == 0) | (labels == c)
        disc = np.exp(log_p[pick, c]) / (np.exp(log_p[pick, c]) + np.exp(log_p[pick, 0]))  # ParT's s_c / (s_c + s_0)
        signal = disc[labels[pick] == c]
        cut = np.sort(signal)[::-1][math.ceil(0.5 * len(signal)) - 1]
        background = disc[labels[pick] == 0]
        assert found[f"rejection_at_50_{name}"] == pytest.approx(len(background) / (background >= cut).sum())
        assert found[f"rejection_at_50_{name}_is_lower_bound"] == 0.0


def test_weighted_quantiles():
    assert weighted_quantile([1.0, 2.0, 3.0, 10.0], 0.5) == 2.5  # even count: mean of the middle two
    assert weighted_quantile([1.0, 2.0, 3.0, 10.0], 0.5, [3, 1, 1, 1]) == 1.5  # as 1, 1, 1, 2, 3, 10
    assert weighted_quantile([1.0, 2.0, 3.0, 10.0], 0.5, [1, 1, 1, 5]) == 10.0  # as 1, 2, 3, 10 x 5
    assert weighted_quantile([5.0, 1.0, 7.0], 0.5, [0, 1, 1]) == 4.0  # weight 0: not in the sample
    rng = np.random.default_rng(2)
    values, w = rng.normal(size=41), rng.integers(1, 5, 41)
    q = np.linspace(0, 1, 21)
    expected = np.quantile(np.repeat(values, w), q, method="averaged_inverted_cdf")
    np.testing.assert_allclose(weighted_quantile(values, q, w), expected)
    np.testing.assert_allclose(weighted_quantile(values, q, w * 1e-3), expected)  # the scale of weights is free


def test_residual_targets_are_labelled_as_residuals():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(200, 2))
    pred = true + rng.normal(0, 0.1, size=(200, 2))
    pt = rng.uniform(20, 100, 200)
    figure = response_figure(SimpleNamespace(name="dir", targets=["deta", "sin_dphi"]), pred, true, pt)
    top, bottom = figure.axes
    assert bottom.get_ylabel() == "IQR of the residual (pred - true)" and "IQR / median" not in bottom.get_ylabel()
    assert top.get_ylabel() == "median residual (pred - true)"
    plt.close(figure)
    figure = response_figure(SimpleNamespace(name="pt", targets=["log_pt_ratio"]), pred[:, :1], true[:, :1], pt)
    assert figure.axes[1].get_ylabel() == "resolution (IQR / median)"
    plt.close(figure)
