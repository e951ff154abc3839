"""`jetclass2-lite`: JetClass-II-like large-R jets at 13.6 TeV for Sophon: spin-0 resonances X of any mass, and QCD.

JetClass-II (arXiv:2405.12972; jet-universe/jetclass2_generation 3a7a135 gen_configs/jetclass2/) produces pairs of
resonances with MadGraph on a grid of masses and pT thresholds. Here Pythia 8 alone does it, pp at 13.6 TeV with
multi-parton interactions off, in four samples:

- Res2P: f fbar -> A0 H0 (`HiggsBSM:ffbar2A3H2`, two neutral X per event) and f fbar -> H+ H- (two charged X).
  Each X gets its own mass, drawn over `--mass-range` (default 15-250 GeV) from a Breit-Wigner forced to three
  times the width of the range and cut to it, so the masses spread over the whole range. Neutral X decay as the X of
  JetClass-II (train_higgs2p/py8.dat): bb, cc, ss 12.5 % each, uu, dd 6.25 %, gg 12.5 %, ee, mumu 6.25 %,
  tau tau 25 %; charged X to ud, us, ub, cd, cs, cb, 1/6 each (the quark channels of train_higgs4p/py8.dat).
- Res34P: the A0 H0 pair again, now X -> Y Y: half h h (neutral Y, decaying as the neutral X above), half H+ H-
  (charged Y: the six quark pairs 10.4 % each, e nu and mu nu 6.25 %, tau nu 25 %, as train_higgs4p/py8.dat). Y
  masses spread over 5 GeV to half the top of the range, X over [max(lo, 25 GeV), hi].
- QCD: `HardQCD:all`.
- X_bs, only when asked for (`--classes X_bs`): the neutral pair decaying to b sbar / s bbar. Not one of Sophon's
  188 classes (it is stored as index 188) but the unseen signature the Sophon paper fine-tunes for.

Every sample draws pTHat in 180-2600 GeV with Pythia's pTHat^4 bias (`PhaseSpace:bias2Selection`) so that the jets
fill the whole 200-2500 GeV range; the event weights of that bias are not stored, since Sophon flattens every class
group in (pT, m_SD) anyway. PF candidates come from the CMS-like response (`detector.CMS`); jets are anti-kT
R = 0.8 with 200 < pT < 2500 GeV and |eta| < 2.5, up to 128 pT-ordered constituents, plus the soft-drop mass
(`jet_sdmass`, C/A, z_cut = 0.1, beta = 0), tau_1..4 and the constituent count.

Labels (`label_jet_class`) are the jet_label indices of Sophon (jet-universe/sophon 9dd6dd6, the class list of the
jetclass2 schema), assigned as JetClass-II does (jet-universe/jetclass2_generation 3a7a135
delphes_analyzers/FatJetMatching.h), with Delta R < 0.8 to the jet axis as "in the jet":

- X -> 2 prongs: both decay products in the jet; for tau tau one tau must decay hadronically (a hadronic tau is in
  the jet when the tau is, a leptonic one when its electron or muon is); the label names the products (X_bc, ...).
- X -> Y Y: not both Y leptonic; a Y -> tau tau needs a hadronic tau and both taus in the jet; at least three of
  the four products in the jet (neutrinos never count); the label names the products in the jet plus the
  neutrinos (X_YY_bbq, X_YY_cqev, ...).
- QCD jets: by the b, c, s quarks among the partons entering hadronisation (status 71) with pT > 10 GeV in the
  jet, each flavour counted up to two (QCD_bbc, ..., QCD_light).

Resonance jets matching none of these are dropped, as is every jet whose class is not asked for (`--classes`).
`label_resonant` is 1 for a resonance jet, 0 for QCD (on a set of X_bs and QCD jets: the X -> bs tagging label).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib import resources

import numpy as np
import yaml

from hepml_dist.errors import UserError
from hepml_dist.generate import pythia as py
from hepml_dist.generate.base import Process, RunContext, Schema, UnitSeeds, concat_shuffled, empty_columns
from hepml_dist.generate.detector import CMS, reconstruct_candidates
from hepml_dist.generate.jets import cluster, constituent_columns, delta_r, jet_schema, substructure

MAX_CONSTITUENTS = 128
JET_RADIUS = 0.8
JET_PT_RANGE = (200.0, 2500.0)
JET_MAX_ABS_ETA = 2.5
QCD_PARTON_MIN_PT = 10.0
DEFAULT_MASS_RANGE = (15.0, 250.0)
MASS_LIMITS = (10.0, 1000.0)  # below: no X -> bb; above: no X decay fits in R = 0.8 at pT < 2500 GeV
Y_MIN_MASS = 5.0
RES34P_MIN_X_MASS = 25.0
EXTRA_CLASSES = ["X_bs"]  # generated on request, outside Sophon's 188 classes
DEFAULT_CLASSES = "Res2P,Res34P,QCD"


@cache
def sophon_classes() -> tuple[list[str], dict[str, range]]:
    """Sophon's 188 class names in jet_label order and the index range of each part, from the jetclass2 schema."""
    text = (resources.files("hepml_dist.data.schemas") / "jetclass2.yaml").read_text()
    meta = yaml.safe_load(text)["meta"]
    parts = {name: range(first, last + 1) for name, (first, last) in meta["parts"].items()}
    return list(meta["classes"]), parts


