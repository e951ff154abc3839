"""`hepml report`: the HTML page of a fabricated, evaluated run; the numbers it quotes; clear errors."""

import base64
import json
import re
import time

import numpy as np
import pytest
from typer.testing import CliRunner

from hepml_dist.cli import app
from hepml_dist.errors import UserError
from hepml_dist.evaluate.baseline import read_split
from hepml_dist.evaluate.metrics import log_probabilities, log_ratio, rejection
from hepml_dist.evaluate.report import build_report, load_predictions, save_predictions
from hepml_dist.generate import get_process
from hepml_dist.generate.runner import generate_dataset
from hepml_dist.spec import dump_spec, load_job

runner = CliRunner()
CHECKPOINT = "step-00000120"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "fcc-tau"
    generate_dataset(get_process("fcc-tau"), 400, out, seed=7, workers=1, show_progress=False)
    return out


def fabricate_run(run_dir, dataset, seed=0):
    """A run directory as `hepml train` + `hepml evaluate` leave it, with made-up but plausible predictions."""
    spec = load_job("jobs/multipartau-quickstart.yaml", [f"data.{s}={dataset / s}" for s in ("train", "val", "test")])
    run_dir.mkdir(parents=True)
    (run_dir / "spec.yaml").write_text(dump_spec(spec))
    now = time.time()
    records = []
    for step in range(10, 130, 10):
        records.append({"step": step, "epoch": step // 60, "time": now + step, "train_loss": 3.0 / step ** 0.5,
                        "train_tau_id_loss": 1 / step ** 0.5, "train_kinematics_loss": 0.5 / step, "lr": 1e-3,
                        "jets_per_s": 2000.0 + step})
        if step % 60 == 0:
            records.append({"step": step, "epoch": step // 60, "time": now + step, "val_loss": 2.0 / step ** 0.5,
                            "val_tau_id_auc": 0.9 + step / 2000, "val_decay_mode_accuracy": 0.7 + step / 1000})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "params.json").write_text(json.dumps({"torch": "2.13.0", "ray": "2.60", "driver_host": "testhost"}))
    folder = run_dir / "checkpoints" / CHECKPOINT
    folder.mkdir(parents=True)
    (folder / "state.json").write_text(json.dumps({"step": 120, "world_size": 2, "time": now + 125}))

    test = read_split(str(dataset / "test"))
    rng = np.random.default_rng(seed)
    is_tau = test["label_is_tau"]
    tau = is_tau == 1
    p_tau = np.clip(0.8 * is_tau + 0.1 + 0.1 * rng.random(len(is_tau)), 0, 1)  # perfect separation
    decay = test["label_decay_mode"][tau]
    decay_scores = np.full((tau.sum(), 6), 0.02)
    decay_scores[np.arange(tau.sum()), np.where(rng.random(tau.sum()) < 0.8, decay, (decay + 1) % 6)] = 0.9
    charge = test["label_charge"][tau]
    p_plus = np.where(charge == 1, 0.95, 0.05)
    true_log = test["target_log_pt_ratio"][tau]
    pred = np.stack([true_log + rng.normal(0, 0.01, tau.sum())] + [np.zeros(tau.sum())] * 4, axis=1)
    truth = np.stack([true_log] + [np.zeros(tau.sum())] * 4, axis=1)
    pt = test["gen_tau_pt"]
    payload = {
        "arrays": {
            "tau_id": {"scores": np.stack([1 - p_tau, p_tau], 1), "label": is_tau, "pt": pt},
            "charge": {"scores": np.stack([1 - p_plus, p_plus], 1), "label": charge, "pt": pt[tau]},
            "decay_mode": {"scores": decay_scores, "label": decay, "pt": pt[tau]},
            "kinematics": {"pred": pred.astype(np.float32), "true": truth.astype(np.float32), "pt": pt[tau]},
        },
        "count": {"tau_id": float(len(is_tau)), "charge": float(tau.sum()), "decay_mode": float(tau.sum()),
                  "kinematics": float(tau.sum())},
        "loss_sum": {"tau_id": 1.0, "charge": 1.0, "decay_mode": 1.0, "kinematics": 1.0},
    }
    save_predictions(run_dir / "predictions-test.npz", payload, {"checkpoint": str(folder), "split": "test"})
    evaluation = {"checkpoint": str(folder), "split": "test", "examples": payload["count"], "metrics": {}}
    (run_dir / "metrics.json").write_text(json.dumps(evaluation))
    return payload


