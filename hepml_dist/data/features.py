"""Feature builders: stored raw columns of a batch -> the model inputs of docs/architecture.md ("The batch").

One builder per name in `hepml_dist.spec.data.FEATURE_SETS`, all vectorised numpy over the whole batch (no
per-jet Python). The loader calls `build_batch(raw, inputs)` in its worker processes, so the cost runs in
parallel with training. Pair features (ln kT, ln z, ln Delta, ln m^2) are not built here: the model computes
them on the device from `vectors`.

Every builder returns `features` float32 [B, C, P] and `mask` float32 [B, 1, P] (1 = real, 0 = padding); the
ParT-like ones add `vectors` float32 [B, 4, P] = (px, py, pz, E). Padding slots are 0 in every output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from hepml_dist.errors import UserError

# Columns passed through to the batch unchanged (besides dtype): truth, weights, and observers for evaluation.
PASS_THROUGH_PREFIXES = ("label_", "target_", "weight", "jet_", "gen_", "genjet_", "event_")

_TINY = np.float32(1e-8)


@dataclass(frozen=True)
class FeatureBuilder:
    """How one named feature set is made: which stored columns it reads and the function that builds it."""

    name: str
    channels: int
    count: str  # the column with the number of real constituents / elements / objects / tokens
    padded: tuple[str, ...]  # stored columns with the constituent axis; cut or zero-padded to the batch length
    scalars: tuple[str, ...]  # per-example stored columns it reads
    build: Callable[[Mapping[str, np.ndarray], np.ndarray], dict[str, np.ndarray]]
    per_element: tuple[str, ...] = ()  # prefixes of pass-through columns that also carry the constituent axis
    extra: Callable[[Mapping[str, np.ndarray], Sequence[str]], dict[str, np.ndarray]] | None = None
    doc: str = ""

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.count, *self.padded, *self.scalars)


@dataclass
class _Physics:
    """Per-constituent kinematics shared by the ParT-style builders (computed once per batch)."""

    px: np.ndarray
    py: np.ndarray
    pz: np.ndarray
    energy: np.ndarray
    pt: np.ndarray = field(init=False)
    eta: np.ndarray = field(init=False)
    phi: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.pt = np.hypot(self.px, self.py)
        self.eta = np.arcsinh(self.pz / np.maximum(self.pt, _TINY))
        self.phi = np.arctan2(self.py, self.px)


def wrap_phi(x: np.ndarray) -> np.ndarray:
    """Angle difference wrapped to [-pi, pi)."""
    return (x + np.float32(np.pi)) % np.float32(2 * np.pi) - np.float32(np.pi)


def _log(x: np.ndarray, floor: float = 1e-8) -> np.ndarray:
    return np.log(np.maximum(x, np.float32(floor)))


def _standardise(x: np.ndarray, center: float, scale: float, lo: float = -5.0, hi: float = 5.0) -> np.ndarray:
    """weaver's manual preprocessing: clip((x - center) * scale, lo, hi)."""
    return np.clip((x - np.float32(center)) * np.float32(scale), np.float32(lo), np.float32(hi))


def _pid_flags(pid: np.ndarray, charge: np.ndarray) -> list[np.ndarray]:
    """(isChargedHadron, isNeutralHadron, isPhoton, isElectron, isMuon) from PDG id and charge.

    Works for reduced ids (211, 130, 22, 11, 13) and full ones: any charged non-lepton is a charged hadron,
    any neutral non-photon a neutral hadron.
    """
    apid = np.abs(pid)
    electron = apid == 11
    muon = apid == 13
    photon = apid == 22
    lepton = electron | muon
    charged_hadron = (charge != 0) & ~lepton
    neutral_hadron = (charge == 0) & ~lepton & ~photon & (apid != 0)
    return [charged_hadron, neutral_hadron, photon, electron, muon]


def _stack(channels: Sequence[np.ndarray], mask: np.ndarray) -> np.ndarray:
    """[B, C, P] float32 with padding (and any NaN/inf from degenerate inputs) set to 0."""
    out = np.stack([np.asarray(c, dtype=np.float32) for c in channels], axis=1)
    out *= mask[:, None, :]
    np.nan_to_num(out, copy=False, nan=0.0, posinf=0.0, neginf=0.0)
    return out