CLASSES = [*sophon_classes()[0], *EXTRA_CLASSES]
PARTS = sophon_classes()[1]
QCD_FIRST = PARTS["QCD"].start

# ---- label keys: a class is the multiset of its decay products in the jet ---------------------------------------

_TOKEN = re.compile(r"tau[hem]|[bcsqgemv]")
_TOKEN_OF_PDG = {1: "q", 2: "q", 3: "s", 4: "c", 5: "b", 21: "g", 11: "e", 13: "m", 12: "v", 14: "v", 16: "v"}
_QUARK_OR_GLUON = {"b", "c", "s", "q", "g"}


def tokens_of(text: str) -> tuple[str, ...]:
    """`bbtauhtaue` -> (b, b, tauh, taue): the decay products a class name lists, sorted."""
    found = _TOKEN.findall(text)
    if "".join(found) != text:
        raise ValueError(f"cannot split {text!r} into decay products")
    return tuple(sorted(found))


@cache
def label_keys() -> dict[tuple[str, tuple[str, ...]], int]:
    """(kind, sorted products) -> class index, kind X (2 prongs), X_YY (via Y Y) or QCD (b, c, s quarks)."""
    keys: dict[tuple[str, tuple[str, ...]], int] = {}
    for index, name in enumerate(CLASSES):
        kind, _, products = name.rpartition("_")
        key = (kind, () if name == "QCD_light" else tokens_of(products))
        if key in keys:
            raise AssertionError(f"classes {CLASSES[keys[key]]} and {name} have the same decay products")
        keys[key] = index
    return keys


# ---- options ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Options:
    """`--classes` and `--mass-range`, parsed."""

    classes: tuple[int, ...]
    """Indices of the classes kept."""
    mass_range: tuple[float, float]
    """Mass range of the resonance X (GeV)."""


def parse_classes(text: str) -> tuple[int, ...]:
    """Class names and part names (Res2P, Res34P, QCD) -> sorted class indices; a UserError names unknown ones."""
    wanted: set[int] = set()
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS and n not in CLASSES]
    if unknown or not names:
        raise UserError(f"--classes {text!r}: unknown class name(s) {', '.join(unknown) or '(none given)'}; use names "
                        f"of the jetclass2 schema (e.g. X_bb, X_YY_bbqq, QCD_light), the parts {', '.join(PARTS)}, "
                        f"or {', '.join(EXTRA_CLASSES)}")
    for name in names:
        wanted.update(PARTS[name] if name in PARTS else [CLASSES.index(name)])
    return tuple(sorted(wanted))


def parse_mass_range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(","))
    except ValueError:
        raise UserError(f"--mass-range {text!r}: give lo,hi in GeV, e.g. 15,250") from None
    if not lo < hi:
        raise UserError(f"--mass-range {text!r}: the range is empty (lo {lo:g} >= hi {hi:g}); give lo < hi")
    if lo < MASS_LIMITS[0] or hi > MASS_LIMITS[1]:
        raise UserError(f"--mass-range {text!r}: keep it within {MASS_LIMITS[0]:g}-{MASS_LIMITS[1]:g} GeV "
                        "(X -> bb needs 10 GeV; heavier decays do not fit in one R = 0.8 jet below 2.5 TeV)")
    return lo, hi


