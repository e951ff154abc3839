"""`clic-events`: e+e- -> t tbar and q qbar at 380 GeV through a toy CLIC-like detector, for MLPF.

Per event the detector elements (tracks first, then calorimeter clusters) with the 17 MLPF input features of
mlpf_pipeline.md 1.1, each element's target particle (a simplified version of the particleflow assignment), the
generator jets and the generator MET. The toy detector (numbers in docs/generators.md):

- tracks: charged particles crossing at least 4 of the 12 barrel layers (a K0S decaying at 80 cm leaves none),
  |eta| < 2.66, 98 % efficiency (90 % below 1 GeV), CLIC-like curvature, angle and impact-parameter resolution;
- calorimeters: every particle that reaches the ECAL surface (a charged one must not curl up inside the tracker,
  4 T, R = 1.5 m) deposits its energy there (photons, electrons), in ECAL and HCAL (hadrons; a random part in the
  ECAL) or as a MIP (muons); deposits closer than Delta R = 0.05 at the calorimeter surface merge into one cluster
  (Cambridge/Aachen on the impact directions), and each cluster's ECAL and HCAL sums are smeared with the ECAL
  (15 %/sqrt(E) (+) 1 %) and HCAL (50 %/sqrt(E) (+) 5 %) resolutions.

Targets: a track's target is its particle (class charged hadron, electron or muon); a cluster's target is the sum
of the untracked particles that deposited in it, classified by the most energetic one and forced neutral (photon for
e and gamma, neutral hadron otherwise). Clusters of tracked particles only, and tracks of nothing (none here), have
no target. dE/dx, track time and the 'energy_other' cluster feature are not simulated (0). `gen_process` says
which sample (PROCESS_NAMES) each event comes from, for the per-process MLPF evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hepml_dist.generate import pythia as py
from hepml_dist.generate.base import Process, RunContext, Schema, UnitSeeds, concat_shuffled
from hepml_dist.generate.detector import (
    Detector,
    calo_resolution,
    eta_of,
    impact_parameter_errors,
    impact_parameters,
    quadrature,
    smear_relative,
)
from hepml_dist.generate.jets import cluster

MAX_ELEMENTS = 256
MAX_GENJETS = 16
N_FEATURES = 17
GENJET_MIN_PT = 5.0
CLASSES = ["none", "charged_hadron", "neutral_hadron", "photon", "electron", "muon"]

_EE380 = ["Beams:idA = 11", "Beams:idB = -11", "Beams:eCM = 380"]
SAMPLES = {
    "ttbar": [*_EE380, "Top:ffbar2ttbar(s:gmZ) = on"],
    "qq": [*_EE380, "WeakSingleBoson:ffbar2gmZ = on", "23:onMode = off", "23:onIfAny = 1 2 3 4 5"],
}
PROCESS_NAMES = list(SAMPLES)

CLIC = Detector(
    name="CLIC-like", bfield=4.0, track_max_abs_eta=2.66, track_min_pt=0.1, track_max_vertex_radius=1486.0,
    track_efficiency=0.98,
    track_pt_a=2e-5, track_pt_b=1e-3, track_angle=1e-4,
    d0_point=0.005, d0_ms=0.015, z0_point=0.005, z0_ms=0.015,
    calo_max_abs_eta=2.66, ecal_stochastic=0.15, ecal_constant=0.01, hcal_stochastic=0.50, hcal_constant=0.05,
    photon_angle=0.0, hadron_angle=0.0, photon_min_e=0.0, hadron_min_e=0.0,
)
TRACKER_LAYERS_MM = np.array([31, 33, 44, 46, 58, 60, 127, 340, 554, 819, 1153, 1486], dtype=np.float64)
MIN_TRACK_HITS = 4
LOW_PT_EFFICIENCY = 0.90  # below 1 GeV
ECAL_RADIUS_MM, ECAL_HALF_LENGTH_MM = 1500.0, 2307.0
CLUSTER_MERGE_DR = 0.05
CLUSTER_MIN_E = 0.2
MIP_ECAL, MIP_HCAL = 0.2, 1.5  # GeV a muon leaves
SHOWER_WIDTH_ECAL_MM, SHOWER_WIDTH_HCAL_MM = 15.0, 60.0

SCHEMA: Schema = {
    "elem_features": ("float32", (MAX_ELEMENTS, N_FEATURES)),
    "elem_n": ("int32", ()),
    "label_existence": ("int64", (MAX_ELEMENTS,)),
    "label_particle_class": ("int64", (MAX_ELEMENTS,)),
    **{f"target_{t}": ("float32", (MAX_ELEMENTS,)) for t in ("pt", "eta", "sin_phi", "cos_phi", "energy")},
    **{f"genjet_{v}": ("float32", (MAX_GENJETS,)) for v in ("pt", "eta", "phi", "energy")},
    "genjet_n": ("int32", ()),
    "gen_met": ("float32", ()),
    "gen_process": ("int32", ()),  # index into PROCESS_NAMES: the sample of the event (gen_* reach the batch)
}


def particle_class(pdg: np.ndarray, charge: np.ndarray) -> np.ndarray:
    """MLPF class of a particle: 11 -> electron, 13 -> muon, 22 -> photon, other charged -> charged hadron,
    other neutral -> neutral hadron."""
    apdg = np.abs(pdg)
    return np.select([apdg == 11, apdg == 13, apdg == 22, charge != 0], [4, 5, 3, 1], default=2)


@dataclass
class Elements:
    """Flat detector elements of many events: event, 17 features, target particle (class 0 = none)."""

    event: np.ndarray
    features: np.ndarray
    target_class: np.ndarray
    target_p4: np.ndarray  # [n, 4] px, py, pz, E

    @staticmethod
    def concat(parts: list[Elements]) -> Elements:
        return Elements(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                          ("event", "features", "target_class", "target_p4")))


def _p4(record: py.Record, index: np.ndarray) -> np.ndarray:
    return np.stack([record.px[index], record.py[index], record.pz[index], record.e[index]], axis=1)


def track_hits(record: py.Record, index: np.ndarray, bfield: float) -> tuple[np.ndarray, np.ndarray]:
    """(hits, radius of the innermost hit in mm): barrel layers between the production radius and the largest
    radius the helix reaches (its diameter, 2 pT / (0.3 B), capped by the tracker)."""
    r_prod = np.hypot(record.vx[index], record.vy[index])
    r_max = 2000.0 * record.pt[index] / (0.3 * bfield)  # mm
    crossed = (TRACKER_LAYERS_MM[None, :] > r_prod[:, None]) & (TRACKER_LAYERS_MM[None, :] < r_max[:, None])
    hits = crossed.sum(axis=1)
    first = np.where(hits > 0, TRACKER_LAYERS_MM[np.argmax(crossed, axis=1)], 0.0)
    return hits, first


def tracker(record: py.Record, det: Detector, rng: np.random.Generator, charged: np.ndarray,
            ) -> tuple[np.ndarray, Elements]:
    """Tracked particles (flat indices) and their track elements."""
    hits, first_radius = track_hits(record, charged, det.bfield)
    eta_true = eta_of(record.px[charged], record.py[charged], record.pz[charged])
    pt_true = record.pt[charged]
    efficiency = np.where(pt_true < 1.0, LOW_PT_EFFICIENCY, det.track_efficiency)
    found = ((hits >= MIN_TRACK_HITS) & (np.abs(eta_true) < det.track_max_abs_eta) & (pt_true > det.track_min_pt)
             & (rng.random(len(charged)) < efficiency))
    gen, hits, first_radius = charged[found], hits[found], first_radius[found]
    n = len(gen)
    px, py_, pz = record.px[gen], record.py[gen], record.pz[gen]
    pt = np.hypot(px, py_)
    pt_meas = smear_relative(rng, pt, quadrature(det.track_pt_a * pt, det.track_pt_b))
    eta = eta_of(px, py_, pz) + det.track_angle * rng.standard_normal(n)
    phi = np.arctan2(py_, px) + det.track_angle * rng.standard_normal(n)
    d0, z0 = impact_parameters(record.vx[gen], record.vy[gen], record.vz[gen], px, py_, pz)
    p_meas = pt_meas * np.cosh(eta)
    d0err, z0err = impact_parameter_errors(det, p_meas, 1.0 / np.cosh(eta))
    ndf = 2 * hits - 5
    charge = record.charge[gen]
    features = np.zeros((n, N_FEATURES))
    features[:, 0] = 1
    features[:, 1] = pt_meas
    features[:, 2] = eta
    features[:, 3] = np.sin(phi)
    features[:, 4] = np.cos(phi)
    features[:, 5] = p_meas
    features[:, 6] = rng.chisquare(np.maximum(ndf, 1))
    features[:, 7] = ndf
    # 8, 9: dE/dx and its error, not simulated
    features[:, 10] = first_radius
    features[:, 11] = np.sinh(eta)  # tan(lambda) = pz / pT
    features[:, 12] = d0 + d0err * rng.standard_normal(n)
    features[:, 13] = 3e-4 * det.bfield * charge / pt_meas  # omega in 1/mm
    features[:, 14] = z0 + z0err * rng.standard_normal(n)
    # 15: time, not simulated
    targets = particle_class(record.pid[gen], charge)
    return gen, Elements(record.event[gen], features, targets, _p4(record, gen))


def calorimeter_entry(record: py.Record, index: np.ndarray, bfield: float) -> tuple[np.ndarray, ...]:
    """Impact point (x, y, z in mm) on the ECAL front face and whether the particle gets there.

    Straight lines from the origin for neutrals; charged particles are bent by the field: in the barrel their
    azimuth turns by asin(0.3 B R / 2 pT) and they never arrive when 2 pT / (0.3 B) < R (curlers); in the
    endcaps the turn is 0.3 B z / (2 pz)."""
    px, py_, pz = record.px[index], record.py[index], record.pz[index]
    pt = np.maximum(np.hypot(px, py_), 1e-9)
    charge = record.charge[index]
    phi = np.arctan2(py_, px)
    # where a straight line leaves the cylinder (R, +-L): barrel if |z at R| < L, else endcap
    z_at_barrel = ECAL_RADIUS_MM * pz / pt
    barrel = np.abs(z_at_barrel) < ECAL_HALF_LENGTH_MM
    r_at_endcap = ECAL_HALF_LENGTH_MM * pt / np.maximum(np.abs(pz), 1e-9)
    radius = np.where(barrel, ECAL_RADIUS_MM, r_at_endcap)
    z = np.where(barrel, z_at_barrel, np.sign(pz) * ECAL_HALF_LENGTH_MM)
    curvature = 0.3 * bfield * 1e-3 / pt  # 1/mm per unit charge
    sin_turn = radius * curvature / 2.0
    reaches = (charge == 0) | (sin_turn < 1.0)
    turn = np.where(barrel, np.arcsin(np.clip(sin_turn, 0.0, 1.0)),
                    0.3 * bfield * 1e-3 * np.abs(z) / (2.0 * np.maximum(np.abs(pz), 1e-9)))
    phi = phi - charge * turn
    return radius * np.cos(phi), radius * np.sin(phi), z, reaches


def deposits(record: py.Record, rng: np.random.Generator, visible: np.ndarray) -> dict[str, np.ndarray]:
    """One calorimeter deposit per visible particle that reaches the ECAL within the calorimeter acceptance."""
    x, y, z, reaches = calorimeter_entry(record, visible, CLIC.bfield)
    eta = eta_of(x, y, z)
    keep = reaches & (np.abs(eta) < CLIC.calo_max_abs_eta)
    gen, x, y, z = visible[keep], x[keep], y[keep], z[keep]
    apdg = np.abs(record.pid[gen])
    energy = record.e[gen]
    ecal_share = np.where(np.isin(apdg, (11, 22)), 1.0, rng.beta(1.0, 2.5, len(gen)))
    ecal = energy * ecal_share
    hcal = energy - ecal
    muon = apdg == 13
    ecal = np.where(muon, np.minimum(MIP_ECAL, energy), ecal)
    hcal = np.where(muon, np.minimum(MIP_HCAL, np.maximum(energy - MIP_ECAL, 0.0)), hcal)
    return {"gen": gen, "event": record.event[gen], "x": x, "y": y, "z": z, "ecal": ecal, "hcal": hcal}


def calorimeter(record: py.Record, rng: np.random.Generator, dep: dict[str, np.ndarray], tracked: np.ndarray,
                ) -> Elements:
    """Merge deposits into clusters, smear them, and give each cluster its target (untracked particles in it)."""
    n_dep = len(dep["gen"])
    r = np.sqrt(dep["x"] ** 2 + dep["y"] ** 2 + dep["z"] ** 2)
    total = dep["ecal"] + dep["hcal"]
    # massless pseudo-particles along the impact directions: C/A with R = 0.05 merges the nearby deposits
    scale = np.maximum(total, 1e-3) / r
    clusters = cluster(dep["event"], dep["x"] * scale, dep["y"] * scale, dep["z"] * scale, np.maximum(total, 1e-3),
                       record.n_events, "cambridge", CLUSTER_MERGE_DR)
    n_cl = len(clusters)
    owner = np.empty(n_dep, dtype=np.int64)
    owner[clusters.constituents] = clusters.constituent_jet

    def cluster_sum(values):
        return np.bincount(owner, weights=values, minlength=n_cl)

    ecal_true, hcal_true = cluster_sum(dep["ecal"]), cluster_sum(dep["hcal"])
    ecal = np.where(ecal_true > 0, smear_relative(rng, ecal_true, calo_resolution(
        ecal_true, CLIC.ecal_stochastic, CLIC.ecal_constant)), 0.0)
    hcal = np.where(hcal_true > 0, smear_relative(rng, hcal_true, calo_resolution(
        hcal_true, CLIC.hcal_stochastic, CLIC.hcal_constant)), 0.0)
    energy = ecal + hcal
    weight = np.maximum(cluster_sum(total), 1e-9)
    mean = {c: cluster_sum(total * dep[c]) / weight for c in ("x", "y", "z")}
    spread_ecal_share = ecal_true / np.maximum(ecal_true + hcal_true, 1e-9)
    intrinsic = spread_ecal_share * SHOWER_WIDTH_ECAL_MM + (1 - spread_ecal_share) * SHOWER_WIDTH_HCAL_MM
    sigma = {c: quadrature(np.sqrt(np.maximum(cluster_sum(total * dep[c] ** 2) / weight - mean[c] ** 2, 0.0)),
                           intrinsic) for c in ("x", "y", "z")}
    rho = np.hypot(mean["x"], mean["y"])
    theta = np.arctan2(rho, mean["z"])
    phi = np.arctan2(mean["y"], mean["x"])

    features = np.zeros((n_cl, N_FEATURES))
    features[:, 0] = 2
    features[:, 1] = energy * np.sin(theta)
    features[:, 2] = eta_of(mean["x"], mean["y"], mean["z"])
    features[:, 3] = np.sin(phi)
    features[:, 4] = np.cos(phi)
    features[:, 5] = energy
    features[:, 6], features[:, 7], features[:, 8] = mean["x"], mean["y"], mean["z"]
    features[:, 9] = theta
    features[:, 10] = ecal
    features[:, 11] = hcal
    # 12: energy_other, not simulated
    features[:, 13] = 1 + rng.poisson(30.0 * ecal_true + 8.0 * hcal_true)
    features[:, 14], features[:, 15], features[:, 16] = sigma["x"], sigma["y"], sigma["z"]

    # targets: untracked particles, summed per cluster, classified by the most energetic one, forced neutral
    untracked = ~np.isin(dep["gen"], tracked)
    members = np.flatnonzero(untracked)
    target_p4 = np.zeros((n_cl, 4))
    target_class = np.zeros(n_cl, dtype=np.int64)
    if len(members):
        p4 = _p4(record, dep["gen"][members])
        for k in range(4):
            target_p4[:, k] = np.bincount(owner[members], weights=p4[:, k], minlength=n_cl)
        order = np.lexsort((-p4[:, 3], owner[members]))
        first = order[np.r_[True, owner[members][order][1:] != owner[members][order][:-1]]]
        leader_pdg = np.abs(record.pid[dep["gen"][members][first]])
        target_class[owner[members][first]] = np.where(np.isin(leader_pdg, (11, 22)), 3, 2)
    seen = energy > CLUSTER_MIN_E
    return Elements(clusters.event[seen], features[seen], target_class[seen], target_p4[seen])


def element_columns(elements: Elements, n_events: int) -> dict[str, np.ndarray]:
    """Per event: tracks first, then clusters, padded to MAX_ELEMENTS (later elements of a fuller event dropped)."""
    is_cluster = (elements.features[:, 0] == 2).astype(np.int64)
    order = np.lexsort((is_cluster, elements.event))
    event = elements.event[order]
    counts = np.bincount(event, minlength=n_events)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(len(event)) - starts[event]
    keep = slot < MAX_ELEMENTS
    rows, slot, order = event[keep], slot[keep], order[keep]

    def table(values, dtype, tail=()):
        out = np.zeros((n_events, MAX_ELEMENTS, *tail), dtype=dtype)
        out[rows, slot] = values[order]
        return out

    p4 = elements.target_p4
    pt = np.hypot(p4[:, 0], p4[:, 1])
    exists = elements.target_class > 0
    phi = np.arctan2(p4[:, 1], p4[:, 0])
    return {
        "elem_features": table(elements.features, np.float32, (N_FEATURES,)),
        "elem_n": np.minimum(counts, MAX_ELEMENTS).astype(np.int32),
        "label_existence": table(exists.astype(np.int64), np.int64),
        "label_particle_class": table(elements.target_class, np.int64),
        "target_pt": table(np.where(exists, pt, 0.0), np.float32),
        "target_eta": table(np.where(exists, eta_of(p4[:, 0], p4[:, 1], p4[:, 2]), 0.0), np.float32),
        "target_sin_phi": table(np.where(exists, np.sin(phi), 0.0), np.float32),
        "target_cos_phi": table(np.where(exists, np.cos(phi), 0.0), np.float32),
        "target_energy": table(np.where(exists, p4[:, 3], 0.0), np.float32),
    }


def generator_jets_and_met(record: py.Record) -> dict[str, np.ndarray]:
    """ee anti-kT R = 0.4 jets (pT > 5 GeV) and MET = |sum pT| of the stable non-neutrino particles."""
    visible = np.flatnonzero(record.is_visible_final)
    event = record.event[visible]
    jets = cluster(event, record.px[visible], record.py[visible], record.pz[visible], record.e[visible],
                   record.n_events, "ee_antikt", 0.4, min_pt=GENJET_MIN_PT)
    counts = np.bincount(jets.event, minlength=record.n_events)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(len(jets)) - starts[jets.event]
    keep = slot < MAX_GENJETS
    out = {}
    for name, value in (("pt", jets.pt), ("eta", jets.eta), ("phi", jets.phi), ("energy", jets.e)):
        table = np.zeros((record.n_events, MAX_GENJETS), dtype=np.float32)
        table[jets.event[keep], slot[keep]] = value[keep]
        out[f"genjet_{name}"] = table
    out["genjet_n"] = np.minimum(counts, MAX_GENJETS).astype(np.int32)
    met_x = np.bincount(event, weights=record.px[visible], minlength=record.n_events)
    met_y = np.bincount(event, weights=record.py[visible], minlength=record.n_events)
    out["gen_met"] = np.hypot(met_x, met_y).astype(np.float32)
    return out


def simulate(record: py.Record, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """All stored columns of the events in `record`."""
    visible = np.flatnonzero(record.is_visible_final)
    charged = visible[record.charge[visible] != 0]
    tracked, tracks = tracker(record, CLIC, rng, charged)
    clusters = calorimeter(record, rng, deposits(record, rng, visible), tracked)
    return {**element_columns(Elements.concat([tracks, clusters]), record.n_events),
            **generator_jets_and_met(record)}


class ClicEventsGenerator:
    def __init__(self, context: RunContext):
        init_seed, extra_settings = context.init_seed, context.settings
        self.pythia = {name: py.make_pythia([*settings, *extra_settings], init_seed + i)
                       for i, (name, settings) in enumerate(SAMPLES.items())}

    def run(self, n_events: int, seeds: UnitSeeds) -> dict[str, np.ndarray]:
        rng = seeds.numpy()
        n_tt = n_events // 2
        parts = []
        for instance, (name, n) in enumerate((("ttbar", n_tt), ("qq", n_events - n_tt))):
            if n == 0:
                continue
            pythia = self.pythia[name]
            py.reseed(pythia, seeds.pythia(instance))
            columns = simulate(py.generate(pythia, n), rng)
            parts.append({**columns, "gen_process": np.full(n, PROCESS_NAMES.index(name), dtype=np.int32)})
        return concat_shuffled(parts, rng)


PROCESS = Process(
    name="clic-events",
    summary="e+e- -> t tbar and q qbar at 380 GeV, toy CLIC-like tracks and clusters with MLPF targets",
    schema=SCHEMA,
    unit_events=100,
    make=ClicEventsGenerator,
    classes={"label_particle_class": CLASSES, "gen_process": PROCESS_NAMES},
    example="event",
    chunk_size=128,
)
