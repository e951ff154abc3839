"""The gradient-boosted baseline of `hepml report`: its jet-level quantities, its fit on generated tau jets, errors."""

import numpy as np
import pytest

from hepml_dist.data.writer import DatasetWriter
from hepml_dist.errors import UserError
from hepml_dist.evaluate.baseline import (
    JET_QUANTITIES,
    fit_baseline,
    jet_quantities,
    predict_baseline,
    read_split,
)
from hepml_dist.generate import get_process
from hepml_dist.generate.runner import generate_dataset


@pytest.fixture(scope="module")
def tau_data(tmp_path_factory):
    """~800 generated fcc-tau jets (400 events): the smallest set on which every task has both classes."""
    out = tmp_path_factory.mktemp("baseline") / "fcc-tau"
    generate_dataset(get_process("fcc-tau"), 400, out, seed=11, workers=1, show_progress=False)
    return out


def test_baseline_beats_chance_on_generated_taus(tau_data):
    from sklearn.metrics import roc_auc_score

    train, test = read_split(str(tau_data / "train")), read_split(str(tau_data / "test"))
    assert 300 <= len(train["part_n"]) and 50 <= len(test["part_n"])
    fitted = fit_baseline(train, seed=0)
    assert set(fitted.models) == {"tau_id", "charge", "decay_mode", "kinematics"}
    assert fitted.train_jets["tau_id"] == len(train["part_n"])
    assert fitted.train_jets["charge"] == int((train["label_is_tau"] == 1).sum())
    payload = predict_baseline(fitted, test)
    tau = payload["arrays"]["tau_id"]
    assert tau["scores"].shape == (len(test["part_n"]), 2)
    np.testing.assert_allclose(tau["scores"].sum(axis=1), 1, rtol=1e-5)
    assert roc_auc_score(tau["label"], tau["scores"][:, 1]) > 0.6
    # the tau-only tasks are evaluated on tau jets only, with the MultiParTau class counts
    n_tau = int((test["label_is_tau"] == 1).sum())
    assert payload["arrays"]["decay_mode"]["scores"].shape == (n_tau, 6)
    assert (payload["arrays"]["charge"]["scores"].argmax(1) == payload["arrays"]["charge"]["label"]).mean() > 0.6
    kinematics = payload["arrays"]["kinematics"]
    assert kinematics["pred"].shape == (n_tau, 1) and np.isfinite(kinematics["pred"]).all()
    assert (kinematics["pt"] > 0).all()  # the generated visible tau pT, the axis of the response plots
    assert "weight" not in tau  # unweighted data: unweighted numbers
    # data with example weights: every task's predictions carry the weights of its own rows
    weighted = {**test, "weight": np.arange(len(test["part_n"]), dtype=np.float32)}
    arrays = predict_baseline(fitted, weighted)["arrays"]
    np.testing.assert_array_equal(arrays["tau_id"]["weight"], weighted["weight"])
    np.testing.assert_array_equal(arrays["decay_mode"]["weight"], weighted["weight"][test["label_is_tau"] == 1])


def _jets(n_real: list[int], length: int = 6, garbage: float = 0.0) -> dict[str, np.ndarray]:
    """Hand-made jets: candidate i of jet j has pT 10 / (i + 1) along x, charge alternating, PID by charge."""
    n = len(n_real)
    real = np.arange(length)[None, :] < np.array(n_real)[:, None]
    pt = np.where(real, 10.0 / (np.arange(length)[None, :] + 1), garbage)
    charge = np.where(real, np.where(np.arange(length) % 2 == 0, 1.0, 0.0)[None, :].repeat(n, 0), garbage)
    pid = np.where(charge != 0, 211, 22).astype(np.int32)
    zeros = np.zeros((n, length), np.float32)
    junk = np.where(real, 0.0, garbage).astype(np.float32)
    return {
        "part_px": pt.astype(np.float32), "part_py": junk, "part_pz": junk,
        "part_energy": pt.astype(np.float32), "part_charge": charge.astype(np.float32), "part_pid": pid,
        "part_n": np.array(n_real, np.int32), "part_d0val": zeros + 0.01, "part_d0err": zeros + 0.005,
        "part_dzval": zeros, "part_dzerr": zeros + 0.01,
        "jet_pt": np.where(real, pt, 0).sum(axis=1).astype(np.float32), "jet_eta": np.zeros(n, np.float32),
        "jet_phi": np.zeros(n, np.float32), "jet_mass": np.ones(n, np.float32),
    }


def test_jet_quantities_count_and_ignore_padding():
    clean = jet_quantities(_jets([1, 3, 6]))
    dirty = jet_quantities(_jets([1, 3, 6], garbage=7.0))  # junk in the padding slots must not matter
    np.testing.assert_allclose(clean, dirty, rtol=1e-6)
    column = {name: clean[:, i] for i, name in enumerate(JET_QUANTITIES)}
    np.testing.assert_array_equal(column["n_constituents"], [1, 3, 6])
    np.testing.assert_array_equal(column["n_charged"], [1, 2, 3])
    np.testing.assert_array_equal(column["n_photons"], [0, 1, 3])
    np.testing.assert_array_equal(column["charge_sum"], [1, 2, 3])
    np.testing.assert_allclose(column["lead_pt_fraction"], 10 / np.array([10, 10 + 5 + 10 / 3, 24.5]), rtol=1e-5)
    np.testing.assert_allclose(column["lead_track_d0_significance"], 2.0, rtol=1e-5)
    np.testing.assert_allclose(column["width"], 0.0, atol=1e-6)  # all candidates along the jet axis
    assert clean.shape == (3, len(JET_QUANTITIES)) and np.isfinite(clean).all()


def test_a_dataset_without_tau_columns_is_refused(tmp_path):
    with DatasetWriter(tmp_path / "jets", schema="jetclass", splits=(1.0, 0.0, 0.0), seed=0) as writer:
        writer.add({"part_px": np.ones((8, 4), np.float32), "part_n": np.full(8, 4, np.int32),
                    "label_jet_class": np.zeros(8, np.int64)})
    with pytest.raises(UserError, match="fcc-tau"):
        read_split(str(tmp_path / "jets" / "train"))


def test_too_few_jets_for_a_task_is_a_clear_error():
    jets = _jets([2] * 30)
    jets |= {"label_is_tau": np.zeros(30, np.int64), "label_charge": np.full(30, -1), "label_decay_mode": np.full(30, -1),
             "target_log_pt_ratio": np.zeros(30, np.float32), "gen_tau_pt": np.zeros(30, np.float32)}
    with pytest.raises(UserError, match="single class"):
        fit_baseline(jets, tasks=["tau_id"])
    with pytest.raises(UserError, match="training jets for task charge"):
        fit_baseline(jets, tasks=["charge"])