def configure(options: Mapping[str, str]) -> Options:
    return Options(parse_classes(options.get("classes", DEFAULT_CLASSES)),
                   parse_mass_range(options.get("mass_range", ",".join(f"{m:g}" for m in DEFAULT_MASS_RANGE))))


# ---- Pythia samples -----------------------------------------------------------------------------------------------

Channel = tuple[float, tuple[int, int], tuple[str, ...]]  # branching ratio, products, the classes it can give

NEUTRAL_DECAYS: tuple[Channel, ...] = (
    (0.125, (5, -5), ("X_bb",)), (0.125, (4, -4), ("X_cc",)), (0.125, (3, -3), ("X_ss",)),
    (0.0625, (2, -2), ("X_qq",)), (0.0625, (1, -1), ("X_qq",)), (0.125, (21, 21), ("X_gg",)),
    (0.0625, (11, -11), ("X_ee",)), (0.0625, (13, -13), ("X_mm",)),
    (0.25, (15, -15), ("X_tauhtaue", "X_tauhtaum", "X_tauhtauh")),
)
CHARGED_DECAYS: tuple[Channel, ...] = tuple(
    (1 / 6, products, (name,)) for products, name in
    (((2, -1), "X_qq"), ((2, -3), "X_sq"), ((2, -5), "X_bq"), ((4, -1), "X_cq"), ((4, -3), "X_cs"), ((4, -5), "X_bc")))
BS_DECAYS: tuple[Channel, ...] = ((0.5, (5, -3), ("X_bs",)), (0.5, (3, -5), ("X_bs",)))
Y_CHARGED_DECAYS: tuple[Channel, ...] = (
    *((0.625 / 6, products, ()) for _, products, _ in CHARGED_DECAYS),
    (0.0625, (-11, 12), ()), (0.0625, (-13, 14), ()), (0.25, (-15, 16), ()),
)
NEUTRAL_X, CHARGED_X, NEUTRAL_Y, CHARGED_Y = (35, 36), (37,), 25, 37

_COMMON = ["Beams:eCM = 13600", "PartonLevel:MPI = off", "PhaseSpace:pTHatMin = 180", "PhaseSpace:pTHatMax = 2600",
           "PhaseSpace:bias2Selection = on", "PhaseSpace:bias2SelectionPow = 4", "PhaseSpace:bias2SelectionRef = 180"]
_PAIR_NEUTRAL = ("Higgs:useBSM = on", "HiggsBSM:ffbar2A3H2 = on")
_PAIR_CHARGED = ("Higgs:useBSM = on", "HiggsBSM:ffbar2H+H- = on")


def mass_window(pdg: int, lo: float, hi: float) -> list[str]:
    """Masses of `pdg` spread over [lo, hi]: a fixed-width Breit-Wigner three times wider than the range, cut to it
    (Pythia refuses widths much larger than that)."""
    return [f"{pdg}:m0 = {(lo + hi) / 2:g}", f"{pdg}:mWidth = {3 * (hi - lo):g}", f"{pdg}:doForceWidth = on",
            f"{pdg}:mMin = {lo:g}", f"{pdg}:mMax = {hi:g}"]


def decay_table(pdg: int, channels) -> list[str]:
    """Only `channels` (branching ratio, products), isotropic (meMode 100), as JetClass-II's py8.dat files."""
    lines = [f"{pdg}:onMode = off"]
    for i, (ratio, (a, b), _) in enumerate(channels):
        lines.append(f"{pdg}:{'oneChannel' if i == 0 else 'addChannel'} = 1 {ratio:.6f} 100 {a} {b}")
    return lines


