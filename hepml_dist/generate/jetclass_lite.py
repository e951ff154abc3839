"""`jetclass-lite`: boosted-jet tagging at 13 TeV in the JetClass style, five classes.

pp -> QCD dijets, H(bb)+jet, Z(qq)+jet, W(qq')+jet and t tbar (all-hadronic), each with pTHat > 500 GeV. PF
candidates from a CMS-like response (`detector.CMS`), anti-kT R = 0.8 jets with pT > 500 GeV and |eta| < 2, up to
128 pT-ordered constituents. A jet of a resonance sample is kept only when it is matched to the resonance: the
boson (or top) and all its quark daughters (b q q' for the top) lie within Delta R < 0.8 of the jet axis, as in
JetClass; every QCD jet passing the cuts is kept. Multi-parton interactions are off by default (3-4x faster; no
underlying event), which is the main way this set is "lite"; `--pythia "PartonLevel:MPI = on"` restores them.
"""

from __future__ import annotations

import numpy as np

from hepml_dist.generate import pythia as py
from hepml_dist.generate.base import Process, RunContext, Schema, UnitSeeds, concat_shuffled
from hepml_dist.generate.detector import CMS, reconstruct_candidates
from hepml_dist.generate.jets import cluster, constituent_columns, delta_r, jet_schema

CLASSES = ["QCD", "Hbb", "Zqq", "Wqq", "Tbqq"]  # label_jet_class index order (jobs/part-quickstart.yaml)
MAX_CONSTITUENTS = 128
JET_RADIUS = 0.8
JET_MIN_PT = 500.0
JET_MAX_ABS_ETA = 2.0

_PP = ["Beams:eCM = 13000", "PhaseSpace:pTHatMin = 500", "PartonLevel:MPI = off"]
_HADRONIC_W = ["24:onMode = off", "24:onIfAny = 1 2 3 4 5"]
SAMPLES: dict[str, list[str]] = {
    "QCD": [*_PP, "HardQCD:all = on"],
    "Hbb": [*_PP, "HiggsSM:gg2Hg(l:t) = on", "HiggsSM:qg2Hq(l:t) = on", "HiggsSM:qqbar2Hg(l:t) = on",
            "25:onMode = off", "25:onIfMatch = 5 -5"],
    "Zqq": [*_PP, "WeakBosonAndParton:qqbar2gmZg = on", "WeakBosonAndParton:qg2gmZq = on", "WeakZ0:gmZmode = 2",
            "23:onMode = off", "23:onIfAny = 1 2 3 4 5"],
    "Wqq": [*_PP, "WeakBosonAndParton:qqbar2Wg = on", "WeakBosonAndParton:qg2Wq = on", *_HADRONIC_W],
    "Tbqq": [*_PP, "Top:gg2ttbar = on", "Top:qqbar2ttbar = on", *_HADRONIC_W],
}
RESONANCE = {"Hbb": 25, "Zqq": 23, "Wqq": 24, "Tbqq": 6}
# Share of the events given to each sample, chosen so the five classes come out roughly balanced in jets
# (matched jets per event differ: a QCD event gives ~2 jets, a boson+jet event < 1; docs/generators.md).
EVENT_SHARE = {"QCD": 0.12, "Hbb": 0.25, "Zqq": 0.235, "Wqq": 0.215, "Tbqq": 0.18}

SCHEMA: Schema = {**jet_schema(MAX_CONSTITUENTS), "label_jet_class": ("int64", ())}


def _quark_daughters(record: py.Record, index: int) -> list[int]:
    return [int(d) for d in record.daughters(index) if 1 <= abs(record.pid[d]) <= 5]


