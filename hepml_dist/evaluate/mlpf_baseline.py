"""A rule-based particle flow from the MLPF input elements: the reference MLPF is compared against, as particleflow
compares MLPF with Pandora PF.

Input: the elements as the loader gives them (`features [N, 17, E]`, unstandardised, column layout of
`generate/clic_events.py`: 0 type (1 track, 2 cluster), 1 pT / ET, 2 eta, 3 sin phi, 4 cos phi, 5 p / E; tracks:
13 omega = 3e-4 B q / pT in 1/mm; clusters: 10 ECAL energy, 11 HCAL energy).

Rules, per event:
- every track -> a charged hadron with the track's momentum (massless: E = |p|);
- every track is extrapolated through the 4 T field to the ECAL front face (R = 1.5 m barrel, |z| = 2.307 m endcaps,
  as the toy detector) and linked to its nearest cluster if Delta R(track at the ECAL, cluster) < LINK_DR;
- a cluster with no linked track -> one neutral particle with the cluster's energy along the cluster direction;
- a cluster with linked tracks -> nothing if its energy is compatible with the sum of their momenta
  (E - sum p < N_SIGMA x sigma, sigma = the toy HCAL resolution 50 %/sqrt(E) (+) 5 % at E = sum p); otherwise a
  neutral particle carrying the excess E - sum p (an overlapping photon or neutral hadron);
- a neutral is a photon if at least PHOTON_ECAL_FRACTION of the cluster energy is in the ECAL, else a neutral hadron.
"""

from __future__ import annotations

import awkward as ak
import numpy as np

TRACK, CLUSTER = 1, 2
CHARGED_HADRON, NEUTRAL_HADRON, PHOTON = 1, 2, 3
BFIELD_T = 4.0
ECAL_RADIUS_MM, ECAL_HALF_LENGTH_MM = 1500.0, 2307.0
LINK_DR = 0.1
N_SIGMA = 3.0
HCAL_STOCHASTIC, HCAL_CONSTANT = 0.50, 0.05
PHOTON_ECAL_FRACTION = 0.9


def track_phi_at_calorimeter(pt: np.ndarray, eta: np.ndarray, phi: np.ndarray, omega: np.ndarray) -> np.ndarray:
    """Azimuth where a helix from the origin meets the ECAL front face: turned by asin(omega R / 2) in the barrel,
    by omega |z| / (2 |sinh eta|) in the endcaps (omega = signed curvature in 1/mm)."""
    sinh_eta = np.sinh(eta)
    barrel = np.abs(ECAL_RADIUS_MM * sinh_eta) < ECAL_HALF_LENGTH_MM
    barrel_turn = np.arcsin(np.clip(omega * ECAL_RADIUS_MM / 2.0, -1.0, 1.0))
    endcap_turn = omega * ECAL_HALF_LENGTH_MM / (2.0 * np.maximum(np.abs(sinh_eta), 1e-9))
    return phi - np.where(barrel, barrel_turn, endcap_turn)


def _delta_r(eta_a, phi_a, eta_b, phi_b) -> np.ndarray:
    dphi = (phi_a - phi_b + np.pi) % (2 * np.pi) - np.pi
    return np.hypot(eta_a - eta_b, dphi)


def _energy_compatible(excess: np.ndarray, track_p: np.ndarray) -> np.ndarray:
    sigma = np.hypot(HCAL_STOCHASTIC * np.sqrt(np.maximum(track_p, 0.0)), HCAL_CONSTANT * track_p)
    return excess < N_SIGMA * sigma


def rule_based_columns(features: np.ndarray, real: np.ndarray) -> dict[str, np.ndarray]:
    """Per element [N, E]: the particle it yields (`cls` 0 = none) with `pt, eta, phi, energy`.

    `features`: [N, E, 17] elements; `real`: [N, E] bool, False for padding."""
    kind = np.where(real, features[..., 0], 0)
    track, cluster = kind == TRACK, kind == CLUSTER
    eta, phi = features[..., 2], np.arctan2(features[..., 3], features[..., 4])
    energy = features[..., 5]

    # links: each track to its nearest cluster within LINK_DR of its impact on the calorimeter
    phi_at_calo = track_phi_at_calorimeter(features[..., 1], eta, phi, features[..., 13])
    dr = _delta_r(eta[:, :, None], phi_at_calo[:, :, None], eta[:, None, :], phi[:, None, :])  # [N, track, cluster]
    dr = np.where(track[:, :, None] & cluster[:, None, :], dr, np.inf)
    nearest = dr.argmin(axis=2)
    linked = np.take_along_axis(dr, nearest[..., None], axis=2)[..., 0] < LINK_DR
    linked_p = np.zeros_like(energy)
    for n, t in zip(*np.nonzero(linked)):
        linked_p[n, nearest[n, t]] += energy[n, t]
    has_track = linked_p > 0

    neutral_energy = np.where(has_track, energy - linked_p, energy)
    emits = cluster & ~(has_track & _energy_compatible(neutral_energy, linked_p))
    ecal_fraction = features[..., 10] / np.maximum(features[..., 10] + features[..., 11], 1e-9)
    neutral_cls = np.where(ecal_fraction >= PHOTON_ECAL_FRACTION, PHOTON, NEUTRAL_HADRON)

    cls = np.select([track, emits], [CHARGED_HADRON, neutral_cls], default=0)
    out_energy = np.where(track, energy, np.where(emits, neutral_energy, 0.0))
    pt = np.where(track, features[..., 1], out_energy / np.cosh(eta))
    return {"pt": pt, "eta": eta, "phi": phi, "energy": out_energy, "cls": cls}


def rule_based_particles(features: np.ndarray, real: np.ndarray) -> ak.Array:
    """The rule-based particles of each event, as records `pt, eta, phi, energy, cls` (one list per event)."""
    columns = rule_based_columns(features, real)
    keep = columns["cls"] != 0
    counts = keep.sum(axis=1)
    return ak.zip({name: ak.unflatten(values[keep].astype(np.float64), counts) for name, values in columns.items()})