def y_pair_settings(lo: float, hi: float) -> list[str]:
    """Res34P: both X -> h h or H+ H- (half each), the Y decaying as JetClass-II's (train_higgs4p/py8.dat)."""
    x_lo, y_hi = max(lo, RES34P_MIN_X_MASS), max(hi / 2, Y_MIN_MASS + 1)
    lines = []
    for x in NEUTRAL_X:
        lines += [*mass_window(x, x_lo, hi), *decay_table(x, ((0.5, (NEUTRAL_Y, NEUTRAL_Y), ()),
                                                              (0.5, (CHARGED_Y, -CHARGED_Y), ())))]
    return [*lines, *mass_window(NEUTRAL_Y, Y_MIN_MASS, y_hi), *decay_table(NEUTRAL_Y, NEUTRAL_DECAYS),
            *mass_window(CHARGED_Y, Y_MIN_MASS, y_hi), *decay_table(CHARGED_Y, Y_CHARGED_DECAYS)]


@dataclass(frozen=True)
class Sample:
    """One Pythia configuration and the classes its jets can have."""

    name: str
    share: float
    """Share of the events (among the samples that run), chosen so Res2P, Res34P and QCD jets come out similar."""
    process: tuple[str, ...]
    """Pythia's process switches."""
    resonances: tuple[int, ...] = ()
    """PDG ids of the X whose decays label the jets; () for QCD."""
    decays: tuple[Channel, ...] = ()
    """X -> 2 prongs: the decay channels (only those giving a wanted class are switched on)."""
    part: str | None = None
    """The part whose classes the sample gives when `decays` does not say (Res34P, QCD)."""

    def classes(self) -> set[int]:
        if self.part is not None:
            return set(PARTS[self.part])
        return {CLASSES.index(c) for _, _, names in self.decays for c in names}

    def settings(self, options: Options) -> list[str]:
        lo, hi = options.mass_range
        lines = [*_COMMON, *self.process]
        if self.part == "Res34P":
            return [*lines, *y_pair_settings(lo, hi)]
        wanted = {CLASSES[i] for i in options.classes}
        channels = [c for c in self.decays if wanted & set(c[2])]
        for x in self.resonances:
            lines += [*mass_window(x, lo, hi), *decay_table(x, channels)]
        return lines


SAMPLES = (
    Sample("Res2P-neutral", 0.22, _PAIR_NEUTRAL, NEUTRAL_X, NEUTRAL_DECAYS),
    Sample("Res2P-charged", 0.10, _PAIR_CHARGED, CHARGED_X, CHARGED_DECAYS),
    Sample("Res34P", 0.43, _PAIR_NEUTRAL, NEUTRAL_X, part="Res34P"),
    Sample("QCD", 0.25, ("HardQCD:all = on",), part="QCD"),
    Sample("X_bs", 0.22, _PAIR_NEUTRAL, NEUTRAL_X, BS_DECAYS),
)


def active_samples(options: Options) -> list[Sample]:
    """The samples that can give a wanted class."""
    wanted = set(options.classes)
    return [s for s in SAMPLES if s.classes() & wanted]


def event_counts(samples: list[Sample], n_events: int) -> dict[str, int]:
    """Events per sample in a unit of `n_events` (deterministic; the remainder goes to the first samples)."""
    total = sum(s.share for s in samples)
    counts = {s.name: int(n_events * s.share / total) for s in samples}
    for name in list(counts)[: n_events - sum(counts.values())]:
        counts[name] += 1
    return counts


# ---- truth labels -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Product:
    """A decay product of X or Y as the labelling sees it: its token and the direction that must be in the jet."""

    token: str
    eta: float | None  # None: a neutrino, never in the jet
    phi: float | None

    def inside(self, eta: float, phi: float) -> bool:
        return self.eta is not None and float(delta_r(self.eta, self.phi, eta, phi)) < JET_RADIUS


def _direction(record: py.Record, index: int) -> tuple[float, float]:
    px, py_, pz = float(record.px[index]), float(record.py[index]), float(record.pz[index])
    return float(np.arcsinh(pz / max(np.hypot(px, py_), 1e-9))), float(np.arctan2(py_, px))


def product(record: py.Record, index: int) -> Product:
    """Token of a decay product: a quark flavour (q = u, d), g, e, m, v, or tauh / taue / taum by the tau's decay; a
    leptonic tau is in the jet when its electron or muon is, a hadronic one when the tau is."""
    pdg = abs(int(record.pid[index]))
    if pdg in py.NEUTRINOS:
        return Product("v", None, None)
    if pdg != 15:
        return Product(_TOKEN_OF_PDG[pdg], *_direction(record, index))
    tau = record.last_copy(index)
    for daughter in record.daughters(tau):
        lepton = abs(int(record.pid[daughter]))
        if lepton in (11, 13):
            return Product("taue" if lepton == 11 else "taum", *_direction(record, int(daughter)))
    return Product("tauh", *_direction(record, tau))


