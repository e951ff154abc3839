"""Feature builders: stored raw columns of a batch -> the model inputs of docs/architecture.md ("The batch").

One builder per name in `hepml_dist.spec.data.FEATURE_SETS` (which declares its channel count), all vectorised numpy over the whole batch (no
per-jet Python). The loader calls `build_batch(raw, inputs)` in its worker processes, so the cost runs in
parallel with training. Pair features (ln kT, ln z, ln Delta, ln m^2) are not built here: the model computes
them on the device from `vectors`.

Every builder returns `features` float32 [B, C, P] and `mask` float32 [B, 1, P] (1 = real, 0 = padding); the
ParT-like ones add `vectors` float32 [B, 4, P] = (px, py, pz, E). Padding slots are 0 in every output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hepml_dist.errors import UserError
from hepml_dist.spec.data import FEATURE_SETS

# Columns passed through to the batch unchanged (besides dtype): truth, weights, and observers for evaluation.
PASS_THROUGH_PREFIXES = ("label_", "target_", "weight", "jet_", "gen_", "genjet_", "event_")

_TINY = np.float32(1e-8)


@dataclass(frozen=True)
class FeatureBuilder:
    """How one named feature set is made: which stored columns it reads and the function that fills it.

    `build(raw, mask, out)` writes the batch's big float32 outputs in place: `out["features"]` [B, C, P],
    `out["vectors"]` [B, 4, P] when `vectors`, `out["mask"]` [B, 1, P] (pre-filled from the counts; a builder
    that drops constituents rewrites it), and one [B, P] array per name in `derived`. It may return further
    outputs (small ones, e.g. token ids) in a dict.
    """

    name: str
    count: str  # the column with the number of real constituents / elements / objects / tokens
    padded: tuple[str, ...]  # stored columns with the constituent axis; cut or zero-padded to the batch length
    scalars: tuple[str, ...]  # per-example stored columns it reads
    build: Callable[[Mapping[str, np.ndarray], np.ndarray, dict[str, np.ndarray]], dict[str, np.ndarray] | None]
    vectors: bool = False
    derived: tuple[str, ...] = ()  # extra float32 [B, P] outputs (e.g. MLPF log-ratio targets)
    per_element: tuple[str, ...] = ()  # prefixes of pass-through columns that also carry the constituent axis
    extra: Callable[[Mapping[str, np.ndarray], Sequence[str]], dict[str, np.ndarray]] | None = None
    doc: str = ""

    @property
    def columns(self) -> tuple[str, ...]:
        return (self.count, *self.padded, *self.scalars)

    @property
    def channels(self) -> int:
        """Channels of `features` (declared with the name in hepml_dist.spec.data.FEATURE_SETS)."""
        return FEATURE_SETS[self.name]


# Elementwise helpers. numpy vectorises log, exp, sqrt, atan2 and arithmetic with SIMD; hypot, arcsinh and float
# modulo are scalar loops 10-100x slower, so they are avoided on the hot path.


def _pt(px: np.ndarray, py: np.ndarray) -> np.ndarray:
    return np.sqrt(px * px + py * py)


def _eta(pt: np.ndarray, pz: np.ndarray) -> np.ndarray:
    """Pseudorapidity asinh(pz / pT) as sign(pz) ln((|pz| + |p|) / pT), without cancellation; 0 where pT = 0."""
    apz = np.abs(pz)
    p = np.sqrt(pt * pt + apz * apz)
    with np.errstate(divide="ignore", invalid="ignore"):
        eta = np.log((apz + p) / pt)
    eta = np.copysign(eta, pz, out=eta)
    eta[pt <= 0] = 0.0
    return eta


def _delta_phi(px: np.ndarray, py: np.ndarray, phi_axis: np.ndarray) -> np.ndarray:
    """phi - phi_axis in (-pi, pi]: atan2 in the frame rotated to the axis (no angle wrapping needed).

    torch's atan2 is vectorised (SLEEF, within 1 ulp); numpy's float32 arctan2 is a scalar loop, 5-10x slower on
    one core, and was the most expensive line of the JetClass features.
    """
    cos_axis = np.cos(phi_axis).astype(np.float32)[:, None]
    sin_axis = np.sin(phi_axis).astype(np.float32)[:, None]
    along = px * cos_axis + py * sin_axis
    across = py * cos_axis
    across -= px * sin_axis
    torch.atan2(torch.from_numpy(across), torch.from_numpy(along), out=torch.from_numpy(along))
    return along


def wrap_phi(x: np.ndarray) -> np.ndarray:
    """Angle difference wrapped to [-pi, pi]."""
    two_pi = np.float32(2 * np.pi)
    return x - two_pi * np.rint(x / two_pi)


def _log(x: np.ndarray, floor: float = 1e-8) -> np.ndarray:
    return np.log(np.maximum(x, np.float32(floor)))


def _standardise_into(out: np.ndarray, x: np.ndarray, center: float, scale: float, lo: float = -5.0,
                      hi: float = 5.0) -> None:
    """weaver's manual preprocessing, in place: out = clip((x - center) * scale, lo, hi)."""
    np.subtract(x, np.float32(center), out=out)
    out *= np.float32(scale)
    np.clip(out, np.float32(lo), np.float32(hi), out=out)


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


