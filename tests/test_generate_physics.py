"""Physics of the generators: each process makes examples whose labels agree with what Pythia produced.

One work unit per process, run in this process (no shards): a few hundred events, a few seconds each.
"""

import numpy as np
import pytest

from hepml_dist.generate import clic_events, events_met, fcc_tau, jetclass_lite
from hepml_dist.generate.base import RunContext, check_columns, unit_seeds
from hepml_dist.generate.detector import impact_parameters
from hepml_dist.generate.jets import cluster, padded_constituents


def run_unit(module, events, seed=7):
    context = RunContext(init_seed=seed, total_events=events)
    if module.PROCESS.prepare is not None:
        context = RunContext(init_seed=seed, total_events=events, prepared=module.PROCESS.prepare(context))
    columns = module.PROCESS.make(context).run(events, unit_seeds(seed, module.PROCESS.name, 0))
    check_columns(columns, module.PROCESS.schema, module.PROCESS.name)
    return columns


@pytest.fixture(scope="module")
def tau_jets():
    return run_unit(fcc_tau, 1200)


@pytest.fixture(scope="module")
def boosted_jets():
    return run_unit(jetclass_lite, 300)


@pytest.fixture(scope="module")
def clic():
    return run_unit(clic_events, 100)


@pytest.fixture(scope="module")
def met_events():
    return run_unit(events_met, 400)


def real(columns, prefix):
    """Mask [N, P] of the real (unpadded) entries."""
    width = columns[f"{prefix}_features" if prefix != "part" else "part_px"].shape[1]
    return np.arange(width)[None, :] < columns[f"{prefix}_n"][:, None]


# ---- fcc-tau ---------------------------------------------------------------------------------------------------------

def test_tau_decay_mode_fractions_match_pdg(tau_jets):
    tau = tau_jets["label_is_tau"] == 1
    assert tau.sum() > 900  # 600 tau-pair events: nearly every tau gives a matched jet
    fractions = np.bincount(tau_jets["label_decay_mode"][tau], minlength=6) / tau.sum()
    # PDG, as fractions of hadronic decays: h 18 %, h pi0 40 %, h >=2pi0 16 %, 3h 15 %, 3h >=1pi0 7 %
    for mode, (pdg, band) in enumerate([(0.18, 0.05), (0.40, 0.06), (0.16, 0.05), (0.15, 0.05), (0.07, 0.04)]):
        assert abs(fractions[mode] - pdg) < band, (mode, fractions)
    assert fractions[5] < 0.03


def test_tau_jets_carry_the_tau_charge(tau_jets):
    tau = tau_jets["label_is_tau"] == 1
    assert set(np.unique(tau_jets["label_charge"][tau])) == {0, 1}
    assert abs(tau_jets["label_charge"][tau].mean() - 0.5) < 0.06
    jet_charge = (tau_jets["part_charge"] * real(tau_jets, "part")).sum(axis=1)
    expected = np.where(tau_jets["label_charge"] == 1, 1.0, -1.0)
    # a lost track or a K0S -> pi+ pi- inside the cone spoils a few percent
    assert np.mean(jet_charge[tau] == expected[tau]) > 0.93
    prongs = ((tau_jets["part_charge"] != 0) & real(tau_jets, "part")).sum(axis=1)
    assert np.mean(prongs[tau & (tau_jets["label_decay_mode"] == 0)] == 1) > 0.95
    assert np.mean(prongs[tau & (tau_jets["label_decay_mode"] == 3)] == 3) > 0.85


def test_quark_jets_have_undefined_tau_labels(tau_jets):
    quark = tau_jets["label_is_tau"] == 0
    assert 0.35 < quark.mean() < 0.7  # half the events are Z -> q qbar, with more jets per event
    assert np.all(tau_jets["label_charge"][quark] == -1)
    assert np.all(tau_jets["label_decay_mode"][quark] == -1)
    for name in ("target_log_pt_ratio", "target_delta_eta", "gen_tau_pt", "gen_tau_mass"):
        assert np.all(tau_jets[name][quark] == 0)
    assert np.median(tau_jets["part_n"][quark]) > np.median(tau_jets["part_n"][~quark])


