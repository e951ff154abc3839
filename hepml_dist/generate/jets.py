"""Jet clustering of many events at once (fastjet's awkward interface) and padded constituent tables.

Inputs are flat particle arrays sorted by event; outputs are flat jet arrays plus each jet's constituents as flat
indices into the inputs (CSR layout), so the processes never loop over jets or particles in Python.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import awkward as ak
import fastjet
import numpy as np

_BANNER_SHOWN = False
RECLUSTER_RADIUS = 1000.0  # fastjet's JetDefinition::max_allowable_R: every pair of particles merges


def _quiet_banner(fastjet) -> None:
    """fastjet prints its banner to stdout on the first clustering of a process; send that one to /dev/null."""
    global _BANNER_SHOWN
    if _BANNER_SHOWN:
        return

    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        one = ak.Array([[{"px": 1.0, "py": 0.0, "pz": 0.0, "E": 2.0}]])
        fastjet.ClusterSequence(one, fastjet.JetDefinition(fastjet.antikt_algorithm, 0.4)).inclusive_jets()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
    _BANNER_SHOWN = True


def jet_definition(algorithm: str, radius: float):
    """`ee_antikt` (generalised kT for e+e-, p = -1, E-scheme), `antikt` or `cambridge` (pp, rapidity-azimuth)."""
    if algorithm == "ee_antikt":
        return fastjet.JetDefinition(fastjet.ee_genkt_algorithm, radius, -1.0)
    if algorithm == "antikt":
        return fastjet.JetDefinition(fastjet.antikt_algorithm, radius)
    if algorithm == "cambridge":
        return fastjet.JetDefinition(fastjet.cambridge_algorithm, radius)
    raise ValueError(f"unknown jet algorithm {algorithm!r}")


@dataclass
class Jets:
    """Flat jets of many events, sorted by event then decreasing pT; `constituents[offsets[j]:offsets[j+1]]` are
    the flat input indices of jet j."""

    event: np.ndarray
    px: np.ndarray
    py: np.ndarray
    pz: np.ndarray
    e: np.ndarray
    offsets: np.ndarray
    constituents: np.ndarray

    def __len__(self) -> int:
        return len(self.event)

    @property
    def pt(self):
        return np.hypot(self.px, self.py)

    @property
    def eta(self):
        return np.arcsinh(self.pz / np.maximum(self.pt, 1e-9))

    @property
    def phi(self):
        return np.arctan2(self.py, self.px)

    @property
    def mass(self):
        return np.sqrt(np.maximum(self.e**2 - self.px**2 - self.py**2 - self.pz**2, 0.0))

    @property
    def n_constituents(self):
        return np.diff(self.offsets)

    @property
    def constituent_jet(self):
        """Jet index of each entry of `constituents`."""
        return np.repeat(np.arange(len(self)), self.n_constituents)

    def take(self, keep: np.ndarray) -> Jets:
        """The jets at indices (or boolean mask) `keep`, constituents carried along."""
        keep = np.flatnonzero(keep) if np.asarray(keep).dtype == bool else np.asarray(keep)
        counts = self.n_constituents[keep]
        offsets = np.zeros(len(keep) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        starts = np.repeat(self.offsets[:-1][keep] - offsets[:-1], counts)
        picked = self.constituents[starts + np.arange(offsets[-1])] if offsets[-1] else self.constituents[:0]
        return Jets(self.event[keep], self.px[keep], self.py[keep], self.pz[keep], self.e[keep], offsets, picked)


def cluster(event: np.ndarray, px, py, pz, e, n_events: int, algorithm: str, radius: float,
            min_pt: float = 0.0) -> Jets:
    """Cluster particles (flat arrays, sorted by `event`) of `n_events` events; jets with pT > `min_pt`."""
    _quiet_banner(fastjet)
    counts = np.bincount(event, minlength=n_events)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    particles = ak.unflatten(ak.zip({"px": np.asarray(px, np.float64), "py": np.asarray(py, np.float64),
                                     "pz": np.asarray(pz, np.float64), "E": np.asarray(e, np.float64)}), counts)
    sequence = fastjet.ClusterSequence(particles, jet_definition(algorithm, radius))
    jets = sequence.inclusive_jets(min_pt=min_pt)
    index = sequence.constituent_index(min_pt=min_pt)

    jets_per_event = ak.to_numpy(ak.num(jets, axis=1))
    jet_event = np.repeat(np.arange(n_events), jets_per_event)
    flat = ak.flatten(jets)
    jpx, jpy = ak.to_numpy(flat.px), ak.to_numpy(flat.py)
    jpz, je = ak.to_numpy(flat.pz), ak.to_numpy(flat.E)
    n_const = ak.to_numpy(ak.flatten(ak.num(index, axis=2)))
    local = ak.to_numpy(ak.flatten(index, axis=None)).astype(np.int64)
    const_jet = np.repeat(np.arange(len(jet_event)), n_const)
    global_index = local + starts[jet_event[const_jet]]

    # fastjet's inclusive jets are unordered: sort by event, then decreasing pT
    order = np.lexsort((-np.hypot(jpx, jpy), jet_event))
    offsets = np.zeros(len(jet_event) + 1, dtype=np.int64)
    np.cumsum(n_const, out=offsets[1:])
    unsorted = Jets(jet_event, jpx, jpy, jpz, je, offsets, global_index)
    return unsorted.take(order)


def padded_constituents(jets: Jets, pt: np.ndarray, columns: dict[str, np.ndarray], max_len: int,
                        ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per jet, the `max_len` highest-pT constituents of each flat column as [n_jets, max_len] arrays (0-padded),
    and the number kept per jet."""
    jet = jets.constituent_jet
    member = jets.constituents
    order = np.lexsort((-pt[member], jet))
    jet, member = jet[order], member[order]
    rank = np.arange(len(member)) - jets.offsets[jet]
    keep = rank < max_len
    jet, member, rank = jet[keep], member[keep], rank[keep]
    out = {}
    for name, values in columns.items():
        table = np.zeros((len(jets), max_len), dtype=values.dtype)
        table[jet, rank] = values[member]
        out[name] = table
    return out, np.minimum(jets.n_constituents, max_len).astype(np.int32)