def _finish(features: np.ndarray, mask: np.ndarray, channels: Sequence[int] | None = None) -> None:
    """Zero the padding and any NaN/inf from degenerate inputs (rare: checked first, repaired only if needed).

    `channels` limits this to the channels that can be non-zero in padding slots (stored padding is 0, and
    e.g. tanh(0), clip(0) and the particle-ID flags of pid 0 are already 0 there).
    """
    selections = [features] if channels is None else [features[:, c] for c in channels]
    for selected in selections:  # views, repaired in place
        selected *= mask if channels is not None else mask[:, None, :]
        if not np.isfinite(selected).all():
            np.nan_to_num(selected, copy=False, nan=0.0, posinf=0.0, neginf=0.0)


def _fill_vectors(out: np.ndarray, raw: Mapping[str, np.ndarray], mask: np.ndarray,
                  scale: np.ndarray | None = None) -> None:
    for c, name in enumerate(("part_px", "part_py", "part_pz", "part_energy")):
        np.multiply(raw[name], mask, out=out[:, c])
        if scale is not None:
            out[:, c] *= scale[:, None]


# ----------------------------------------------------------------------------------------------------------------------
# ParT / Sophon (JetClass, JetClass-II): jet-universe/particle_transformer 2925bdb data/JetClass/JetClass_full.yaml
# and jet-universe/sophon 9dd6dd6 data/JetClassII/JetClassII_full.yaml

_PART_PADDED = ("part_px", "part_py", "part_pz", "part_energy", "part_charge", "part_pid",
                "part_d0val", "part_d0err", "part_dzval", "part_dzerr")
_PART_KIN_PADDED = ("part_px", "part_py", "part_pz", "part_energy")
_JET = ("jet_pt", "jet_eta", "jet_phi", "jet_energy")
SOPHON_PT = 500.0  # Sophon normalises every jet to this pT (GeV)