def test_tau_kinematic_targets(tau_jets):
    tau = tau_jets["label_is_tau"] == 1
    assert np.all(tau_jets["gen_tau_mass"][tau] < 1.777)  # visible mass below the tau mass
    assert np.all(np.abs(tau_jets["target_delta_eta"][tau]) < 0.3)
    assert np.all(tau_jets["target_cos_delta_phi"][tau] > np.cos(0.3))
    assert abs(np.median(tau_jets["target_log_pt_ratio"][tau])) < 0.02  # jet pT ~ visible tau pT
    np.testing.assert_allclose(tau_jets["target_sin_delta_phi"] ** 2 + tau_jets["target_cos_delta_phi"] ** 2,
                               tau.astype(float), atol=1e-5)
    ratio = np.exp(tau_jets["target_log_pt_ratio"][tau]) * tau_jets["jet_pt"][tau]
    np.testing.assert_allclose(ratio, tau_jets["gen_tau_pt"][tau], rtol=1e-4)
    assert np.all(tau_jets["gen_tau_pt"][tau] < 45.6 + 1e-3)


def test_tau_tracks_are_displaced(tau_jets):
    tau = tau_jets["label_is_tau"] == 1
    charged = (tau_jets["part_charge"] != 0) & real(tau_jets, "part")
    neutral = (tau_jets["part_charge"] == 0) & real(tau_jets, "part")
    assert np.all(tau_jets["part_d0err"][charged] > 0) and np.all(tau_jets["part_d0err"][neutral] == 0)
    significance = np.abs(tau_jets["part_d0val"]) / np.where(charged, tau_jets["part_d0err"], 1.0)
    # tau flight (c tau = 87 um, boosted) makes most tau tracks significantly displaced
    assert np.median(significance[charged & tau[:, None]]) > 2.5