def delta_phi(a, b):
    return (np.asarray(a) - np.asarray(b) + np.pi) % (2 * np.pi) - np.pi


def delta_r(eta1, phi1, eta2, phi2):
    return np.hypot(np.asarray(eta1) - np.asarray(eta2), delta_phi(phi1, phi2))


def angle_between(p1: np.ndarray, p2: np.ndarray) -> np.ndarray:
    """Opening angle of 3-vectors [..., 3] (the e+e- matching distance)."""
    n1 = np.linalg.norm(p1, axis=-1)
    n2 = np.linalg.norm(p2, axis=-1)
    cos = np.sum(p1 * p2, axis=-1) / np.maximum(n1 * n2, 1e-12)
    return np.arccos(np.clip(cos, -1.0, 1.0))


def constituent_columns(jets: Jets, candidates, max_len: int) -> dict[str, np.ndarray]:
    """The stored jet columns (part_*, part_n, jet_*) of the contract, from jets clustered on `candidates`."""
    pt = np.hypot(candidates.px, candidates.py)
    float_columns = {
        "part_px": candidates.px, "part_py": candidates.py, "part_pz": candidates.pz, "part_energy": candidates.e,
        "part_charge": candidates.charge, "part_d0val": candidates.d0, "part_d0err": candidates.d0err,
        "part_dzval": candidates.dz, "part_dzerr": candidates.dzerr,
    }
    table, n = padded_constituents(
        jets, pt, {**{k: v.astype(np.float32) for k, v in float_columns.items()},
                   "part_pid": candidates.pid.astype(np.int32)}, max_len)
    return {
        **table,
        "part_n": n,
        "jet_pt": jets.pt.astype(np.float32),
        "jet_eta": jets.eta.astype(np.float32),
        "jet_phi": jets.phi.astype(np.float32),
        "jet_energy": jets.e.astype(np.float32),
        "jet_mass": jets.mass.astype(np.float32),
    }


def jet_schema(max_len: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Column name -> (dtype, per-example shape) of the jet columns written by `constituent_columns`."""
    schema: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name in ("part_px", "part_py", "part_pz", "part_energy", "part_charge",
                 "part_d0val", "part_d0err", "part_dzval", "part_dzerr"):
        schema[name] = ("float32", (max_len,))
    schema["part_pid"] = ("int32", (max_len,))
    schema["part_n"] = ("int32", ())
    for name in ("jet_pt", "jet_eta", "jet_phi", "jet_energy", "jet_mass"):
        schema[name] = ("float32", ())
    return schema


def substructure(jets: Jets, px, py, pz, e, radius: float, z_cut: float = 0.1, beta: float = 0.0,
                 max_subjets: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Soft-drop mass [N] and N-subjettiness tau_1..tau_max_subjets [N, max_subjets] of each jet, from all its
    constituents (flat arrays indexed by `jets.constituents`).

    Each jet's constituents are reclustered on their own into one Cambridge/Aachen tree (fastjet, with the largest
    radius fastjet allows, as fastjet-contrib's Recluster does: with R = `radius`, constituents further apart than
    R would be lost) and declustered from the top, dropping the softer branch until
    min(pT1, pT2) / (pT1 + pT2) > z_cut (Delta R12 / radius)^beta (soft drop, arXiv:1402.2657; z_cut = 0.1,
    beta = 0 is the CMS / Delphes setting JetClass-II uses); the mass of what is left is the soft-drop mass.
    tau_N: fastjet-contrib Nsubjettiness with one-pass kT axes and the normalised measure (beta = 1, R0 = radius)."""
    if len(jets) == 0:
        return np.zeros(0, np.float64), np.zeros((0, max_subjets), np.float64)
    _quiet_banner(fastjet)
    members = jets.constituents
    particles = ak.unflatten(ak.zip({name: np.asarray(values, np.float64)[members]
                                     for name, values in (("px", px), ("py", py), ("pz", pz), ("E", e))}),
                             jets.n_constituents)
    sequence = fastjet.ClusterSequence(particles, jet_definition("cambridge", RECLUSTER_RADIUS))
    groomed = sequence.exclusive_jets_softdrop_grooming(njets=1, beta=beta, symmetry_cut=z_cut, R0=radius)
    mass = np.maximum(ak.to_numpy(groomed.msoftdrop), 0.0)  # a one-particle jet can come out at -1e-7
    taus = ak.to_numpy(sequence.njettiness(njets=list(range(1, max_subjets + 1)), beta=1.0, R0=radius))
    return mass, np.asarray(taus, np.float64).reshape(len(jets), max_subjets)