def _part_fill(raw: Mapping[str, np.ndarray], mask: np.ndarray, out: dict[str, np.ndarray], level: str,
               pt_scale: np.ndarray | None) -> None:
    """The ParT "full" rows in stored order into out["features"]; `level` = kin (7), kinpid (13) or full (17)."""
    px, py, pz, energy = raw["part_px"], raw["part_py"], raw["part_pz"], raw["part_energy"]
    features = out["features"]
    channel = iter(range(features.shape[1]))

    def slot() -> np.ndarray:
        return features[:, next(channel)]

    pt = _pt(px, py)
    jet_eta = raw["jet_eta"][:, None]
    # JetClass flips delta-eta with the sign of the jet eta (so forward and backward jets look alike)
    deta = (_eta(pt, pz) - jet_eta) * np.where(jet_eta < 0, np.float32(-1), np.float32(1))
    dphi = _delta_phi(px, py, raw["jet_phi"])
    log_pt, log_e = _log(pt), _log(energy)
    shift = None if pt_scale is None else np.log(pt_scale)[:, None]
    _standardise_into(slot(), log_pt if shift is None else log_pt + shift, 1.7, 0.7)
    _standardise_into(slot(), log_e if shift is None else log_e + shift, 2.0, 0.7)
    _standardise_into(slot(), log_pt - _log(raw["jet_pt"])[:, None], -4.7, 0.7)
    _standardise_into(slot(), log_e - _log(raw["jet_energy"])[:, None], -4.7, 0.7)
    _standardise_into(slot(), np.sqrt(deta * deta + dphi * dphi), 0.2, 4.0)
    if level != "kin":
        charge = raw["part_charge"]
        slot()[:] = charge
        for flag in _pid_flags(raw["part_pid"], charge):
            slot()[:] = flag
    if level == "full":
        np.tanh(raw["part_d0val"], out=slot())
        np.clip(raw["part_d0err"], 0.0, 1.0, out=slot())
        np.tanh(raw["part_dzval"], out=slot())
        np.clip(raw["part_dzerr"], 0.0, 1.0, out=slot())
    slot()[:] = deta
    slot()[:] = dphi
    # only the kinematic channels and the angles (atan2(0, -0) = pi) can be non-zero where inputs are padding
    last = features.shape[1]
    _finish(features, mask, [0, 1, 2, 3, 4, last - 2, last - 1])
    _fill_vectors(out["vectors"], raw, mask, pt_scale)


def _part_builder(level: str) -> Callable:
    def build(raw, mask, out):
        _part_fill(raw, mask, out, level, None)

    return build


def _sophon(raw, mask, out):
    scale = (np.float32(SOPHON_PT) / np.maximum(raw["jet_pt"], _TINY)).astype(np.float32)
    _part_fill(raw, mask, out, "full", scale)


# ----------------------------------------------------------------------------------------------------------------------
# MultiParTau / SingleParTau: the 17 FCC-ee tau candidate features (HEP-KBFI/ml-tau-model 1f0c0cd,
# mltau/tools/io/ParT_dataloader.py build_tensors; arXiv:2606.18460)

_TAU_PADDED = ("part_px", "part_py", "part_pz", "part_energy", "part_charge", "part_pid",
               "part_d0val", "part_d0err", "part_dzval", "part_dzerr")


def _tau_cand(raw, mask, out):
    px, py, pz, energy = raw["part_px"], raw["part_py"], raw["part_pz"], raw["part_energy"]
    features = out["features"]
    pt = _pt(px, py)
    abs_deta = np.abs(_eta(pt, pz) - raw["jet_eta"][:, None], out=features[:, 0])
    abs_dphi = np.abs(_delta_phi(px, py, raw["jet_phi"]), out=features[:, 1])
    log_pt = np.log(np.maximum(pt, np.float32(1e-6)), out=features[:, 2])
    log_e = np.log(np.maximum(energy, np.float32(1e-6)), out=features[:, 3])
    # log(max(x / jet, 1e-6)) = max(log x - log jet, log 1e-6) for the floored logs above (x >= 1e-6)
    floor = np.float32(np.log(1e-6))
    np.maximum(log_pt - _log(raw["jet_pt"])[:, None], floor, out=features[:, 4])
    np.maximum(log_e - _log(raw["jet_energy"])[:, None], floor, out=features[:, 5])
    np.sqrt(abs_deta * abs_deta + abs_dphi * abs_dphi, out=features[:, 6])
    charge = raw["part_charge"]
    features[:, 7] = charge
    charged_hadron, neutral_hadron, photon, electron, muon = _pid_flags(raw["part_pid"], charge)
    for c, flag in enumerate((electron, muon, photon, charged_hadron, neutral_hadron), start=8):
        features[:, c] = flag
    for c, name in enumerate(("part_dzval", "part_dzerr", "part_d0val", "part_d0err"), start=13):
        features[:, c] = raw[name]
    if features.shape[1] > 17:
        # The published features give each impact parameter and its error separately, in mm; a network that
        # trains for minutes does not learn their ratio, which is what separates a tau's displaced tracks from
        # prompt ones. Signed log(1 + |value / error|); neutral candidates (error 0) get 0.
        for c, (value, error) in enumerate((("part_dzval", "part_dzerr"), ("part_d0val", "part_d0err")), start=17):
            has_track = raw[error] > 0
            significance = raw[value] / np.where(has_track, raw[error], np.float32(1))
            features[:, c] = np.where(has_track, np.sign(significance) * np.log1p(np.abs(significance)), 0)
    _finish(features, mask)
    _fill_vectors(out["vectors"], raw, mask)


