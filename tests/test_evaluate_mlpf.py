"""MLPF evaluation as users judge it: the rule-based particle flow on hand-made elements; jet response of MLPF and
the baseline through `hepml evaluate` recomputed independently with FastJet; `hepml report`'s MLPF section; an
MLPF run whose data lack the gen-jet columns stops with exit 2."""

import json
import math
import shutil
from pathlib import Path

import fastjet
import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from hepml_dist.cli import app
from hepml_dist.evaluate.mlpf_baseline import (
    CHARGED_HADRON,
    NEUTRAL_HADRON,
    PHOTON,
    rule_based_columns,
    track_phi_at_calorimeter,
)
from hepml_dist.evaluate.mlpf_particles import element_table, particle_performance, particle_summary

ROOT = Path(__file__).resolve().parents[1]


def _element(kind, pt, eta, phi, energy, omega=0.0, ecal=0.0, hcal=0.0):
    row = np.zeros(17)
    row[:6] = kind, pt, eta, math.sin(phi), math.cos(phi), energy
    if kind == 1:
        row[13] = omega
    else:
        row[10], row[11] = ecal, hcal
    return row


def test_rule_based_pf_on_hand_made_elements():
    omega = 3e-4 * 4.0 / 10.0  # a positive 10 GeV track in 4 T
    track = _element(1, 10.0, 0.5, 0.3, 10.0 * math.cosh(0.5), omega=omega)
    phi_calo = float(track_phi_at_calorimeter(np.array(10.0), np.array(0.5), np.array(0.3), np.array(omega)))
    assert phi_calo == pytest.approx(0.3 - math.asin(omega * 1500 / 2))  # bent by the field
    elements = np.stack([
        track,
        _element(2, 10.5, 0.5, phi_calo, 11.5, ecal=3.0, hcal=8.5),   # linked, compatible: the track's own shower
        _element(2, 5.0, -1.0, 2.0, 5.0 * math.cosh(-1.0), ecal=7.6, hcal=0.1),  # unlinked, ECAL: photon
        _element(2, 8.0, 1.5, -2.0, 8.0 * math.cosh(1.5), ecal=1.0, hcal=18.0),  # unlinked, HCAL: neutral hadron
        _element(2, 1.0, 0.0, 0.0, 1.0, ecal=1.0),  # padding: ignored
    ])[None]  # fmt: skip
    real = np.array([[True, True, True, True, False]])
    out = {k: v[0] for k, v in rule_based_columns(elements, real).items()}
    assert list(out["cls"]) == [CHARGED_HADRON, 0, PHOTON, NEUTRAL_HADRON, 0]
    assert (out["pt"][0], out["eta"][0], out["phi"][0]) == pytest.approx((10.0, 0.5, 0.3))
    assert out["energy"][0] == pytest.approx(10.0 * math.cosh(0.5))
    assert out["energy"][2] == pytest.approx(5.0 * math.cosh(-1.0)) and out["pt"][2] == pytest.approx(5.0)
    assert (out["eta"][3], out["phi"][3]) == pytest.approx((1.5, -2.0))

    # the same linked cluster with far more energy than the track: the excess becomes a neutral
    elements[0, 1, 5], elements[0, 1, 10] = 40.0, 31.5
    out = {k: v[0] for k, v in rule_based_columns(elements, real).items()}
    assert out["cls"][1] == NEUTRAL_HADRON and out["energy"][1] == pytest.approx(40.0 - 10.0 * math.cosh(0.5))
    # a track pointing elsewhere does not link: the cluster is a neutral with its whole energy
    elements[0, 0, 3], elements[0, 0, 4] = math.sin(1.5), math.cos(1.5)
    out = {k: v[0] for k, v in rule_based_columns(elements, real).items()}
    assert out["energy"][1] == pytest.approx(40.0)


def _padded(values: list, pad) -> np.ndarray:
    """Two events of 4 real elements each, padded to 5 with `pad` (which the evaluation must ignore)."""
    return np.array([values[:4] + [pad], values[4:] + [pad]], dtype=float)