def _is_tau(p: Product) -> bool:
    return p.token.startswith("tau")


def two_prong_key(products: list[Product], eta: float, phi: float) -> tuple[str, tuple[str, ...]] | None:
    if any(map(_is_tau, products)) and not any(p.token == "tauh" for p in products):
        return None
    if not all(p.inside(eta, phi) for p in products):
        return None
    return "X", tuple(sorted(p.token for p in products))


def y_pair_key(ys: list[list[Product]], eta: float, phi: float) -> tuple[str, tuple[str, ...]] | None:
    if not any(p.token in _QUARK_OR_GLUON for y in ys for p in y):
        return None  # both Y leptonic
    tokens, inside = [], 0
    for y in ys:
        if all(map(_is_tau, y)) and (not any(p.token == "tauh" for p in y) or not all(p.inside(eta, phi) for p in y)):
            return None  # Y -> tau tau needs a hadronic tau and both taus in the jet
        for p in y:
            if p.token == "v":
                tokens.append("v")
            elif p.inside(eta, phi):
                tokens.append(p.token)
                inside += 1
    return ("X_YY", tuple(sorted(tokens))) if inside >= 3 else None


@dataclass(frozen=True)
class Decay:
    """One X of an event: its decay products, or the products of its two Y."""

    event: int
    products: list[Product]
    ys: list[list[Product]] | None

    def label(self, eta: float, phi: float) -> int:
        key = y_pair_key(self.ys, eta, phi) if self.ys is not None else two_prong_key(self.products, eta, phi)
        return label_keys().get(key, -1) if key is not None else -1


def resonance_decays(record: py.Record, pdgs: tuple[int, ...]) -> list[Decay]:
    """Each hard-process X (first copy with status 22) followed to its decay, in event-record order."""
    decays = []
    for first in np.flatnonzero(np.isin(np.abs(record.pid), pdgs) & (np.abs(record.status) == 22)):
        mother = record.mother1[first]
        if mother >= 0 and record.pid[mother] == record.pid[first]:
            continue  # a copy
        daughters = [int(d) for d in record.daughters(record.last_copy(int(first)))]
        if len(daughters) != 2:
            continue
        if all(abs(int(record.pid[d])) in (NEUTRAL_Y, CHARGED_Y) for d in daughters):
            ys = [[product(record, int(p)) for p in record.daughters(record.last_copy(d))] for d in daughters]
            decays.append(Decay(int(record.event[first]), [], ys))
        else:
            decays.append(Decay(int(record.event[first]), [product(record, d) for d in daughters], None))
    return decays


def resonance_labels(record: py.Record, jet_event: np.ndarray, jet_eta: np.ndarray, jet_phi: np.ndarray,
                     pdgs: tuple[int, ...]) -> np.ndarray:
    """Class index per jet from the first X of its event that labels it; -1 where none does."""
    labels = np.full(len(jet_event), -1, dtype=np.int64)
    for decay in resonance_decays(record, pdgs):
        for j in np.flatnonzero((jet_event == decay.event) & (labels < 0)):
            labels[j] = decay.label(float(jet_eta[j]), float(jet_phi[j]))
    return labels


def qcd_labels(record: py.Record, jet_event: np.ndarray, jet_eta: np.ndarray, jet_phi: np.ndarray) -> np.ndarray:
    """QCD class per jet from the b, c, s quarks entering hadronisation (status 71, pT > 10 GeV) inside it."""
    pdg = np.abs(record.pid)
    quarks = np.flatnonzero((np.abs(record.status) == 71) & np.isin(pdg, (3, 4, 5)) & (record.pt > QCD_PARTON_MIN_PT))
    q_eta = np.arcsinh(record.pz[quarks] / np.maximum(record.pt[quarks], 1e-9))
    q_phi = np.arctan2(record.py[quarks], record.px[quarks])
    same_event = record.event[quarks][None, :] == jet_event[:, None]
    inside = same_event & (delta_r(q_eta[None, :], q_phi[None, :], jet_eta[:, None], jet_phi[:, None]) < JET_RADIUS)
    keys = label_keys()
    labels = np.empty(len(jet_event), dtype=np.int64)
    for j in range(len(jet_event)):
        flavours = pdg[quarks[inside[j]]]
        tokens = "".join(t * min(int(np.sum(flavours == f)), 2) for f, t in ((5, "b"), (4, "c"), (3, "s")))
        labels[j] = keys[("QCD", tuple(sorted(tokens)))]
    return labels


