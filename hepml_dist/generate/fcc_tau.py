"""`fcc-tau`: FCC-ee Z-pole tau jets and quark jets for tau identification, decay mode, charge and kinematics.

e+e- -> Z -> tau+ tau- (both taus hadronic) and e+e- -> Z -> q qbar (udscb) at sqrt(s) = 91.2 GeV, half the events
each (`--background-only`: q qbar only). PF candidates from a CLD-like response: `--detector realistic` (the
default; `detector_realistic`: beam spot, tracking efficiency and fakes, particle-flow confusion, gamma gamma ->
hadrons overlay, impact parameters signed along the jet) or `--detector ideal` (`detector.CLD` alone: the shards of
earlier versions). e+e- anti-kT jets (ee_genkt, R = 0.4, p = -1) with pT > 5 GeV, up to 20 pT-ordered candidates
per jet. Tau jets are reco jets within Delta R < 0.3 of a visible tau
(the tau minus its neutrinos); jets of tau events without a tau are dropped, every jet of a q qbar event is
background. Labels and targets follow MultiParTau (HEP-KBFI/ml-tau-en-reg ad3edb7 enreg/tools/general.py for the decay
modes; HEP-KBFI/ml-tau-model mltau/tools/io/ParT_dataloader.py for the targets; arXiv:2606.18460).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import numpy as np

from hepml_dist.errors import UserError
from hepml_dist.generate import detector_realistic as realistic
from hepml_dist.generate import pythia as py
from hepml_dist.generate.base import Process, RunContext, Schema, UnitSeeds, concat_shuffled
from hepml_dist.generate.detector import CLD, Detector, reconstruct_candidates
from hepml_dist.generate.jets import cluster, constituent_columns, delta_phi, delta_r, jet_schema

MAX_CANDIDATES = 20
JET_MIN_PT = 5.0
MATCH_DR = 0.3
TARGET_CLIP = 5.0

Z_POLE = ["Beams:idA = 11", "Beams:idB = -11", "Beams:eCM = 91.2",
          "WeakSingleBoson:ffbar2gmZ = on", "WeakZ0:gmZmode = 2", "23:onMode = off"]
# TauDecays:mode = 3: Pythia's full hadronic decay currents (resonance structure of rho, a1, ... and the right
# visible-energy spectra) with every tau polarised as at the Z pole (P_tau = -0.147), but no tau+ tau- spin
# correlation. That correlation is invisible to single-jet tasks, and mode 3 runs 3.5x faster than mode 1 with
# TauDecays:mMinForZ and 10x faster than plain mode 1 (docs/generators.md).
TAU_SETTINGS = [*Z_POLE, "23:onIfAny = 15", "15:offIfAny = 11 13",
                "TauDecays:mode = 3", "TauDecays:tauPolarization = -0.147"]
QQ_SETTINGS = [*Z_POLE, "23:onIfAny = 1 2 3 4 5"]

DECAY_MODES = ["h", "h_pi0", "h_2pi0", "3h", "3h_pi0", "other"]
# full decay mode 5 * (n_charged - 1) + min(n_neutral, 4) (15 = rare) -> reduced 6-class index (omnijet_tau.md 2.3)
_REDUCED = np.full(16, 5, dtype=np.int64)
_REDUCED[[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]] = [0, 1, 2, 2, 2, 3, 4, 4, 4, 4, 3, 4, 4, 4, 4]

SCHEMA: Schema = {
    **jet_schema(MAX_CANDIDATES),
    "label_is_tau": ("int64", ()),
    "label_charge": ("int64", ()),
    "label_decay_mode": ("int64", ()),
    **{f"target_{t}": ("float32", ()) for t in
       ("log_pt_ratio", "delta_eta", "sin_delta_phi", "cos_delta_phi", "log_mass_ratio")},
    **{f"gen_tau_{v}": ("float32", ()) for v in ("pt", "eta", "phi", "mass")},
}


def full_decay_mode(pdg: np.ndarray, charge: np.ndarray) -> int:
    """Decay mode from the tau's direct daughters: charged hadrons count as prongs, neutral hadrons (pi0, K0, eta,
    omega, ...) as neutrals; anything else visible (a photon, a lepton) makes the decay 'rare' (15)."""
    apdg = np.abs(pdg)
    visible = ~np.isin(apdg, py.NEUTRINOS)
    hadron = apdg > 100
    if np.any(visible & ~hadron):
        return 15
    n_charged = int(np.sum(visible & hadron & (charge != 0)))
    n_neutral = int(np.sum(visible & hadron & (charge == 0)))
    if not 1 <= n_charged <= 3:
        return 15
    return 5 * (n_charged - 1) + min(n_neutral, 4)


def reduced_decay_mode(full: np.ndarray) -> np.ndarray:
    return _REDUCED[np.asarray(full)]


def hadronic_taus(record: py.Record) -> dict[str, np.ndarray]:
    """The decaying copies of the taus from the Z: event, pdg, visible 4-momentum and full decay mode."""
    rows = []
    for first in np.flatnonzero((np.abs(record.pid) == 15) & (np.abs(record.status) == 23)):
        tau = record.last_copy(int(first))
        daughters = record.daughters(tau)
        mode = full_decay_mode(record.pid[daughters], record.charge[daughters])
        rows.append((record.event[tau], record.pid[tau], *py.visible_momentum(record, tau), mode))
    table = np.array(rows, dtype=np.float64).reshape(-1, 7)
    return {"event": table[:, 0].astype(np.int64), "pdg": table[:, 1].astype(np.int64),
            "p4": table[:, 2:6], "mode": table[:, 6].astype(np.int64)}


def no_taus() -> dict[str, np.ndarray]:
    return {"event": np.zeros(0, np.int64), "pdg": np.zeros(0, np.int64), "p4": np.zeros((0, 4)),
            "mode": np.zeros(0, np.int64)}


def kinematics(p4: np.ndarray) -> tuple[np.ndarray, ...]:
    """(pT, eta, phi, mass) of [n, 4] (px, py, pz, E) with m = sqrt(max(E^2 - p^2, 0))."""
    pt = np.hypot(p4[:, 0], p4[:, 1])
    eta = np.arcsinh(p4[:, 2] / np.maximum(pt, 1e-9))
    phi = np.arctan2(p4[:, 1], p4[:, 0])
    mass = np.sqrt(np.maximum(p4[:, 3] ** 2 - np.sum(p4[:, :3] ** 2, axis=1), 0.0))
    return pt, eta, phi, mass


def match_taus(taus: dict[str, np.ndarray], jet_event, jet_eta, jet_phi) -> np.ndarray:
    """For each jet the index of the visible tau within Delta R < MATCH_DR (nearest, one jet per tau), else -1."""
    _, tau_eta, tau_phi, _ = kinematics(taus["p4"])
    match = np.full(len(jet_event), -1)
    best = np.full(len(jet_event), np.inf)
    for t in range(len(taus["event"])):
        jets = np.flatnonzero(jet_event == taus["event"][t])
        if len(jets) == 0:
            continue
        dr = delta_r(tau_eta[t], tau_phi[t], jet_eta[jets], jet_phi[jets])
        nearest = int(np.argmin(dr))
        j = jets[nearest]
        if dr[nearest] < MATCH_DR and dr[nearest] < best[j]:
            match[j], best[j] = t, dr[nearest]
    return match


def tau_labels(match: np.ndarray, taus: dict[str, np.ndarray], jet_pt, jet_eta, jet_phi, jet_mass,
               ) -> dict[str, np.ndarray]:
    """Labels, MultiParTau kinematic targets and visible-tau truth per jet (-1 / 0 where no tau)."""
    is_tau = match >= 0
    t = np.where(is_tau, match, 0)
    if len(taus["event"]) == 0:
        t_pt = t_eta = t_phi = t_mass = np.zeros(len(match))
        pdg = mode = np.zeros(len(match), dtype=np.int64)
    else:
        pt, eta, phi, mass = kinematics(taus["p4"])
        t_pt, t_eta, t_phi, t_mass = pt[t], eta[t], phi[t], mass[t]
        pdg, mode = taus["pdg"][t], taus["mode"][t]
    dphi = delta_phi(t_phi, jet_phi)

    def log_ratio(a, b):
        return np.clip(np.log(np.maximum(a, 1e-6) / np.maximum(b, 1e-6)), -TARGET_CLIP, TARGET_CLIP)

    def tau_only(value, fill):
        return np.where(is_tau, value, fill)

    f32 = np.float32
    return {
        "label_is_tau": is_tau.astype(np.int64),
        "label_charge": tau_only(pdg < 0, -1).astype(np.int64),  # tau+ has PDG id -15
        "label_decay_mode": tau_only(reduced_decay_mode(mode), -1).astype(np.int64),
        "target_log_pt_ratio": tau_only(log_ratio(t_pt, jet_pt), 0).astype(f32),
        "target_delta_eta": tau_only(t_eta - jet_eta, 0).astype(f32),
        "target_sin_delta_phi": tau_only(np.sin(dphi), 0).astype(f32),
        "target_cos_delta_phi": tau_only(np.cos(dphi), 0).astype(f32),
        "target_log_mass_ratio": tau_only(log_ratio(t_mass, jet_mass), 0).astype(f32),
        "gen_tau_pt": tau_only(t_pt, 0).astype(f32),
        "gen_tau_eta": tau_only(t_eta, 0).astype(f32),
        "gen_tau_phi": tau_only(t_phi, 0).astype(f32),
        "gen_tau_mass": tau_only(t_mass, 0).astype(f32),
    }


# ---- options ------------------------------------------------------------------------------------------------------

DETECTORS = ("realistic", "ideal")
DEFAULT_DETECTOR = "realistic"
# Instance of the Pythia seed stream that a background-only run gives its q qbar sample: not 1 (the q qbar sample of
# a normal run), so a background-only set made with the demo's seed holds other events than the demo's test split.
BACKGROUND_ONLY_STREAM = 2


@dataclass(frozen=True)
class Options:
    """`--detector`, `--overlay-rate` and `--background-only`, parsed; recorded in the manifest with the numbers."""

    detector: str
    """`realistic` (default) or `ideal`."""
    background_only: bool
    """Generate Z -> q qbar events only (a background-only test set); default False."""
    response: Detector
    """Resolutions and acceptances (CLD-like, both detectors)."""
    effects: realistic.Effects | None
    """The realistic detector's effects (overlay rate included); None for the ideal detector."""


