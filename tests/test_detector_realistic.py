"""fcc-tau's detectors: `ideal` is the CLD-like response alone (shards as before), `realistic` adds a beam spot,
tracking inefficiency and fakes, particle-flow confusion, gamma gamma -> hadrons overlay and jet-signed impact
parameters, each at its configured rate; `--background-only` makes quark jets only."""

from dataclasses import replace

import numpy as np
import pytest
from typer.testing import CliRunner

from hepml_dist.cli import app
from hepml_dist.data.manifest import read_manifest
from hepml_dist.data.plot import derived_jet_quantities, plot_dataset, read_examples
from hepml_dist.generate import detector_realistic as realistic
from hepml_dist.generate import fcc_tau
from hepml_dist.generate import pythia as py
from hepml_dist.generate.base import RunContext, UnitSeeds, concat_shuffled, unit_seeds
from hepml_dist.generate.detector import CLD, Candidates, reconstruct_candidates
from hepml_dist.generate.jets import Jets, cluster, constituent_columns

runner = CliRunner()
SEED = 11


def generator(**options):
    return fcc_tau.FccTauGenerator(RunContext(init_seed=SEED, options=fcc_tau.configure(options)))


@pytest.fixture(scope="module")
def pair():
    """The same 400 events (seed, unit) through both detectors."""
    seeds = unit_seeds(SEED, "fcc-tau", 0)
    return generator(detector="ideal").run(400, seeds), generator().run(400, seeds)


@pytest.fixture(scope="module")
def qq_record():
    pythia = py.make_pythia(fcc_tau.QQ_SETTINGS, SEED)
    py.reseed(pythia, 5)
    return py.generate(pythia, 300)


def charged_mask(columns):
    real = np.arange(columns["part_charge"].shape[1])[None, :] < columns["part_n"][:, None]
    return real & (columns["part_charge"] != 0)