def test_report_has_every_section_and_embeds_its_images(dataset, tmp_path):
    run_dir = tmp_path / "run"
    payload = fabricate_run(run_dir, dataset)
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 0, result.output
    path = run_dir / "report.html"
    assert f"report: {path.resolve()}" in result.output
    page = path.read_text()
    for anchor in ("summary", "facts", "training", "tau_id", "charge", "decay_mode", "kinematics", "baseline"):
        assert f'id="{anchor}"' in page, anchor
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 6  # training, ROC, discriminant, charge, confusion, response
    for image in images:
        assert base64.b64decode(image)[:8] == b"\x89PNG\r\n\x1a\n"
    # self-contained: no external scripts, styles or images
    assert not re.search(r'(src|href)="(https?:)?//', page) and "<script" not in page and "<link" not in page
    # the facts of the run
    assert "multipartau-quickstart" in page and "120 optimizer steps" in page and "2 x cpu" in page
    assert "jets/s" in page and "testhost" in page
    # side by side: transformer, baseline and the uncorrected jet for the pT response
    header = re.search(r"<tr><th>metric \(test split\)</th>(.*?)</tr>", page).group(1)
    assert re.findall(r"<th>(.*?)</th>", header) == ["transformer", "baseline", "reco jet"]
    # perfectly separated fabricated scores: no background jet passes, quoted as a lower bound
    n_background = int((payload["arrays"]["tau_id"]["label"] == 0).sum())
    assert f"&gt;= {n_background} (0 pass)" in page
    # which background jets pass both models' cuts (none here: the transformer's pass nothing)
    assert re.search(r"at 50 % 0 \(transformer\) and [\d,]+ \(baseline\) pass, 0 of them both", page)
    charge_row = re.search(r"<td>charge: accuracy</td><td[^>]*>([^<]*)</td>", page).group(1)
    assert charge_row.startswith("100.00 ")
    assert (run_dir / "baseline" / "predictions-test.npz").is_file()  # fitted once, then cached


def test_report_without_evaluation_is_a_clear_error(dataset, tmp_path):
    run_dir = tmp_path / "run"
    fabricate_run(run_dir, dataset)
    (run_dir / "metrics.json").unlink()
    result = runner.invoke(app, ["report", str(run_dir)])
    assert result.exit_code == 2
    assert "no evaluation (metrics.json)" in result.output and f"hepml evaluate {run_dir}" in result.output
    with pytest.raises(UserError, match="no such run directory"):
        build_report(tmp_path / "missing")


def test_unreadable_predictions_are_a_clear_error(dataset, tmp_path):
    run_dir = tmp_path / "run"
    fabricate_run(run_dir, dataset)
    (run_dir / "predictions-test.npz").write_bytes(b"not a zip file")
    with pytest.raises(UserError, match="unreadable predictions"):
        build_report(run_dir, with_baseline=False)


def test_predictions_round_trip(tmp_path):
    payload = {"arrays": {"tau_id": {"scores": np.eye(2)[[0, 1, 1]], "label": np.array([0, 1, 1])}},
               "count": {"tau_id": 3.0}, "loss_sum": {"tau_id": 0.5}}
    save_predictions(tmp_path / "p.npz", payload, {"checkpoint": "x", "split": "val"})
    loaded, meta = load_predictions(tmp_path / "p.npz")
    assert meta == {"checkpoint": "x", "split": "val"}
    np.testing.assert_array_equal(loaded["arrays"]["tau_id"]["scores"], payload["arrays"]["tau_id"]["scores"])
    assert loaded["count"] == {"tau_id": 3.0} and loaded["loss_sum"] == {"tau_id": 0.5}


def test_rejection_counts_background_above_the_signal_quantile():
    labels = np.array([1] * 10 + [0] * 100)
    scores = np.concatenate([np.linspace(0.55, 1.0, 10), np.linspace(0.0, 0.6, 100)])
    r = rejection(labels, scores, 0.5)  # cut at the signal median, 0.775: no background above 0.6
    assert (r.passing, r.background, r.lower_bound, r.value) == (0, 100, True, 100) and r.text() == ">= 100 (0 pass)"
    r = rejection(labels, scores, 1.0)  # cut at 0.55: background scores 0.5515...0.6 pass
    assert r.passing == int((scores[10:] >= 0.55).sum()) and r.value == pytest.approx(100 / r.passing)
    assert not r.lower_bound and r.low < r.value < r.high


def test_confident_scores_keep_their_order():
    # float32 softmax outputs of three confident taus: p(tau) rounds to 1.0 for all, p(jet) still orders them
    p_jet = np.array([1e-9, 1e-12, 1e-20], dtype=np.float32)
    scores = np.stack([p_jet, np.float32(1) - p_jet], axis=1)
    assert (scores[:, 1] == 1).all()
    assert np.all(np.diff(log_ratio(log_probabilities({"scores": scores}))) > 0)


def test_non_finite_predictions_are_left_out_and_said(dataset, tmp_path):
    run_dir = tmp_path / "run"
    payload = fabricate_run(run_dir, dataset)
    payload["arrays"]["decay_mode"]["scores"][:3] = np.nan  # a model that diverged on three jets
    save_predictions(run_dir / "predictions-test.npz", payload,
                     {"checkpoint": str(run_dir / "checkpoints" / CHECKPOINT), "split": "test"})
    page = build_report(run_dir, with_baseline=False).read_text()
    n = len(payload["arrays"]["decay_mode"]["label"])
    assert f"transformer, decay_mode: 3 of {n:,} predictions are NaN or infinite" in page
    assert "nan %" not in page.lower()


def test_checkpoint_named_relative_to_another_directory(dataset, tmp_path):
    # `hepml evaluate runs/x` run from the repository writes "runs/x/checkpoints/step-..." into metrics.json
    run_dir = tmp_path / "run"
    fabricate_run(run_dir, dataset)
    evaluation = json.loads((run_dir / "metrics.json").read_text())
    evaluation["checkpoint"] = f"runs/run/checkpoints/{CHECKPOINT}"
    (run_dir / "metrics.json").write_text(json.dumps(evaluation))
    page = build_report(run_dir, with_baseline=False).read_text()
    assert "120 optimizer steps" in page  # the checkpoint's state.json was found