def test_particle_efficiency_fake_rate_and_response_by_hand():
    real = _padded([True] * 8, False).astype(bool)
    target = {"cls": _padded([1, 1, 1, 2, 3, 0, 0, 4], 1), "pt": _padded([1, 3, 30, 4, 0.7, 0, 0, 8], 5),
              "energy": _padded([2, 6, 30, 4, 0.7, 0, 0, 8], 5)}
    mlpf = {"cls": _padded([1, 2, 0, 2, 0, 3, 0, 1], 1), "pt": _padded([1.1, 2.7, 9, 5, 9, 2, 9, 8], 5),
            "energy": _padded([2.4, 5.4, 9, 5, 9, 2, 9, 8], 5)}
    baseline = {"cls": _padded([1, 1, 1, 3, 3, 0, 0, 1], 1), "pt": _padded([1, 3, 33, 4, 0.7, 0, 0, 8], 5),
                "energy": _padded([2, 6, 33, 4, 0.7, 0, 0, 8], 5)}
    table = element_table(real, target, mlpf=mlpf, baseline=baseline)
    assert len(table["target_cls"]) == 8  # padding dropped
    names = ["none", "charged_hadron", "neutral_hadron", "photon", "electron", "muon"]
    got = particle_performance(table, names)
    ch = got["mlpf"]["charged_hadron"]
    # 3 true charged hadrons (elements 0, 1, 2): element 0 found as one, element 1 as a neutral hadron, 2 lost
    assert (ch["targets"], ch["efficiency"], ch["efficiency_any"]) == (3, pytest.approx(1 / 3), pytest.approx(2 / 3))
    # predicted charged hadrons: elements 0 (right) and 7 (an electron): no fake, one misidentified
    assert (ch["predicted"], ch["fake_rate"], ch["misid_rate"]) == (2, 0.0, 0.5)
    # responses of elements 0 and 1: pT 1.1 / 1 and 2.7 / 3 -> median 1.0, q25 0.95, q75 1.05; E 1.2 and 0.9
    assert ch["pt_response"]["median"] == pytest.approx(1.0)
    assert ch["pt_response"]["iqr_over_median"] == pytest.approx(0.1)
    assert ch["energy_response"]["median"] == pytest.approx(1.05)
    # efficiency in target-pT bins [1, 2), [2, 5), [20, 50): 1 of 1, 0 of 1, 0 of 1
    binned = ch["efficiency_vs_pt"]
    assert binned["count"] == [0, 0, 1, 1, 0, 0, 1, 0, 0]
    assert binned["value"][2:4] == [1.0, 0.0] and binned["value"][6] == 0.0 and math.isnan(binned["value"][0])
    assert ch["efficiency_any_vs_pt"]["value"][3] == 1.0
    photon = got["mlpf"]["photon"]  # the true photon (element 4) is lost; the predicted one (element 5) is a fake
    assert (photon["efficiency"], photon["fake_rate"]) == (0.0, 1.0)
    assert photon["fake_rate_vs_pt"]["count"][3] == 1 and photon["fake_rate_vs_pt"]["value"][3] == 1.0
    assert got["mlpf"]["muon"]["targets"] == 0 and math.isnan(got["mlpf"]["muon"]["efficiency"])
    # the baseline finds all three charged hadrons, calls the neutral hadron a photon
    base = got["baseline"]
    assert base["charged_hadron"]["efficiency"] == 1.0 and base["charged_hadron"]["misid_rate"] == pytest.approx(1 / 4)
    assert (base["neutral_hadron"]["efficiency"], base["neutral_hadron"]["efficiency_any"]) == (0.0, 1.0)
    assert base["photon"]["misid_rate"] == 0.5 and base["photon"]["fake_rate"] == 0.0
    assert base["charged_hadron"]["pt_response"]["median"] == pytest.approx(1.0)
    assert base["charged_hadron"]["pt_response_vs_pt"]["median"][6] == pytest.approx(1.1)
    flat = particle_summary(got, "test_")
    assert flat["test_charged_hadron_efficiency"] == pytest.approx(1 / 3)
    assert flat["test_charged_hadron_efficiency_baseline"] == 1.0
    assert flat["test_photon_fake_rate"] == 1.0 and flat["test_charged_hadron_pt_resolution"] == pytest.approx(0.1)