def configure(options: Mapping[str, str]) -> Options:
    """The options as typed (strings) -> Options, defaults filled in; a UserError names a bad one."""
    detector = str(options.get("detector", DEFAULT_DETECTOR))
    if detector not in DETECTORS:
        raise UserError(f"--detector {detector!r}: choose one of {', '.join(DETECTORS)}")
    effects = realistic.REALISTIC if detector == "realistic" else None
    if "overlay_rate" in options:
        if effects is None:
            raise UserError("--overlay-rate: the ideal detector has no beam-induced background; use "
                            "--detector realistic or drop --overlay-rate")
        try:
            rate = float(options["overlay_rate"])
        except ValueError:
            rate = -1.0
        if not 0 <= rate <= 1000:
            raise UserError(f"--overlay-rate {options['overlay_rate']!r}: give the mean number of overlaid soft "
                            f"particles per event, a number in 0-1000 (default {realistic.REALISTIC.overlay_rate:g})")
        effects = replace(effects, overlay_rate=rate)
    background_only = str(options.get("background_only", "false")).lower() in ("1", "true", "yes", "on")
    return Options(detector, background_only, CLD, effects)


class FccTauGenerator:
    def __init__(self, context: RunContext):
        init_seed, extra_settings = context.init_seed, context.settings
        self.options: Options = context.options or configure({})
        self.tau = py.make_pythia([*TAU_SETTINGS, *extra_settings], init_seed)
        self.qq = py.make_pythia([*QQ_SETTINGS, *extra_settings], init_seed + 1)

    def _candidates(self, record: py.Record, rng: np.random.Generator):
        if self.options.effects is None:
            return reconstruct_candidates(record, self.options.response, rng)
        candidates, _ = realistic.reconstruct(record, rng, self.options.effects, self.options.response)
        return candidates

    def _jets(self, record: py.Record, rng: np.random.Generator, with_taus: bool) -> dict[str, np.ndarray]:
        candidates = self._candidates(record, rng)
        jets = cluster(candidates.event, candidates.px, candidates.py, candidates.pz, candidates.e,
                       record.n_events, "ee_antikt", 0.4, min_pt=JET_MIN_PT)
        if self.options.effects is not None:
            candidates = realistic.sign_impact_parameters(candidates, jets)
        taus = hadronic_taus(record) if with_taus else no_taus()  # taus from b/c decays in q qbar are background
        match = match_taus(taus, jets.event, jets.eta, jets.phi)
        if with_taus:
            jets, match = jets.take(match >= 0), match[match >= 0]
        columns = constituent_columns(jets, candidates, MAX_CANDIDATES)
        labels = tau_labels(match, taus, columns["jet_pt"], columns["jet_eta"], columns["jet_phi"],
                            columns["jet_mass"])
        return {**columns, **labels}

    def run(self, n_events: int, seeds: UnitSeeds) -> dict[str, np.ndarray]:
        rng = seeds.numpy()
        n_tau = 0 if self.options.background_only else n_events // 2
        qq_stream = BACKGROUND_ONLY_STREAM if self.options.background_only else 1
        parts = []
        samples = ((0, self.tau, n_tau, True), (qq_stream, self.qq, n_events - n_tau, False))
        for instance, pythia, n, with_taus in samples:
            if n == 0:
                continue
            py.reseed(pythia, seeds.pythia(instance))
            parts.append(self._jets(py.generate(pythia, n), rng, with_taus))
        return concat_shuffled(parts, rng)


PROCESS = Process(
    name="fcc-tau",
    summary="FCC-ee Z -> tau tau (hadronic) and Z -> q qbar jets at 91.2 GeV, CLD-like response, MultiParTau labels",
    schema=SCHEMA,
    unit_events=1000,
    make=FccTauGenerator,
    classes={"label_is_tau": ["jet", "tau"], "label_charge": ["tau-", "tau+"], "label_decay_mode": DECAY_MODES},
    options=("detector", "overlay_rate", "background_only"),
    configure=configure,
)