# ---- the generator ------------------------------------------------------------------------------------------------

SCHEMA: Schema = {
    **jet_schema(MAX_CONSTITUENTS),
    "jet_sdmass": ("float32", ()),
    "jet_nparticles": ("int32", ()),
    **{f"jet_tau{n}": ("float32", ()) for n in range(1, 5)},
    "label_jet_class": ("int64", ()),
    "label_resonant": ("int64", ()),
}


def jet_columns(jets, candidates, labels: np.ndarray) -> dict[str, np.ndarray]:
    """The stored columns of the selected jets."""
    columns = constituent_columns(jets, candidates, MAX_CONSTITUENTS)
    sdmass, taus = substructure(jets, candidates.px, candidates.py, candidates.pz, candidates.e, JET_RADIUS)
    columns["jet_sdmass"] = sdmass.astype(np.float32)
    columns["jet_nparticles"] = jets.n_constituents.astype(np.int32)
    for n in range(4):
        columns[f"jet_tau{n + 1}"] = taus[:, n].astype(np.float32)
    columns["label_jet_class"] = labels
    columns["label_resonant"] = ((labels < QCD_FIRST) | (labels > PARTS["QCD"][-1])).astype(np.int64)
    return columns


class JetClass2LiteGenerator:
    def __init__(self, context: RunContext):
        self.options: Options = context.options
        self.samples = active_samples(self.options)
        self.pythia = {s.name: py.make_pythia([*s.settings(self.options), *context.settings], context.init_seed + i)
                       for i, s in enumerate(self.samples)}
        self.wanted = np.array(self.options.classes, dtype=np.int64)

    def run(self, n_events: int, seeds: UnitSeeds) -> dict[str, np.ndarray]:
        rng = seeds.numpy()
        parts = []
        for instance, sample in enumerate(self.samples):
            n = event_counts(self.samples, n_events)[sample.name]
            if n == 0:
                continue
            pythia = self.pythia[sample.name]
            py.reseed(pythia, seeds.pythia(instance))
            parts.append(self._jets(sample, py.generate(pythia, n), rng))
        return concat_shuffled(parts, rng) if parts else empty_columns(SCHEMA)

    def _jets(self, sample: Sample, record: py.Record, rng: np.random.Generator) -> dict[str, np.ndarray]:
        candidates = reconstruct_candidates(record, CMS, rng)
        jets = cluster(candidates.event, candidates.px, candidates.py, candidates.pz, candidates.e,
                       record.n_events, "antikt", JET_RADIUS, min_pt=JET_PT_RANGE[0])
        jets = jets.take((np.abs(jets.eta) < JET_MAX_ABS_ETA) & (jets.pt < JET_PT_RANGE[1]))
        if sample.resonances:
            labels = resonance_labels(record, jets.event, jets.eta, jets.phi, sample.resonances)
        else:
            labels = qcd_labels(record, jets.event, jets.eta, jets.phi)
        keep = np.isin(labels, self.wanted)
        return jet_columns(jets.take(keep), candidates, labels[keep])


PROCESS = Process(
    name="jetclass2-lite",
    summary="13.6 TeV JetClass-II-like jets: X -> 2 prongs, X -> YY -> 3/4 prongs (X of 15-250 GeV) and QCD, "
            "Sophon's labels, soft-drop mass, anti-kT 0.8, 200 < pT < 2500 GeV, CMS-like response",
    schema=SCHEMA,
    unit_events=200,
    make=JetClass2LiteGenerator,
    classes={"label_jet_class": CLASSES, "label_resonant": ["QCD", "resonance"]},
    chunk_size=512,
    options=("classes", "mass_range"),
    configure=configure,
)