# ----------------------------------------------------------------------------------------------------------------------
# End to end: tiny clic-events, a few steps of mlpf-quickstart, `hepml evaluate`, `hepml report`


@pytest.fixture(scope="module")
def mlpf_run(tmp_path_factory):
    from hepml_dist.runs import write_run_spec
    from hepml_dist.spec import load_job
    from hepml_dist.train.loop import train_loop_per_worker

    tmp = tmp_path_factory.mktemp("mlpf")
    data = tmp / "clic"
    made = CliRunner().invoke(app, ["data", "generate", "clic-events", "--events", "120", "--out", str(data)])
    assert made.exit_code == 0, made.output
    overrides = [f"data.{s}={data / s}" for s in ("train", "val", "test")] + [
        "parallel.num_workers=1", "tracking.mode=disabled", "training.epochs=1", "data.steps_per_epoch=3",
        "data.val_steps=1", "training.eval_interval=3", "training.log_interval=1", "data.loader_workers=0",
        "data.batch_size=8"]  # fmt: skip
    spec = load_job(ROOT / "jobs" / "mlpf-quickstart.yaml", overrides)
    run_dir = tmp / "run"
    train_loop_per_worker({"spec": spec.model_dump(mode="json"), "run_dir": str(run_dir)})
    write_run_spec(run_dir, spec)  # as `hepml train` does
    evaluated = CliRunner().invoke(app, ["evaluate", str(run_dir)])
    assert evaluated.exit_code == 0, evaluated.output
    reported = CliRunner().invoke(app, ["report", str(run_dir), "--no-track"])
    assert reported.exit_code == 0, reported.output
    return run_dir, spec


def _jets(px, py, pz, energy) -> list:
    definition = fastjet.JetDefinition(fastjet.ee_genkt_algorithm, 0.4, -1.0)
    particles = [fastjet.PseudoJet(*map(float, p)) for p in zip(px, py, pz, energy)]
    sequence = fastjet.ClusterSequence(particles, definition)
    return [(j.pt(), j.eta(), j.phi_std()) for j in sequence.inclusive_jets(5.0)]


def _ratios(gen_jets: list, reco_jets: list) -> list[float]:
    """pT_reco / pT_gen of each gen jet whose nearest reco jet is within Delta R 0.1."""
    ratios = []
    for pt, eta, phi in gen_jets:
        distances = [(math.hypot(eta - e, (phi - p + math.pi) % (2 * math.pi) - math.pi), rpt)
                     for rpt, e, p in reco_jets]
        if distances and min(distances)[0] < 0.1:
            ratios.append(min(distances)[1] / pt)
    return ratios


def test_jet_response_of_evaluate_matches_fastjet_recomputation(mlpf_run):
    """MLPF's, the baseline's and the target's jet response in metrics.json, recomputed event by event with
    FastJet's PseudoJet interface from the same particles and the stored generator jets."""
    import torch

    from hepml_dist import runs
    from hepml_dist.data.loader import open_stream
    from hepml_dist.evaluate.mlpf import predicted_particles, target_particles
    from hepml_dist.evaluate.mlpf_baseline import rule_based_particles

    run_dir, _ = mlpf_run
    stored = json.loads((run_dir / "metrics.json").read_text())["mlpf"]
    spec, model = runs.load_trained(runs.resolve_checkpoint(run_dir))
    spec = runs.absolute_paths(spec)
    stream = open_stream(spec.data, "test", rank=0, world_size=1, seed=spec.training.seed, training=False)
    ratios = {"": [], "_baseline": [], "target_": []}
    model.eval()
    for batch in list(stream.batches(0))[: stream.steps_per_epoch]:
        with torch.no_grad():
            outputs = model(batch)
        real = batch["mask"].numpy()[:, 0] > 0
        collections = {"": predicted_particles(outputs, batch, spec), "target_": target_particles(batch, spec),
                       "_baseline": rule_based_particles(batch["features"].numpy().transpose(0, 2, 1), real)}
        for i in range(len(real)):
            n = int(batch["genjet_n"][i])
            gen = list(zip(*(batch[f"genjet_{v}"][i, :n].tolist() for v in ("pt", "eta", "phi"))))
            for key, particles in collections.items():
                p = particles[i]
                pt, eta, phi = np.asarray(p.pt), np.asarray(p.eta), np.asarray(p.phi)
                jets = _jets(pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta), np.asarray(p.energy))
                ratios[key] += _ratios(gen, jets)
    for key, values in ratios.items():
        name = (lambda k: f"{k}_baseline") if key == "_baseline" else (lambda k, key=key: f"{key}{k}")
        if not values:  # a model of a few steps may match no jet at all
            assert math.isnan(stored[name("jet_response_median")]), key
            continue
        q25, median, q75 = np.percentile(values, [25, 50, 75])
        assert stored[name("jet_response_median")] == pytest.approx(median, rel=1e-4), key
        assert stored[name("jet_resolution")] == pytest.approx((q75 - q25) / median, rel=1e-4), key
    assert len(ratios["target_"]) > 20