def test_constituents_sum_to_the_jet():
    """Constituent indices from fastjet stay aligned with their jets through sorting, cuts and padding."""
    rng = np.random.default_rng(0)
    n_events, per_event = 30, 25
    event = np.repeat(np.arange(n_events), per_event)
    pt = rng.exponential(5.0, len(event)) + 0.5
    eta, phi = rng.normal(0, 1.0, len(event)), rng.uniform(-np.pi, np.pi, len(event))
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    e = np.sqrt(px**2 + py**2 + pz**2)
    jets = cluster(event, px, py, pz, e, n_events, "antikt", 0.4, min_pt=3.0)
    jets = jets.take(np.arange(len(jets))[::2])
    table, n = padded_constituents(jets, pt, {"px": px, "e": e}, max_len=64)
    np.testing.assert_allclose(table["px"].sum(axis=1), jets.px, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(table["e"].sum(axis=1), jets.e, rtol=1e-9)
    assert np.all(np.diff(np.hypot(jets.px, jets.py)[jets.event == jets.event[0]]) <= 0)  # pT-ordered


def test_impact_parameter_geometry():
    # a track from (1, 0, 2) mm flying along +y passes the beam line at 1 mm; along +x it crosses it
    d0, z0 = impact_parameters(np.array([1.0, 1.0]), np.zeros(2), np.array([2.0, 2.0]),
                               np.array([0.0, 1.0]), np.array([1.0, 0.0]), np.array([1.0, 1.0]))
    np.testing.assert_allclose(d0, [1.0, 0.0])
    np.testing.assert_allclose(z0, [2.0, 1.0])  # along x: the closest approach is 1 mm back, dz/ds = 1


# ---- jetclass-lite ---------------------------------------------------------------------------------------------------

def test_boosted_jet_masses_follow_their_class(boosted_jets):
    classes = boosted_jets["label_jet_class"]
    assert set(np.unique(classes)) == {0, 1, 2, 3, 4}
    assert all(np.mean(classes == k) > 0.1 for k in range(5))  # roughly balanced
    median_mass = {k: np.median(boosted_jets["jet_mass"][classes == k]) for k in range(5)}
    assert 100 < median_mass[1] < 135  # H
    assert 80 < median_mass[2] < 100  # Z
    assert 70 < median_mass[3] < 92  # W
    assert 150 < median_mass[4] < 195  # top
    assert median_mass[0] < 90  # QCD
    assert np.all(boosted_jets["jet_pt"] > 500) and np.all(np.abs(boosted_jets["jet_eta"]) < 2)


def test_boosted_jet_constituents(boosted_jets):
    mask = real(boosted_jets, "part")
    assert np.all(boosted_jets["part_energy"][~mask] == 0) and np.all(boosted_jets["part_energy"][mask] > 0)
    full = boosted_jets["part_n"] < jetclass_lite.MAX_CONSTITUENTS
    np.testing.assert_allclose(boosted_jets["part_energy"][full].sum(axis=1), boosted_jets["jet_energy"][full],
                               rtol=1e-4)
    pid = np.abs(boosted_jets["part_pid"][mask])
    assert set(np.unique(pid)) <= {11, 13, 22, 130, 211}
    charged = boosted_jets["part_charge"][mask] != 0
    assert np.all(np.isin(pid[charged], (11, 13, 211))) and np.all(np.isin(pid[~charged], (22, 130)))
    # H -> b bbar jets hold displaced tracks from b-hadron decays (|d0| < 1 mm keeps K0S / Lambda daughters out)
    d0 = boosted_jets["part_d0val"]
    displaced = (np.abs(d0) / np.maximum(boosted_jets["part_d0err"], 1e-9) > 3) & (np.abs(d0) < 1.0) & mask
    tagged = displaced.sum(axis=1) >= 2
    classes = boosted_jets["label_jet_class"]
    assert tagged[classes == 1].mean() > 0.8
    assert tagged[classes == 1].mean() > 2 * tagged[classes == 0].mean()


# ---- clic-events -----------------------------------------------------------------------------------------------------

def test_clic_elements_and_targets(clic):
    mask = real(clic, "elem")
    kind = clic["elem_features"][..., 0]
    assert np.all(kind[~mask] == 0) and set(np.unique(kind[mask])) == {1, 2}
    # tracks first, then clusters, in every event
    assert np.all(np.diff(np.where(mask, kind, 3), axis=1) >= 0)
    classes = clic["label_particle_class"]
    track, cluster_ = mask & (kind == 1), mask & (kind == 2)
    assert np.all(clic["label_existence"][track] == 1)
    assert set(np.unique(classes[track])) <= {1, 4, 5}
    assert set(np.unique(classes[cluster_])) <= {0, 2, 3}
    assert np.all((classes > 0) == (clic["label_existence"] == 1))
    # a track measures its particle's pT to a per-mille; a neutral cluster its energy to ~ 20 %
    ratio = clic["target_pt"][track] / clic["elem_features"][..., 1][track]
    assert abs(np.median(ratio) - 1) < 0.002
    with_target = cluster_ & (clic["label_existence"] == 1)
    ratio = clic["target_energy"][with_target] / clic["elem_features"][..., 5][with_target]
    assert 0.85 < np.median(ratio) < 1.15
    np.testing.assert_allclose(clic["target_sin_phi"] ** 2 + clic["target_cos_phi"] ** 2,
                               clic["label_existence"], atol=1e-5)


def test_clic_gen_jets_and_met(clic):
    jets = np.arange(clic["genjet_pt"].shape[1])[None, :] < clic["genjet_n"][:, None]
    assert np.all(clic["genjet_pt"][jets] > 5) and np.all(clic["genjet_pt"][~jets] == 0)
    assert np.all(np.diff(np.where(jets, clic["genjet_pt"], 0), axis=1) <= 0)
    assert np.median(clic["genjet_n"]) >= 2
    assert np.all(clic["gen_met"] >= 0) and np.median(clic["gen_met"]) < 50


# ---- events-met ------------------------------------------------------------------------------------------------------

def test_met_events_selection_and_btag(met_events):
    assert np.all(met_events["event_met"] > 100) and np.all(met_events["event_n_jets"] >= 2)
    signal = met_events["label_signal"] == 1
    assert np.all(signal == (met_events["label_process"] == 0))
    assert 0.2 < signal.mean() < 0.8
    # H -> b bbar: signal events are b-tagged far more often than Z(nu nu)+jet
    znunu = met_events["label_process"] == events_met.PROCESSES.index("Znunu")
    assert np.mean(met_events["event_n_bjets"][signal] >= 1) > 0.7
    assert np.mean(met_events["event_n_bjets"][znunu] >= 1) < 0.4
    objects = np.arange(events_met.MAX_OBJECTS)[None, :] < met_events["obj_n"][:, None]
    btag = met_events["obj_features"][..., 5]
    assert np.all((btag[objects] == -1) | ((btag[objects] > 0) & (btag[objects] < 1)))
    assert not np.any(btag[signal][objects[signal]] == -1)  # Z -> nu nu, H -> b bbar: no isolated leptons
    ht = np.where(objects & (btag >= 0), met_events["obj_features"][..., 1], 0).sum(axis=1)
    np.testing.assert_allclose(ht, met_events["event_ht"], rtol=1e-4)


def test_met_event_weights(met_events):
    assert np.all(met_events["weight"] > 0) and np.all(met_events["gen_xsec_weight"] > 0)
    signal = met_events["label_signal"] == 1
    assert np.all(met_events["weight"][signal] == 1.0)
    # ZH(nu nu bb) is a ~20 fb process, the backgrounds are 10^4-10^5 times larger
    assert met_events["gen_xsec_weight"][~signal].min() > 1e3 * met_events["gen_xsec_weight"][signal].max()