# ----------------------------------------------------------------------------------------------------------------------
# OmniJet-alpha (arXiv:2403.05618; uhh-pd-ml/omnijet_alpha 1c8d442, configs/experiment/experiment_tokenization_transformer.yaml)

OMNIJET_MAX_DELTA = 0.8  # constituents with |Delta eta| or |Delta phi| >= 0.8 are dropped before tokenizing


def _compact(keep: np.ndarray, *arrays: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Move kept entries of each row to the front (stable), padding the rest; vectorised with a stable sort."""
    order = np.argsort(~keep, axis=1, kind="stable")
    return np.take_along_axis(keep, order, axis=1), [np.take_along_axis(a, order, axis=1) for a in arrays]


def _omnijet_constituents(raw, mask, out):
    px, py, pz = raw["part_px"], raw["part_py"], raw["part_pz"]
    # OmniJet takes the jet axis from the sum of the constituents' 4-vectors
    jx, jy, jz = ((c * mask).sum(axis=1) for c in (px, py, pz))
    pt = _pt(px, py)
    deta = _eta(pt, pz) - _eta(_pt(jx, jy), jz)[:, None]
    dphi = _delta_phi(px, py, np.arctan2(jy, jx))
    keep = mask & (np.abs(deta) < OMNIJET_MAX_DELTA) & (np.abs(dphi) < OMNIJET_MAX_DELTA)
    keep, (pt, deta, dphi) = _compact(keep, pt, deta, dphi)
    features = out["features"]
    np.subtract(_log(pt), np.float32(1.8), out=features[:, 0])
    np.multiply(deta, np.float32(3), out=features[:, 1])
    np.multiply(dphi, np.float32(3), out=features[:, 2])
    _finish(features, keep)
    out["mask"][:, 0] = keep


def _omnijet_tokens(raw, mask, out):
    tokens = raw["tokens"].astype(np.int64) * mask
    out["features"][:, 0] = tokens
    return {"tokens": tokens}


# ----------------------------------------------------------------------------------------------------------------------
# MLPF (jpata/particleflow v2.2.0 = 6e852b06, CLIC element features) and AOT


def _mlpf_elements(raw, mask, out):
    elements = raw["elem_features"]
    np.multiply(elements.transpose(0, 2, 1), mask[:, None, :], out=out["features"])
    # the loss sees pT and E as log ratios to the element's own pT/E (particleflow PR #342); 0 where no target
    for name, target, column in (("log_pt_ratio", "target_pt", 1), ("log_energy_ratio", "target_energy", 5)):
        ratio = out[f"target_{name}"]
        if target not in raw:
            ratio[:] = 0.0
            continue
        with np.errstate(divide="ignore", invalid="ignore"):
            np.log(raw[target] / elements[:, :, column], out=ratio)
        ratio[~np.isfinite(ratio) | (raw[target] <= 0) | ~mask] = 0.0


def _aot_objects(raw, mask, out):
    np.multiply(raw["obj_features"].transpose(0, 2, 1), mask[:, None, :], out=out["features"])


def _event_features(raw: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    missing = [n for n in names if f"event_{n}" not in raw]
    if missing:
        raise UserError(f"data.inputs.event_features: no stored column(s) {['event_' + n for n in missing]}; "
                        "the dataset has only the event_* columns listed by `hepml data inspect`")
    return {"event_features": np.stack([raw[f"event_{n}"] for n in names], axis=1).astype(np.float32)}


FEATURE_BUILDERS: dict[str, FeatureBuilder] = {
    b.name: b
    for b in (
        FeatureBuilder("part_full", "part_n", _PART_PADDED, _JET, _part_builder("full"), vectors=True,
                       doc="ParT JetClass full: 5 standardised kinematic, 6 particle-ID, 4 trajectory, deta, dphi"),
        FeatureBuilder("part_kinpid", "part_n", _PART_PADDED[:6], _JET, _part_builder("kinpid"), vectors=True,
                       doc="ParT kinpid: kinematics and particle ID"),
        FeatureBuilder("part_kin", "part_n", _PART_KIN_PADDED, _JET, _part_builder("kin"), vectors=True,
                       doc="ParT kin: kinematics only"),
        FeatureBuilder("sophon_full", "part_n", _PART_PADDED, _JET, _sophon, vectors=True,
                       doc="Sophon: part_full with pT and E of each jet scaled to pT = 500 GeV (vectors too)"),
        FeatureBuilder("tau_cand", "part_n", _TAU_PADDED, _JET, _tau_cand, vectors=True,
                       doc="MultiParTau's 17 tau-candidate features (unstandardised, logs floored at 1e-6)"),
        FeatureBuilder("tau_cand_ipsig", "part_n", _TAU_PADDED, _JET, _tau_cand, vectors=True,
                       doc="tau_cand plus the signed log impact-parameter significances of dz and d0 (demo job)"),
        FeatureBuilder("omnijet_tokens", "tokens_n", ("tokens",), (), _omnijet_tokens,
                       doc="OmniJet token ids (start 0, code c -> c+1, stop K+1); `tokens` int64 plus as features"),
        FeatureBuilder("omnijet_constituents", "part_n", _PART_KIN_PADDED, (), _omnijet_constituents,
                       doc="OmniJet tokenizer input: log pT - 1.8, 3 deta, 3 dphi; |deta|,|dphi| >= 0.8 dropped"),
        FeatureBuilder("mlpf_elements", "elem_n", ("elem_features",), (), _mlpf_elements,
                       derived=("target_log_pt_ratio", "target_log_energy_ratio"), per_element=("label_", "target_"),
                       doc="MLPF CLIC tracks and clusters (17 raw features, column 0 = element type)"),
        FeatureBuilder("aot_objects", "obj_n", ("obj_features",), (), _aot_objects, extra=_event_features,
                       doc="AOT objects (E, pT, eta, phi, mass, b-tag) plus the event features"),
    )
}
if set(FEATURE_BUILDERS) != set(FEATURE_SETS):  # a feature set declared in the spec without a builder, or vice versa
    raise RuntimeError(f"feature sets without a builder: {set(FEATURE_SETS) - set(FEATURE_BUILDERS)}; "
                       f"builders without a declared feature set: {set(FEATURE_BUILDERS) - set(FEATURE_SETS)}")


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


def fit_length(array: np.ndarray, length: int) -> np.ndarray:
    """Cut or zero-pad axis 1 to `length`."""
    have = array.shape[1]
    if have >= length:
        return array[:, :length]
    widths = [(0, 0), (0, length - have)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, widths)


Allocator = Callable[[int, np.dtype], np.ndarray]


def _carve(alloc: Allocator, shapes: Mapping[str, tuple[int, ...]], dtype) -> dict[str, np.ndarray]:
    """Views of one allocation, one contiguous block per name (few large buffers cross processes cheaply)."""
    sizes = {name: int(np.prod(shape)) for name, shape in shapes.items()}
    buffer = alloc(sum(sizes.values()), np.dtype(dtype))
    views, offset = {}, 0
    for name, shape in shapes.items():
        views[name] = buffer[offset:offset + sizes[name]].reshape(shape)
        offset += sizes[name]
    return views


def _pack(alloc: Allocator, arrays: Mapping[str, np.ndarray], dtype) -> dict[str, np.ndarray]:
    if not arrays:
        return {}
    views = _carve(alloc, {k: v.shape for k, v in arrays.items()}, dtype)
    for name, values in arrays.items():
        views[name][...] = values
    return views


def build_batch(
    raw: Mapping[str, np.ndarray],
    builder: FeatureBuilder,
    *,
    max_length: int,
    pad_to_multiple: int | None = None,
    event_features: Sequence[str] = (),
    alloc: Allocator | None = None,
    reused: dict | None = None,
) -> dict[str, np.ndarray]:
    """Model inputs plus pass-through columns for one batch of stored columns (numpy in, numpy out).

    All float32 outputs live in two allocations (model inputs; the rest) and all int64 ones in one, made by
    `alloc(n, dtype)` (default numpy): the loader passes an allocator in shared memory, so a batch crosses from
    a DataLoader worker as three buffers and is written only once.

    `reused` is for an allocator that hands out the same memory every time (one dict per such memory, empty at
    first): it records the layout and the written width of the batch built there, so that the next batch of the
    same layout zeroes only the padding that the last one wrote. Zeroing all of the padding (half of a
    128-slot JetClass batch) was a tenth of the loader's time.
    """
    alloc = alloc or (lambda n, dtype: np.empty(n, dtype))
    counts = np.minimum(raw[builder.count], max_length)
    length = batch_length(counts, max_length, pad_to_multiple)
    size = len(counts)
    # features are computed only over the columns that hold a real constituent in some example of the batch;
    # the rest of the output (up to `length`) is zero padding
    busy = min(max(int(counts.max(initial=0)), 1), length)
    mask = np.arange(busy)[None, :] < counts[:, None]
    work = dict(raw)
    for name in builder.padded:
        work[name] = fit_length(raw[name], busy)
    per_element = {}
    if builder.per_element:
        for name in raw:
            if name.startswith(builder.per_element) and raw[name].ndim >= 2:
                per_element[name] = fit_length(raw[name], length)
                work[name] = per_element[name][:, :busy]
    shapes = {"features": (size, builder.channels, length)}
    if builder.vectors:
        shapes["vectors"] = (size, 4, length)
    shapes["mask"] = (size, 1, length)
    shapes.update({name: (size, length) for name in builder.derived})
    out = _carve(alloc, shapes, np.float32)
    layout = tuple(shapes.items())
    written = reused.get("busy", length) if reused and reused.get("layout") == layout else length
    if reused is not None:
        reused.clear()  # until this batch is built, the memory holds no known layout
    for array in out.values():
        array[..., busy:written] = 0.0
    views = {name: array[..., :busy] for name, array in out.items()}
    views["mask"][:, 0] = mask
    small = {k: fit_length(v, length) if v.ndim >= 2 else v for k, v in (builder.build(work, mask, views) or {}).items()}
    if builder.extra is not None:
        small.update(builder.extra(raw, event_features))
    for name, values in {**raw, **per_element}.items():
        if is_pass_through(name) and name not in out and name not in small:
            small[name] = values
    integers = {k: v for k, v in small.items() if k.startswith("label_") or k == "tokens"}
    floats = {k: v for k, v in small.items() if k not in integers}
    out.update(_pack(alloc, floats, np.float32))
    out.update(_pack(alloc, integers, np.int64))
    if reused is not None:
        reused.update(layout=layout, busy=busy)
    return out


def to_torch(batch: Mapping[str, np.ndarray]) -> dict:
    """numpy batch -> dict of CPU tensors (no copy where the array is contiguous)."""
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
