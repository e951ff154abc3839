"""Expected significance of an event classifier (AOT): the formula and its error against hand computations, the
scaling of a split's xsec weights to the dataset, the scan over cuts, and AOT end to end through `hepml evaluate`
and `hepml report` (tiny generated events-met data, a few training steps in this process)."""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from hepml_dist.cli import app
from hepml_dist.data.manifest import read_manifest
from hepml_dist.data.reader import iter_shard_chunks
from hepml_dist.evaluate.baseline_events import LEADING_OBJECTS, event_rows
from hepml_dist.evaluate.report import load_predictions
from hepml_dist.evaluate.significance import (
    asimov_significance,
    significance_error,
    significance_scan,
    yield_scales,
)
from hepml_dist.generate import get_process
from hepml_dist.generate.runner import generate_dataset
from hepml_dist.runs import write_run_spec
from hepml_dist.spec import load_job
from hepml_dist.train.loop import train_loop_per_worker


ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


# ----------------------------------------------------------------------------------------------------------------------
# The formula


@pytest.mark.parametrize("s, b, by_hand", [
    (10.0, 100.0, 0.98399),  # sqrt(2 (110 ln 1.1 - 10)) = sqrt(2 x 0.484120)
    (5.0, 1.0, 3.39133),  # sqrt(2 (6 ln 6 - 5)) = sqrt(2 x 5.750557)
    (50.0, 50.0, 6.21526),  # sqrt(2 (100 ln 2 - 50)) = sqrt(2 x 19.314718)
    (1.0, 1.0e6, 1.0e-3),  # s << b: s / sqrt(b)
])
def test_significance_matches_hand_computation(s, b, by_hand):
    assert asimov_significance(s, b) == pytest.approx(by_hand, rel=2e-5)


def test_significance_tends_to_s_over_sqrt_b_and_stays_accurate_for_tiny_s_over_b():
    for s, b in ((1e-3, 1e4), (1e-6, 1.0), (2.0, 1e9)):
        assert asimov_significance(s, b) == pytest.approx(s / math.sqrt(b), rel=1e-6)
    # the leading correction: Z = s/sqrt(b) (1 - s/(6b) + ...); at s/b = 1e-2 it is 0.17 %
    assert asimov_significance(1.0, 100.0) / 0.1 == pytest.approx(1 - 1 / 600, rel=1e-4)
    assert asimov_significance(0.0, 10.0) == 0.0 and asimov_significance(3.0, 0.0) == math.inf


@pytest.mark.parametrize("s, b, s_var, b_var", [(10.0, 100.0, 4.0, 25.0), (5.0, 1.0, 1.0, 0.3),
                                                (0.01, 1e5, 1e-5, 1e4)])
def test_error_is_the_linear_propagation_of_the_weighted_count_variances(s, b, s_var, b_var):
    # numerical partial derivatives (central differences), independent of the analytic ones in the module
    ds, db = 1e-6 * s, 1e-6 * b
    dz_ds = (asimov_significance(s + ds, b) - asimov_significance(s - ds, b)) / (2 * ds)
    dz_db = (asimov_significance(s, b + db) - asimov_significance(s, b - db)) / (2 * db)
    expected = math.sqrt(dz_ds ** 2 * s_var + dz_db ** 2 * b_var)
    assert significance_error(s, b, s_var, b_var) == pytest.approx(expected, rel=1e-4)


def test_error_by_hand_and_in_the_s_over_sqrt_b_limit():
    # s = 10, b = 100: dZ/ds = ln 1.1 / Z = 0.096861, dZ/db = (ln 1.1 - 0.1) / Z = -0.0047661
    by_hand = math.sqrt(0.096861 ** 2 * 4 + 0.0047661 ** 2 * 25)
    assert significance_error(10.0, 100.0, 4.0, 25.0) == pytest.approx(by_hand, rel=1e-4)
    # Z = s / sqrt(b): var Z = var s / b + s^2 var b / (4 b^3)
    s, b, s_var, b_var = 1e-3, 1e4, 2e-7, 50.0
    assert significance_error(s, b, s_var, b_var) == pytest.approx(
        math.sqrt(s_var / b + s * s * b_var / (4 * b ** 3)), rel=1e-5)