def _vectors(px, py, pz, energy, mask: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    out = np.stack([px, py, pz, energy], axis=1).astype(np.float32, copy=False)
    if scale is not None:
        out = out * scale[:, None, None]
    return out * mask[:, None, :]


# ----------------------------------------------------------------------------------------------------------------------
# ParT / Sophon (JetClass, JetClass-II), shared_reference/part_sophon_weaver.md section 1.2 and 3.2

_PART_PADDED = ("part_px", "part_py", "part_pz", "part_energy", "part_charge", "part_pid",
                "part_d0val", "part_d0err", "part_dzval", "part_dzerr")
_PART_KIN_PADDED = ("part_px", "part_py", "part_pz", "part_energy")
_JET = ("jet_pt", "jet_eta", "jet_phi", "jet_energy")
SOPHON_PT = 500.0  # Sophon normalises every jet to this pT (GeV)


def _part_channels(raw: Mapping[str, np.ndarray], mask: np.ndarray, level: str, pt_scale: np.ndarray | None):
    """The 17 ParT "full" rows in stored order; `level` picks kin (7), kinpid (13) or full (17)."""
    p = _Physics(raw["part_px"], raw["part_py"], raw["part_pz"], raw["part_energy"])
    jet_pt = raw["jet_pt"][:, None]
    jet_eta = raw["jet_eta"][:, None]
    jet_energy = raw["jet_energy"][:, None]
    # JetClass flips delta-eta with the sign of the jet eta (so forward and backward jets look alike)
    deta = (p.eta - jet_eta) * np.where(jet_eta < 0, np.float32(-1), np.float32(1))
    dphi = wrap_phi(p.phi - raw["jet_phi"][:, None])
    pt, energy = (p.pt, p.energy) if pt_scale is None else (p.pt * pt_scale[:, None], p.energy * pt_scale[:, None])
    kin_head = [
        _standardise(_log(pt), 1.7, 0.7),
        _standardise(_log(energy), 2.0, 0.7),
        _standardise(_log(p.pt / np.maximum(jet_pt, _TINY)), -4.7, 0.7),
        _standardise(_log(p.energy / np.maximum(jet_energy, _TINY)), -4.7, 0.7),
        _standardise(np.hypot(deta, dphi), 0.2, 4.0),
    ]
    angles = [deta, dphi]
    if level == "kin":
        return _stack(kin_head + angles, mask), p
    charge = raw["part_charge"]
    pid = [charge, *_pid_flags(raw["part_pid"], charge)]
    if level == "kinpid":
        return _stack(kin_head + pid + angles, mask), p
    trajectory = [
        np.tanh(raw["part_d0val"]),
        np.clip(raw["part_d0err"], 0.0, 1.0),
        np.tanh(raw["part_dzval"]),
        np.clip(raw["part_dzerr"], 0.0, 1.0),
    ]
    return _stack(kin_head + pid + trajectory + angles, mask), p


def _part_builder(level: str) -> Callable:
    def build(raw, mask):
        features, p = _part_channels(raw, mask, level, None)
        return {"features": features, "vectors": _vectors(p.px, p.py, p.pz, p.energy, mask)}

    return build


def _sophon(raw, mask):
    scale = (np.float32(SOPHON_PT) / np.maximum(raw["jet_pt"], _TINY)).astype(np.float32)
    features, p = _part_channels(raw, mask, "full", scale)
    return {"features": features, "vectors": _vectors(p.px, p.py, p.pz, p.energy, mask, scale)}


# ----------------------------------------------------------------------------------------------------------------------
# MultiParTau / SingleParTau: the 17 FCC-ee tau candidate features (shared_reference/omnijet_tau.md section 2.5)

_TAU_PADDED = ("part_px", "part_py", "part_pz", "part_energy", "part_charge", "part_pid",
               "part_d0val", "part_d0err", "part_dzval", "part_dzerr")


def _tau_cand(raw, mask):
    p = _Physics(raw["part_px"], raw["part_py"], raw["part_pz"], raw["part_energy"])
    abs_deta = np.abs(p.eta - raw["jet_eta"][:, None])
    abs_dphi = np.abs(wrap_phi(p.phi - raw["jet_phi"][:, None]))
    charge = raw["part_charge"]
    charged_hadron, neutral_hadron, photon, electron, muon = _pid_flags(raw["part_pid"], charge)
    channels = [
        abs_deta,
        abs_dphi,
        _log(p.pt, 1e-6),
        _log(p.energy, 1e-6),
        _log(p.pt / np.maximum(raw["jet_pt"][:, None], _TINY), 1e-6),
        _log(p.energy / np.maximum(raw["jet_energy"][:, None], _TINY), 1e-6),
        np.hypot(abs_deta, abs_dphi),
        charge,
        electron, muon, photon, charged_hadron, neutral_hadron,
        raw["part_dzval"], raw["part_dzerr"], raw["part_d0val"], raw["part_d0err"],
    ]
    return {"features": _stack(channels, mask), "vectors": _vectors(p.px, p.py, p.pz, p.energy, mask)}


# ----------------------------------------------------------------------------------------------------------------------
# OmniJet-alpha (shared_reference/omnijet_tau.md section 1.1)

OMNIJET_MAX_DELTA = 0.8  # constituents with |Delta eta| or |Delta phi| >= 0.8 are dropped before tokenizing


def _compact(keep: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Move kept entries of each row to the front (stable), padding the rest; vectorised with a stable sort."""
    order = np.argsort(~keep, axis=1, kind="stable")
    return np.take_along_axis(keep, order, axis=1), [np.take_along_axis(a, order, axis=1) for a in arrays]


def _omnijet_constituents(raw, mask):
    p = _Physics(raw["part_px"], raw["part_py"], raw["part_pz"], raw["part_energy"])
    # OmniJet takes the jet axis from the sum of the constituents' 4-vectors
    jx, jy, jz = ((c * mask).sum(axis=1) for c in (p.px, p.py, p.pz))
    jet_eta = np.arcsinh(jz / np.maximum(np.hypot(jx, jy), _TINY))[:, None]
    jet_phi = np.arctan2(jy, jx)[:, None]
    deta = p.eta - jet_eta
    dphi = wrap_phi(p.phi - jet_phi)
    keep = mask & (np.abs(deta) < OMNIJET_MAX_DELTA) & (np.abs(dphi) < OMNIJET_MAX_DELTA)
    keep, (pt, deta, dphi) = _compact(keep, p.pt, deta, dphi)
    features = _stack([_log(pt) - np.float32(1.8), 3 * deta, 3 * dphi], keep)
    return {"features": features, "mask": keep}


def _omnijet_tokens(raw, mask):
    tokens = raw["tokens"].astype(np.int64) * mask
    return {"tokens": tokens, "features": tokens[:, None, :].astype(np.float32)}


# ----------------------------------------------------------------------------------------------------------------------
# MLPF (shared_reference/mlpf_pipeline.md section 1.1-1.2) and AOT


def _mlpf_elements(raw, mask):
    elements = raw["elem_features"].astype(np.float32, copy=False)
    features = np.ascontiguousarray(elements.transpose(0, 2, 1)) * mask[:, None, :]
    out = {"features": features}
    # the loss sees pT and E as log ratios to the element's own pT/E (particleflow PR #342); 0 where no target
    if "target_pt" in raw and "target_energy" in raw:
        with np.errstate(divide="ignore", invalid="ignore"):
            for name, target, column in (("log_pt_ratio", "target_pt", 1), ("log_energy_ratio", "target_energy", 5)):
                ratio = np.log(raw[target] / elements[:, :, column])
                ratio[~np.isfinite(ratio) | (raw[target] <= 0) | ~mask] = 0.0
                out[f"target_{name}"] = ratio.astype(np.float32)
    return out


def _aot_objects(raw, mask):
    objects = raw["obj_features"].astype(np.float32, copy=False)
    return {"features": np.ascontiguousarray(objects.transpose(0, 2, 1)) * mask[:, None, :]}


def _event_features(raw: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    missing = [n for n in names if f"event_{n}" not in raw]
    if missing:
        raise UserError(f"data.inputs.event_features: no stored column(s) {['event_' + n for n in missing]}; "
                        "the dataset has only the event_* columns listed by `hepml data inspect`")
    return {"event_features": np.stack([raw[f"event_{n}"] for n in names], axis=1).astype(np.float32)}


FEATURE_BUILDERS: dict[str, FeatureBuilder] = {
    b.name: b
    for b in (
        FeatureBuilder("part_full", 17, "part_n", _PART_PADDED, _JET, _part_builder("full"),
                       doc="ParT JetClass full: 5 standardised kinematic, 6 particle-ID, 4 trajectory, deta, dphi"),
        FeatureBuilder("part_kinpid", 13, "part_n", _PART_PADDED[:6], _JET, _part_builder("kinpid"),
                       doc="ParT kinpid: kinematics and particle ID"),
        FeatureBuilder("part_kin", 7, "part_n", _PART_KIN_PADDED, _JET, _part_builder("kin"),
                       doc="ParT kin: kinematics only"),
        FeatureBuilder("sophon_full", 17, "part_n", _PART_PADDED, _JET, _sophon,
                       doc="Sophon: part_full with pT and E of each jet scaled to pT = 500 GeV (vectors too)"),
        FeatureBuilder("tau_cand", 17, "part_n", _TAU_PADDED, _JET, _tau_cand,
                       doc="MultiParTau's 17 tau-candidate features (unstandardised, logs floored at 1e-6)"),
        FeatureBuilder("omnijet_tokens", 1, "tokens_n", ("tokens",), (), _omnijet_tokens,
                       doc="OmniJet token ids (start 0, code c -> c+1, stop K+1); `tokens` int64 plus as features"),
        FeatureBuilder("omnijet_constituents", 3, "part_n", _PART_KIN_PADDED, (), _omnijet_constituents,
                       doc="OmniJet tokenizer input: log pT - 1.8, 3 deta, 3 dphi; |deta|,|dphi| >= 0.8 dropped"),
        FeatureBuilder("mlpf_elements", 17, "elem_n", ("elem_features",), (), _mlpf_elements,
                       per_element=("label_", "target_"),
                       doc="MLPF CLIC tracks and clusters (17 raw features, column 0 = element type)"),
        FeatureBuilder("aot_objects", 6, "obj_n", ("obj_features",), (), _aot_objects, extra=_event_features,
                       doc="AOT objects (E, pT, eta, phi, mass, b-tag) plus the event features"),
    )
}


def get_builder(name: str) -> FeatureBuilder:
    try:
        return FEATURE_BUILDERS[name]
    except KeyError:
        raise UserError(f"data.inputs.features: unknown feature set {name!r}; "
                        f"choose one of {sorted(FEATURE_BUILDERS)}") from None


# ----------------------------------------------------------------------------------------------------------------------
# Batch assembly


def is_pass_through(name: str) -> bool:
    return name.startswith(PASS_THROUGH_PREFIXES)


def batch_length(counts: np.ndarray, max_length: int, pad_to_multiple: int | None) -> int:
    """P of a batch: max_length, or the longest example rounded up to `pad_to_multiple` (capped at max_length)."""
    if pad_to_multiple is None:
        return max_length
    longest = int(counts.max(initial=1))
    return int(min(max_length, -(-max(longest, 1) // pad_to_multiple) * pad_to_multiple))


def _fit(array: np.ndarray, length: int) -> np.ndarray:
    """Cut or zero-pad axis 1 to `length`."""
    have = array.shape[1]
    if have >= length:
        return array[:, :length]
    widths = [(0, 0), (0, length - have)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, widths)


def build_batch(
    raw: Mapping[str, np.ndarray],
    builder: FeatureBuilder,
    *,
    max_length: int,
    pad_to_multiple: int | None = None,
    event_features: Sequence[str] = (),
) -> dict[str, np.ndarray]:
    """Model inputs plus pass-through columns for one batch of stored columns (numpy in, numpy out)."""
    counts = np.minimum(raw[builder.count], max_length)
    length = batch_length(counts, max_length, pad_to_multiple)
    mask = np.arange(length)[None, :] < counts[:, None]
    cut = dict(raw)
    for name in builder.padded:
        cut[name] = _fit(raw[name], length)
    per_element = []
    if builder.per_element:
        per_element = [n for n in raw if n.startswith(builder.per_element) and raw[n].ndim >= 2]
        for name in per_element:
            cut[name] = _fit(raw[name], length)
    out = builder.build(cut, mask)
    out.setdefault("mask", mask)
    out["mask"] = out["mask"].astype(np.float32)[:, None, :]
    if builder.extra is not None:
        out.update(builder.extra(raw, event_features))
    for name, values in cut.items():
        if not is_pass_through(name) or name in out:
            continue
        if name.startswith("label_"):
            out[name] = values.astype(np.int64, copy=False)
        else:
            out[name] = values.astype(np.float32, copy=False)
    return out


def to_torch(batch: Mapping[str, np.ndarray]) -> dict:
    """numpy batch -> dict of CPU tensors (no copy where the array is contiguous)."""
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def stored_columns(builder: FeatureBuilder, available: Sequence[str], extra: Sequence[str] = ()) -> list[str]:
    """The stored columns a loader must read for this builder: its inputs, pass-throughs, and `extra`."""
    missing = [c for c in builder.columns if c not in available]
    if missing:
        raise UserError(f"data.inputs.features = {builder.name} needs stored column(s) {missing}, which the "
                        f"dataset lacks (it has {sorted(available)}); pick a feature set that fits the dataset")
    wanted = list(builder.columns)
    wanted += [c for c in available if is_pass_through(c) and c not in wanted]
    wanted += [c for c in extra if c in available and c not in wanted]
    return wanted