def test_evaluate_and_report_of_an_mlpf_run(mlpf_run):
    run_dir, _ = mlpf_run
    evaluation = json.loads((run_dir / "metrics.json").read_text())
    metrics = evaluation["metrics"]
    for name in ("test_jet_resolution", "test_met_resolution", "test_ttbar_jet_resolution", "test_qq_jet_resolution",
                 "test_vs_target_jets_jet_resolution"):
        assert name in metrics, name  # MLPF after 3 steps may match too few jets for a finite number
    for name in ("test_jet_resolution_baseline", "test_met_resolution_baseline", "test_ttbar_jet_resolution_baseline",
                 "test_qq_jet_resolution_baseline", "test_vs_target_jets_jet_resolution_baseline"):
        assert name in metrics and math.isfinite(metrics[name]), name
    processes = evaluation["mlpf"]["per_process"]
    assert set(processes) == {"ttbar", "qq"}
    assert sum(p["events"] for p in processes.values()) == evaluation["mlpf"]["events"]
    # ttbar events have more jets than qq: the per-process split is real
    jets = {name: sum(p["jet_response_vs_pt"]["count"]) / p["events"] for name, p in processes.items()}
    assert jets["ttbar"] > jets["qq"]
    page = (run_dir / "report.html").read_text()
    assert "MLPF: jet and MET response vs the rule-based particle flow" in page
    assert "rule-based PF" in page and "ttbar (" in page and "qq (" in page
    assert "gradient-boosted" not in page  # no tau baseline for MLPF
    assert page.count("data:image/png;base64") >= 4  # training + overall + 2 processes
    assert f"{evaluation['mlpf']['jet_resolution_baseline']:.4f}" in page
    assert "MLPF: particle efficiency, fake rate and response per class" in page
    assert page.count("data:image/png;base64") >= 7  # + particle figures: overall + 2 processes
    particles = evaluation["mlpf"]["particles"]
    assert set(particles) == {"mlpf", "baseline"} and "charged_hadron" in particles["baseline"]
    assert 0.9 < metrics["test_charged_hadron_efficiency_baseline"] <= 1.0  # tracks -> charged hadrons
    assert f"{particles['baseline']['charged_hadron']['efficiency']:.4f}" in page
    assert sum(p["particles"]["mlpf"]["photon"]["targets"] for p in processes.values()) == \
        particles["mlpf"]["photon"]["targets"]


def test_report_of_mlpf_run_whose_data_lack_gen_jets_exits_2(mlpf_run, tmp_path):
    run_dir, _ = mlpf_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    (copy / "report.html").unlink()
    data = Path(yaml.safe_load((copy / "spec.yaml").read_text())["data"]["test"])
    broken = tmp_path / "data"
    shutil.copytree(data.parent, broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    for column in ("genjet_pt", "genjet_n"):
        del manifest["columns"][column]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    spec = yaml.safe_load((copy / "spec.yaml").read_text())
    spec["data"]["test"] = str(broken / "test")
    (copy / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = CliRunner().invoke(app, ["report", str(copy), "--no-track"])
    assert result.exit_code == 2, result.output
    assert "family mlpf" in result.output and "genjet_pt" in result.output and "genjet_n" in result.output
    assert not (copy / "report.html").exists()