# ----------------------------------------------------------------------------------------------------------------------
# From a split to expected yields; the scan


def test_split_weights_scale_to_the_whole_dataset_per_process():
    stored = {0: 100, 1: 50, 2: 40}
    process = np.array([0] * 25 + [1] * 5 + [2] * 40)  # a split holding 1/4, 1/10 and all of the three processes
    scales = yield_scales(stored, process)
    assert np.allclose(scales, [4.0] * 25 + [10.0] * 5 + [1.0] * 40)
    # xsec weights sigma / N_p of the stored events sum to sigma; the scaled split reproduces that
    sigma = {0: 7.0, 1: 300.0, 2: 20.0}
    xsec = np.array([sigma[p] / stored[p] for p in process])
    for p in sigma:
        assert (xsec * scales)[process == p].sum() == pytest.approx(sigma[p])


def test_scan_finds_the_cut_with_the_largest_significance():
    rng = np.random.default_rng(3)
    signal = rng.random(400) < 0.3
    scores = np.where(signal, rng.normal(1.5, 1, 400), rng.normal(0, 1, 400))
    yields = np.where(signal, 0.05, rng.uniform(0.5, 2.0, 400))
    scan = significance_scan(scores, signal, yields, min_background=10)
    brute = []
    for cut in np.unique(scores):
        passed = scores >= cut
        if (passed & ~signal).sum() >= 10:
            s, b = yields[passed & signal].sum(), yields[passed & ~signal].sum()
            brute.append((math.sqrt(2 * ((s + b) * math.log(1 + s / b) - s)), cut, s, b))
    z, cut, s, b = max(brute)
    assert scan.z[scan.best] == pytest.approx(z) and scan.cuts[scan.best] == cut
    assert scan.s[scan.best] == pytest.approx(s) and scan.b[scan.best] == pytest.approx(b)
    assert scan.signal_efficiency[scan.best] == pytest.approx(s / yields[signal].sum())


# ----------------------------------------------------------------------------------------------------------------------
# AOT end to end


TINY = ["data.batch_size=32", "data.steps_per_epoch=4", "data.val_steps=1", "data.loader_workers=0",
        "training.epochs=2", "training.eval_interval=4", "training.log_interval=2", "parallel.num_workers=1",
        "tracking.mode=disabled", "model.luminosity_fb=300"]


@pytest.fixture(scope="module")
def aot_run(tmp_path_factory):
    """jobs/aot-quickstart.yaml trained 8 steps, in this process, on 1000 generated events (~300 selected)."""
    root = tmp_path_factory.mktemp("aot")
    generate_dataset(get_process("events-met"), 1000, root / "events", seed=5, workers=1, show_progress=False)
    spec = load_job(ROOT / "jobs/aot-quickstart.yaml", [*TINY, *(f"data.{s}={root / 'events' / s}"
                                                                for s in ("train", "val", "test"))])
    train_loop_per_worker({"spec": spec.model_dump(mode="json"), "run_dir": str(root / "run")})
    write_run_spec(root / "run", spec)  # as `hepml train` does
    return root