def resonance_decays(record: py.Record, pdg: int) -> list[tuple[int, list[int]]]:
    """(decaying copy, its quark decay products) for each hard-process resonance `pdg` (top: b and the W's quarks)."""
    out = []
    for first in np.flatnonzero((np.abs(record.pid) == pdg) & np.isin(np.abs(record.status), (22, 23))):
        mother = record.mother1[first]
        if mother >= 0 and abs(record.pid[mother]) == pdg:
            continue  # a copy, not the first instance
        last = record.last_copy(int(first))
        quarks = _quark_daughters(record, last)
        if pdg == 6:
            for w in record.daughters(last):
                if abs(record.pid[w]) == 24:
                    quarks += _quark_daughters(record, record.last_copy(int(w)))
        out.append((last, quarks))
    return out


def _eta_phi(record: py.Record, index):
    pt = np.hypot(record.px[index], record.py[index])
    return np.arcsinh(record.pz[index] / np.maximum(pt, 1e-9)), np.arctan2(record.py[index], record.px[index])


def matched_jets(record: py.Record, pdg: int, jet_event, jet_eta, jet_phi) -> np.ndarray:
    """Boolean mask of jets containing a full resonance decay (resonance and all its quarks within R)."""
    matched = np.zeros(len(jet_event), dtype=bool)
    n_quarks = 3 if pdg == 6 else 2
    for resonance, quarks in resonance_decays(record, pdg):
        if len(quarks) != n_quarks:
            continue
        jets = np.flatnonzero((jet_event == record.event[resonance]) & ~matched)
        if len(jets) == 0:
            continue
        eta, phi = _eta_phi(record, np.array([resonance, *quarks]))
        dr = delta_r(eta[:, None], phi[:, None], jet_eta[jets][None, :], jet_phi[jets][None, :])
        contains = np.all(dr < JET_RADIUS, axis=0)
        if contains.any():
            matched[jets[np.argmin(np.where(contains, dr[0], np.inf))]] = True
    return matched


def event_counts(n_events: int) -> dict[str, int]:
    """Events per sample in a unit of `n_events` (deterministic; the remainder goes to the first samples)."""
    counts = {name: int(n_events * share) for name, share in EVENT_SHARE.items()}
    for name in list(counts)[: n_events - sum(counts.values())]:
        counts[name] += 1
    return counts


class JetClassLiteGenerator:
    def __init__(self, context: RunContext):
        init_seed, extra_settings = context.init_seed, context.settings
        self.pythia = {name: py.make_pythia([*settings, *extra_settings], init_seed + i)
                       for i, (name, settings) in enumerate(SAMPLES.items())}

    def run(self, n_events: int, seeds: UnitSeeds) -> dict[str, np.ndarray]:
        rng = seeds.numpy()
        parts = []
        for instance, (name, n) in enumerate(event_counts(n_events).items()):
            if n == 0:
                continue
            pythia = self.pythia[name]
            py.reseed(pythia, seeds.pythia(instance))
            record = py.generate(pythia, n)
            candidates = reconstruct_candidates(record, CMS, rng)
            jets = cluster(candidates.event, candidates.px, candidates.py, candidates.pz, candidates.e,
                           record.n_events, "antikt", JET_RADIUS, min_pt=JET_MIN_PT)
            keep = np.abs(jets.eta) < JET_MAX_ABS_ETA
            if name != "QCD":
                keep &= matched_jets(record, RESONANCE[name], jets.event, jets.eta, jets.phi)
            jets = jets.take(keep)
            columns = constituent_columns(jets, candidates, MAX_CONSTITUENTS)
            columns["label_jet_class"] = np.full(len(jets), CLASSES.index(name), dtype=np.int64)
            parts.append(columns)
        return concat_shuffled(parts, rng)


PROCESS = Process(
    name="jetclass-lite",
    summary="13 TeV boosted jets (QCD, H->bb, Z->qq, W->qq, t->bqq), anti-kT 0.8, pT > 500 GeV, CMS-like response",
    schema=SCHEMA,
    unit_events=100,
    make=JetClassLiteGenerator,
    classes={"label_jet_class": CLASSES},
    chunk_size=512,
)
