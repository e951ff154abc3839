"""`events-met`: event classification with jets and missing energy at 13 TeV (AnalysisObjectTransformer).

Signal pp -> ZH, Z -> nu nu, H -> b bbar; backgrounds t tbar (inclusive decays), Z(nu nu)+jet and W(l nu)+jet,
each generated with pTHat > 100 GeV. PF candidates from the CMS-like response; isolated electrons and muons
(pT > 10 GeV, |eta| < 2.5, sum pT of other candidates within Delta R 0.3 below 15 % of the lepton's); anti-kT
R = 0.4 jets of the other candidates with pT > 30 GeV, |eta| < 2.5; MET = |sum pT| of all candidates. b-tagging is
a proxy: a jet within Delta R 0.3 of a weakly decaying B hadron (pT > 5 GeV) is a b jet, else of a C hadron a c jet,
else light; its score is sigmoid(x), x ~ N(Phi^-1(eff), 1), so a cut at 0.5 tags b / c / light jets with 77 / 15 /
1 % efficiency. Events pass MET > 100 GeV and >= 2 jets.

Objects: jets and leptons, pT-ordered, features (E, pT, eta, phi, mass, b-tag score); leptons carry b-tag -1.
Weights: `gen_xsec_weight` = sigma x BR (fb) / generated events of the sample, so its sum over a dataset is the
expected number of selected events per fb^-1; `weight` = the same divided by the class's mean generation weight
(signal events 1, backgrounds mixed by cross section with mean 1 per generated event).
"""

from __future__ import annotations

from statistics import NormalDist

import numpy as np

from hepml_dist.generate import pythia as py
from hepml_dist.generate.base import Process, RunContext, Schema, UnitSeeds, concat_shuffled, unit_sizes
from hepml_dist.generate.detector import CMS, reconstruct_candidates
from hepml_dist.generate.jets import cluster, delta_r

MAX_OBJECTS = 16
JET_MIN_PT, JET_MAX_ABS_ETA = 30.0, 2.5
LEPTON_MIN_PT, LEPTON_MAX_ABS_ETA, LEPTON_ISOLATION = 10.0, 2.5, 0.15
MET_MIN, MIN_JETS = 100.0, 2
BTAG_EFFICIENCY = {"b": 0.77, "c": 0.15, "light": 0.01}
HADRON_MATCH_DR, HADRON_MIN_PT = 0.3, 5.0
PILOT_EVENTS = 5000  # process-level events for the cross-section estimate

_PP = ["Beams:eCM = 13000", "PhaseSpace:pTHatMin = 100", "PartonLevel:MPI = off"]
SAMPLES: dict[str, list[str]] = {
    "ZH": [*_PP, "HiggsSM:ffbar2HZ = on", "25:onMode = off", "25:onIfMatch = 5 -5",
           "23:onMode = off", "23:onIfAny = 12 14 16"],
    "ttbar": [*_PP, "Top:gg2ttbar = on", "Top:qqbar2ttbar = on"],
    "Znunu": [*_PP, "WeakBosonAndParton:qqbar2gmZg = on", "WeakBosonAndParton:qg2gmZq = on", "WeakZ0:gmZmode = 2",
              "23:onMode = off", "23:onIfAny = 12 14 16"],
    "Wlnu": [*_PP, "WeakBosonAndParton:qqbar2Wg = on", "WeakBosonAndParton:qg2Wq = on",
             "24:onMode = off", "24:onIfAny = 11 13 15"],
}
PROCESSES = list(SAMPLES)  # label_process index order; 0 is the signal
EVENT_SHARE = {"ZH": 0.4, "ttbar": 0.2, "Znunu": 0.2, "Wlnu": 0.2}

SCHEMA: Schema = {
    "obj_features": ("float32", (MAX_OBJECTS, 6)),
    "obj_n": ("int32", ()),
    **{f"event_{name}": ("float32", ()) for name in ("ht", "met", "n_jets", "n_bjets")},
    "label_signal": ("int64", ()),
    "label_process": ("int64", ()),
    "weight": ("float32", ()),
    "gen_xsec_weight": ("float32", ()),
}


def event_counts(n_events: int) -> dict[str, int]:
    counts = {name: int(n_events * share) for name, share in EVENT_SHARE.items()}
    for name in list(counts)[: n_events - sum(counts.values())]:
        counts[name] += 1
    return counts


def cross_section_fb(settings: list[str], init_seed: int) -> float:
    """sigma x BR (fb) of a sample from a fixed-seed run of the hard process only (same in every worker)."""
    pythia = py.make_pythia([*settings, "PartonLevel:all = off", "HadronLevel:all = off"], init_seed)
    pythia.nextBatch(PILOT_EVENTS)
    return float(pythia.infoPython().sigmaGen()) * 1e12  # mb -> fb