def old_pipeline(n_events: int, seeds: UnitSeeds) -> dict[str, np.ndarray]:
    """fcc-tau as it was before the realistic detector: CLD response, clustering, matching, labels."""
    gen = generator(detector="ideal")
    rng, parts = seeds.numpy(), []
    for instance, (pythia, n, with_taus) in enumerate(((gen.tau, n_events // 2, True),
                                                       (gen.qq, n_events - n_events // 2, False))):
        py.reseed(pythia, seeds.pythia(instance))
        record = py.generate(pythia, n)
        candidates = reconstruct_candidates(record, CLD, rng)
        jets = cluster(candidates.event, candidates.px, candidates.py, candidates.pz, candidates.e,
                       record.n_events, "ee_antikt", 0.4, min_pt=fcc_tau.JET_MIN_PT)
        taus = fcc_tau.hadronic_taus(record) if with_taus else fcc_tau.no_taus()
        match = fcc_tau.match_taus(taus, jets.event, jets.eta, jets.phi)
        if with_taus:
            jets, match = jets.take(match >= 0), match[match >= 0]
        columns = constituent_columns(jets, candidates, fcc_tau.MAX_CANDIDATES)
        parts.append({**columns, **fcc_tau.tau_labels(match, taus, columns["jet_pt"], columns["jet_eta"],
                                                      columns["jet_phi"], columns["jet_mass"])})
    return concat_shuffled(parts, rng)


def test_ideal_detector_is_the_old_response(pair):
    ideal, _ = pair
    expected = old_pipeline(400, unit_seeds(SEED, "fcc-tau", 0))
    assert set(ideal) == set(expected)
    for name in expected:
        np.testing.assert_array_equal(ideal[name], expected[name], err_msg=name)


def test_realistic_changes_the_jets_not_the_truth(pair):
    ideal, real = pair
    assert not np.array_equal(ideal["part_px"], real["part_px"])
    for data in (ideal, real):
        tau = data["label_is_tau"] == 1
        assert 0.35 < tau.mean() < 0.55
    # overlay and split-off fragments outnumber the tracks lost: more candidates per jet
    assert real["part_n"].mean() > ideal["part_n"].mean()
    # impact parameters signed along the jet: tau tracks mostly positive, far fewer significantly negative
    def significance(data, value, error):
        tracks = charged_mask(data) & (data["label_is_tau"] == 1)[:, None]
        return data[value][tracks] / data[error][tracks]

    ideal_d0 = significance(ideal, "part_d0val", "part_d0err")
    real_d0 = significance(real, "part_d0val", "part_d0err")
    real_dz = significance(real, "part_dzval", "part_dzerr")
    assert abs(np.mean(ideal_d0 > 3) - np.mean(ideal_d0 < -3)) < 0.1  # geometric sign: symmetric
    assert np.mean(real_d0 > 3) > 3 * np.mean(real_d0 < -3)
    assert np.mean(real_dz > 3) > 2 * np.mean(real_dz < -3)
    assert np.median(real_d0) > 2


def test_effect_rates_follow_the_parameters(qq_record):
    strong = replace(realistic.REALISTIC, fake_track_rate=0.1, overlay_rate=6.0, split_photon_probability=0.3)
    _, counts = realistic.reconstruct(qq_record, np.random.default_rng(0), strong)
    _, base = realistic.reconstruct(qq_record, np.random.default_rng(0))
    n_events = qq_record.n_events
    assert abs(counts["fake_track"] / counts["tracks_real"] - 0.1) < 0.02
    assert abs(base["fake_track"] / base["tracks_real"] - 0.003) < 0.003
    # overlay: 6 particles per event drawn, of which soft ones fall below the thresholds
    assert 2.0 * n_events < counts["overlay"] < 6.0 * n_events
    assert base["overlay"] < counts["overlay"] / 2
    assert counts["split_photon_made"] > 3 * base["split_photon_made"]
    assert 0.02 < base["tracks_lost"] / (base["tracks_lost"] + base["tracks_real"]) < 0.12
    none = replace(realistic.REALISTIC, overlay_rate=0.0, fake_track_rate=0.0)
    _, zero = realistic.reconstruct(qq_record, np.random.default_rng(0), none)
    assert zero["overlay"] == 0 and zero["fake_track"] == 0


def test_track_efficiency_shape():
    fx = realistic.REALISTIC
    eff = realistic.track_efficiency(fx, CLD, np.array([0.1, 0.5, 10.0, 10.0, 10.0]),
                                     np.array([0.0, 0.0, 0.0, 0.95, np.tanh(CLD.track_max_abs_eta)]))
    np.testing.assert_allclose(eff[0], fx.track_efficiency * (1 - fx.track_low_pt_loss))
    assert eff[0] < eff[1] < eff[2]
    np.testing.assert_allclose(eff[2], fx.track_efficiency, rtol=1e-6)
    assert eff[2] > eff[3] > eff[4]
    np.testing.assert_allclose(eff[4], fx.track_efficiency * fx.track_forward_efficiency, rtol=1e-6)


def photons(event, angles, energies):
    n = len(event)
    p = realistic._Particles(np.asarray(event), *(np.zeros(n) for _ in range(3)), np.asarray(energies, float),
                             np.full(n, 22), np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n), np.zeros(n, bool))
    p.px, p.py, p.pz = p.e * np.cos(angles), p.e * np.sin(angles), np.zeros(n)
    return p


def test_photons_closer_than_the_merge_angle_merge():
    # event 0: three photons 3 mrad apart in a chain -> one; a fourth 0.1 rad away stays; event 1: alone
    p = photons([0, 0, 0, 0, 1], np.array([0.0, 0.003, 0.006, 0.1, 0.003]), [5.0, 2.0, 1.0, 3.0, 1.0])
    merged, n_merged = realistic.merge_photons(p, realistic.REALISTIC)
    assert n_merged == 2
    np.testing.assert_allclose(sorted(merged.e), [1.0, 3.0, 8.0])
    assert merged.event.tolist() == [0, 0, 1]


def test_impact_parameters_signed_along_the_jet():
    # two tracks at the same d0 > 0 (point of closest approach on -y ... +y side), jets along +y and -y
    n = 2
    zeros = np.zeros(n)
    cands = Candidates(gen=np.arange(n), event=np.array([0, 1]), px=np.ones(n), py=zeros.copy(), pz=zeros.copy(),
                       e=np.ones(n), charge=np.ones(n), pid=np.full(n, 211), d0=np.array([0.1, 0.1]),
                       d0err=np.full(n, 0.01), dz=np.array([0.2, 0.2]), dzerr=np.full(n, 0.01))
    # track along +x with d0 = +0.1: its closest point is d0 * (t_y, -t_x) = (0, -0.1)
    jets = Jets(event=np.array([0, 1]), px=np.array([1.0, 1.0]), py=np.array([-1.0, 1.0]),
                pz=np.array([1.0, -1.0]), e=np.array([2.0, 2.0]), offsets=np.array([0, 1, 2]),
                constituents=np.array([0, 1]))
    signed = realistic.sign_impact_parameters(cands, jets)
    np.testing.assert_allclose(signed.d0, [0.1, -0.1])
    np.testing.assert_allclose(signed.dz, [0.2, -0.2])
    np.testing.assert_allclose(cands.d0, [0.1, 0.1])  # the input is left alone


def test_cli_options_manifest_and_background_only(tmp_path):
    out = tmp_path / "bkg"
    result = runner.invoke(app, ["data", "generate", "fcc-tau", "--events", "200", "--out", str(out), "--seed", "1",
                                 "--workers", "1", "--background-only", "--fractions", "0,0,1",
                                 "--overlay-rate", "0.5"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(out)
    options = manifest.meta["generator"]["options"]
    assert options["detector"] == "realistic" and options["background_only"] is True
    assert options["effects"]["overlay_rate"] == 0.5 and options["response"]["name"] == "CLD-like"
    assert manifest.splits["train"].examples == 0 and manifest.splits["test"].examples > 300
    columns, _ = read_examples(out, "test", 10_000)
    assert np.all(columns["label_is_tau"] == 0)
    files = {p.stem for p in plot_dataset(out, tmp_path / "plots", split="test")}
    assert {"derived_n_charged", "derived_neutral_energy_fraction", "derived_d0_significance"} <= files


def test_derived_jet_quantities():
    # jet 0: a track (d0/sigma = 4) and a photon carrying a quarter of the energy; jet 1: one neutral hadron
    columns = {"part_n": np.array([2, 1]), "part_charge": np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]]),
               "part_energy": np.array([[3.0, 1.0, 9.0], [2.0, 0.0, 0.0]]),
               "part_d0val": np.array([[0.04, 0.0, 0.0], [0.0, 0.0, 0.0]]),
               "part_d0err": np.array([[0.01, 0.0, 0.0], [0.0, 0.0, 0.0]]),
               "part_dzval": np.zeros((2, 3)), "part_dzerr": np.array([[0.02, 0.0, 0.0], [0.0, 0.0, 0.0]])}
    derived = derived_jet_quantities(columns)
    assert derived["derived_n_charged"][0].tolist() == [1, 0]
    assert derived["derived_n_neutral"][0].tolist() == [1, 1]
    np.testing.assert_allclose(derived["derived_neutral_energy_fraction"][0], [0.25, 1.0])
    values, entries = derived["derived_d0_significance"]
    np.testing.assert_allclose(values[entries], [4.0])
    assert derived_jet_quantities({"part_n": columns["part_n"]}) == {}


def test_background_only_has_its_own_quark_events():
    seeds = unit_seeds(SEED, "fcc-tau", 0)
    normal = generator().run(100, seeds)
    background = generator(background_only="true").run(100, seeds)
    assert np.all(background["label_is_tau"] == 0) and background["jet_pt"].size > 0
    quark_pt = normal["jet_pt"][normal["label_is_tau"] == 0]
    assert not set(quark_pt.tolist()) & set(background["jet_pt"].tolist())


@pytest.mark.parametrize("args, message", [
    (["--detector", "ideal", "--overlay-rate", "1"], "ideal detector has no beam-induced background"),
    (["--overlay-rate", "-1"], "--overlay-rate"),
    (["--detector", "perfect"], "--detector"),
])
def test_bad_detector_options_exit_2(args, message, tmp_path):
    result = runner.invoke(app, ["data", "generate", "fcc-tau", "--events", "10", "--out", str(tmp_path / "x"),
                                 "--workers", "1", *args])
    assert result.exit_code == 2, result.output
    assert message in result.output