def test_aot_evaluate_and_report_quote_the_expected_significance(aot_run):
    run_dir = aot_run / "run"
    result = runner.invoke(app, ["evaluate", str(run_dir)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    for name in ("test_signal_auc", "test_signal_significance", "test_signal_significance_err",
                 "test_signal_best_cut", "test_signal_rejection_ttbar_at_best_cut",
                 "test_signal_rejection_Znunu_at_50"):
        assert math.isfinite(metrics[name]), name
    assert metrics["test_signal_luminosity_fb"] == 300

    result = runner.invoke(app, ["report", str(run_dir), "--no-track"])
    assert result.exit_code == 0, result.output
    page = (run_dir / "report.html").read_text()
    assert 'id="signal_significance"' in page and "expected significance at 300 fb^-1" in page
    assert "<td>Wlnu</td>" in page and "jet_pt" not in page  # no tau baseline for AOT, but its own
    assert "HistGradientBoostingClassifier on 28 quantities per event" in page  # 4 event features + 4 x 6
    baseline, meta = load_predictions(run_dir / "baseline" / "predictions-test.npz")
    assert len(baseline["arrays"]["signal"]["label"]) == sum(
        read_manifest(aot_run / "events").splits["test"].class_counts["label_signal"].values())  # every test event

    # recompute Z at the quoted cut from the predictions and the manifest, independently of the module
    payload, _ = load_predictions(run_dir / "predictions-test.npz")
    arrays = payload["arrays"]["signal"]
    manifest = read_manifest(aot_run / "events")
    log_probs = arrays["log_probs"].astype(np.float64)
    score = log_probs[:, 1] - log_probs[:, 0]
    process = arrays["label_process"].astype(int)
    yields = arrays["gen_xsec_weight"].astype(np.float64) * 300
    for p in np.unique(process):
        stored = sum(split.class_counts["label_process"].get(str(p), 0) for split in manifest.splits.values())
        yields[process == p] *= stored / (process == p).sum()
    # the whole dataset's xsec weights sum to the expected selected events per fb^-1, as the scaled split does
    total = sum(float(read_split_xsec(aot_run / "events" / s)) for s in ("train", "val", "test")) * 300
    assert yields.sum() == pytest.approx(total, rel=1e-4)
    passed = score >= metrics["test_signal_best_cut"]
    signal = arrays["label"].astype(int) == 1
    s, b = yields[passed & signal].sum(), yields[passed & ~signal].sum()
    assert metrics["test_signal_expected_signal"] == pytest.approx(s, rel=1e-5)
    assert metrics["test_signal_significance"] == pytest.approx(math.sqrt(2 * ((s + b) * math.log(1 + s / b) - s)),
                                                                rel=1e-5)
    s_var, b_var = (yields[passed & signal] ** 2).sum(), (yields[passed & ~signal] ** 2).sum()
    assert metrics["test_signal_significance_err"] == pytest.approx(
        float(significance_error(s, b, s_var, b_var)), rel=1e-5)


def read_split_xsec(folder: Path) -> float:
    """Sum of gen_xsec_weight over the stored events of a split folder, read straight from its shards."""
    return sum(float(arrays["gen_xsec_weight"].astype(np.float64).sum())
               for shard in sorted(folder.glob("*.tar"))
               for _, arrays in iter_shard_chunks(shard, columns=["gen_xsec_weight"]))


def test_report_of_aot_data_without_xsec_weights_is_exit_2_naming_column_and_family(aot_run, tmp_path):
    data = tmp_path / "events"
    shutil.copytree(aot_run / "events", data)
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest["columns"]["gen_xsec_weight"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    run_dir = tmp_path / "run"
    shutil.copytree(aot_run / "run", run_dir)
    spec = (run_dir / "spec.yaml").read_text().replace(str(aot_run / "events"), str(data))
    (run_dir / "spec.yaml").write_text(spec)
    for left in ("predictions-test.npz", "report.html"):  # left by the other test, if it ran first
        (run_dir / left).unlink(missing_ok=True)
    result = runner.invoke(app, ["report", str(run_dir), "--no-track"])
    assert result.exit_code == 2, result.output
    assert "gen_xsec_weight" in result.output and "aot" in result.output
    assert not (run_dir / "predictions-test.npz").exists() and not (run_dir / "report.html").exists()  # no work done


def test_baseline_rows_hold_event_features_then_leading_objects_with_nan_for_missing_ones():
    objects = np.arange(2 * 5 * 6, dtype=np.float32).reshape(2, 5, 6)
    raw = {"obj_features": objects, "obj_n": np.array([5, 2]), "event_met": np.array([150.0, 300.0]),
           "event_ht": np.array([400.0, 90.0])}
    rows = event_rows(raw, ["met", "ht"])
    assert rows.shape == (2, 2 + LEADING_OBJECTS * 6)
    assert rows[:, :2].tolist() == [[150.0, 400.0], [300.0, 90.0]]
    assert np.array_equal(rows[0, 2:], objects[0, :LEADING_OBJECTS].ravel())  # the fifth object is left out
    assert np.array_equal(rows[1, 2:14], objects[1, :2].ravel()) and np.isnan(rows[1, 14:]).all()