def _heavy_flavour(apdg: np.ndarray, quark: int) -> np.ndarray:
    """Hadrons containing quark `quark` (4 or 5) as their heaviest quark, from the PDG numbering scheme."""
    digits = np.stack([(apdg // 1000) % 10, (apdg // 100) % 10, (apdg // 10) % 10])
    hadron = (apdg > 100) & ((apdg // 10) % 10 > 0)  # diquarks (e.g. 5101) have a 0 tens digit
    heaviest = np.where(hadron, np.where((apdg // 1000) % 10 > 0, digits[0], digits[1]), 0)
    return hadron & (heaviest == quark) & (apdg < 1_000_000)


def weakly_decaying(record: py.Record, quark: int) -> np.ndarray:
    """Flat indices of the last b (or c) hadrons of each chain (no hadron of the same flavour among daughters)."""
    apdg = np.abs(record.pid)
    flavoured = _heavy_flavour(apdg, quark)
    parents = record.mother1[flavoured]
    has_flavoured_daughter = np.zeros(len(apdg), dtype=bool)
    has_flavoured_daughter[parents[parents >= 0]] = True
    return np.flatnonzero(flavoured & ~has_flavoured_daughter & (record.pt > HADRON_MIN_PT))


def jet_flavour(record: py.Record, jet_event, jet_eta, jet_phi) -> np.ndarray:
    """0 light, 1 c, 2 b: the heaviest weakly decaying hadron within Delta R < 0.3 of the jet."""
    flavour = np.zeros(len(jet_event), dtype=np.int64)
    for code, quark in ((1, 4), (2, 5)):
        hadrons = weakly_decaying(record, quark)
        if len(hadrons) == 0 or len(jet_event) == 0:
            continue
        h_eta = np.arcsinh(record.pz[hadrons] / np.maximum(record.pt[hadrons], 1e-9))
        h_phi = np.arctan2(record.py[hadrons], record.px[hadrons])
        same_event = record.event[hadrons][None, :] == jet_event[:, None]
        near = same_event & (delta_r(jet_eta[:, None], jet_phi[:, None], h_eta[None, :], h_phi[None, :])
                             < HADRON_MATCH_DR)
        flavour[near.any(axis=1)] = code
    return flavour


def btag_score(flavour: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mean = np.array([NormalDist().inv_cdf(BTAG_EFFICIENCY[f]) for f in ("light", "c", "b")])
    return 1.0 / (1.0 + np.exp(-(mean[flavour] + rng.standard_normal(len(flavour)))))


def isolated_leptons(candidates, event_of) -> np.ndarray:
    """Indices of isolated electron/muon candidates."""
    pt = np.hypot(candidates.px, candidates.py)
    eta = np.arcsinh(candidates.pz / np.maximum(pt, 1e-9))
    phi = np.arctan2(candidates.py, candidates.px)
    lepton = np.flatnonzero(np.isin(np.abs(candidates.pid), (11, 13)) & (pt > LEPTON_MIN_PT)
                            & (np.abs(eta) < LEPTON_MAX_ABS_ETA))
    keep = []
    starts, ends = np.searchsorted(event_of, event_of[lepton], "left"), np.searchsorted(event_of, event_of[lepton],
                                                                                        "right")
    for i, start, end in zip(lepton, starts, ends):
        others = np.arange(start, end)
        others = others[others != i]
        cone = delta_r(eta[i], phi[i], eta[others], phi[others]) < 0.3
        if pt[others][cone].sum() < LEPTON_ISOLATION * pt[i]:
            keep.append(i)
    return np.array(keep, dtype=np.int64)


def _object_rows(px, py_, pz, e, btag):
    pt = np.hypot(px, py_)
    mass = np.sqrt(np.maximum(e**2 - px**2 - py_**2 - pz**2, 0.0))
    return np.stack([e, pt, np.arcsinh(pz / np.maximum(pt, 1e-9)), np.arctan2(py_, px), mass, btag], axis=1)


def reconstruct_events(record: py.Record, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Objects and event features of every event, plus the selection mask `selected`."""
    n = record.n_events
    cands = reconstruct_candidates(record, CMS, rng)
    leptons = isolated_leptons(cands, cands.event)
    rest = np.setdiff1d(np.arange(len(cands)), leptons)
    hadronic = cands.take(rest)
    jets = cluster(hadronic.event, hadronic.px, hadronic.py, hadronic.pz, hadronic.e, n, "antikt", 0.4,
                   min_pt=JET_MIN_PT)
    jets = jets.take(np.abs(jets.eta) < JET_MAX_ABS_ETA)
    score = btag_score(jet_flavour(record, jets.event, jets.eta, jets.phi), rng)

    met = np.hypot(np.bincount(cands.event, weights=cands.px, minlength=n),
                   np.bincount(cands.event, weights=cands.py, minlength=n))
    n_jets = np.bincount(jets.event, minlength=n)
    n_bjets = np.bincount(jets.event, weights=(score > 0.5).astype(float), minlength=n)
    ht = np.bincount(jets.event, weights=jets.pt, minlength=n)

    rows = np.concatenate([_object_rows(jets.px, jets.py, jets.pz, jets.e, score),
                           _object_rows(cands.px[leptons], cands.py[leptons], cands.pz[leptons], cands.e[leptons],
                                        -np.ones(len(leptons)))])
    row_event = np.concatenate([jets.event, cands.event[leptons]])
    order = np.lexsort((-rows[:, 1], row_event))
    rows, row_event = rows[order], row_event[order]
    counts = np.bincount(row_event, minlength=n)
    slot = np.arange(len(rows)) - np.concatenate([[0], np.cumsum(counts)[:-1]])[row_event]
    keep = slot < MAX_OBJECTS
    objects = np.zeros((n, MAX_OBJECTS, 6), dtype=np.float32)
    objects[row_event[keep], slot[keep]] = rows[keep]
    return {
        "obj_features": objects,
        "obj_n": np.minimum(counts, MAX_OBJECTS).astype(np.int32),
        "event_ht": ht.astype(np.float32),
        "event_met": met.astype(np.float32),
        "event_n_jets": n_jets.astype(np.float32),
        "event_n_bjets": n_bjets.astype(np.float32),
        "selected": (met > MET_MIN) & (n_jets >= MIN_JETS),
    }


def event_weights(context: RunContext) -> dict[str, dict[str, float]]:
    """Per sample: `xsec` = sigma x BR (fb) per generated event, `train` = the training weight (see module doc).

    Runs once per dataset (Process.prepare): a fixed-seed process-level run per sample gives sigma x BR."""
    generated = {name: 0 for name in SAMPLES}
    for size in unit_sizes(context.total_events, PROCESS.unit_events):
        for name, count in event_counts(size).items():
            generated[name] += count
    sigma = {name: cross_section_fb([*settings, *context.settings], context.init_seed + 10 + i)
             for i, (name, settings) in enumerate(SAMPLES.items())}
    xsec = {name: sigma[name] / max(generated[name], 1) for name in SAMPLES}
    background = [name for name in SAMPLES if name != "ZH"]
    mean_background = sum(sigma[b] for b in background) / max(sum(generated[b] for b in background), 1)
    train = {name: 1.0 if name == "ZH" else xsec[name] / mean_background for name in SAMPLES}
    return {"xsec": xsec, "train": train, "sigma_fb": sigma}


class EventsMetGenerator:
    def __init__(self, context: RunContext):
        self.pythia = {name: py.make_pythia([*settings, *context.settings], context.init_seed + i)
                       for i, (name, settings) in enumerate(SAMPLES.items())}
        weights = context.prepared or event_weights(context)
        self.xsec_weight, self.train_weight = weights["xsec"], weights["train"]

    def run(self, n_events: int, seeds: UnitSeeds) -> dict[str, np.ndarray]:
        rng = seeds.numpy()
        parts = []
        for instance, (name, n) in enumerate(event_counts(n_events).items()):
            if n == 0:
                continue
            pythia = self.pythia[name]
            py.reseed(pythia, seeds.pythia(instance))
            columns = reconstruct_events(py.generate(pythia, n), rng)
            selected = columns.pop("selected")
            columns = {k: v[selected] for k, v in columns.items()}
            count = int(selected.sum())
            columns["label_signal"] = np.full(count, int(name == "ZH"), dtype=np.int64)
            columns["label_process"] = np.full(count, PROCESSES.index(name), dtype=np.int64)
            columns["weight"] = np.full(count, self.train_weight[name], dtype=np.float32)
            columns["gen_xsec_weight"] = np.full(count, self.xsec_weight[name], dtype=np.float32)
            parts.append(columns)
        return concat_shuffled(parts, rng)


PROCESS = Process(
    name="events-met",
    summary="13 TeV ZH(nu nu bb) vs t tbar, Z(nu nu)+jet, W(l nu)+jet: jets, leptons, MET, b-tag proxy, weights",
    schema=SCHEMA,
    unit_events=200,
    make=EventsMetGenerator,
    prepare=event_weights,
    classes={"label_process": PROCESSES, "label_signal": ["background", "signal"]},
    example="event",
)
