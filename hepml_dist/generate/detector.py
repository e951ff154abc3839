"""Parametrised detector response: particle-flow candidates from Pythia's stable particles.

Not a simulation: every measured quantity is the true one smeared with a Gaussian whose width follows the usual
resolution formulas (documented with their numbers in docs/generators.md):

    tracks        sigma(pT)/pT = a * pT (+) b                         (curvature; (+) = in quadrature)
                  sigma(d0)    = c (+) d / (p sin^(3/2) theta)         (mm; point resolution (+) multiple scattering)
                  sigma(z0)    = c (+) d / (p sin^(5/2) theta)
    calorimeters  sigma(E)/E   = s / sqrt(E) (+) k                     (ECAL for photons, HCAL for neutral hadrons)

Impact parameters come from the true production vertex that Pythia records for decay products of taus, b and c
hadrons, K0S and hyperons (straight-line extrapolation: the tracks of interest are displaced by millimetres, far
below their radius of curvature). Charged particles the tracker misses are seen by the calorimeters as neutral
hadrons (or photons, for electrons); muons without a track are lost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hepml_dist.generate.pythia import Record

PION_MASS, ELECTRON_MASS, MUON_MASS = 0.13957, 0.000511, 0.10566


@dataclass(frozen=True)
class Detector:
    """Resolution and acceptance parameters of a toy detector (momenta GeV, lengths mm, field T)."""

    name: str
    bfield: float
    track_max_abs_eta: float
    track_min_pt: float
    track_max_vertex_radius: float  # mm: a charged particle born further out leaves too few hits for a track
    track_efficiency: float
    track_pt_a: float  # sigma(pT)/pT = a pT (+) b
    track_pt_b: float
    track_angle: float  # rad, on eta and phi
    d0_point: float  # mm
    d0_ms: float  # mm GeV
    z0_point: float
    z0_ms: float
    calo_max_abs_eta: float
    ecal_stochastic: float
    ecal_constant: float
    hcal_stochastic: float
    hcal_constant: float
    photon_angle: float  # rad
    hadron_angle: float  # rad
    photon_min_e: float
    hadron_min_e: float


# FCC-ee CLD (CLD_o2_v07 design numbers, rounded): 2 T, tracking down to ~8 degrees.
CLD = Detector(
    name="CLD-like", bfield=2.0, track_max_abs_eta=2.65, track_min_pt=0.1, track_max_vertex_radius=600.0,
    track_efficiency=0.99,
    track_pt_a=2e-5, track_pt_b=1e-3, track_angle=1e-4,
    d0_point=0.003, d0_ms=0.015, z0_point=0.005, z0_ms=0.015,
    calo_max_abs_eta=2.65, ecal_stochastic=0.15, ecal_constant=0.01, hcal_stochastic=0.50, hcal_constant=0.05,
    photon_angle=0.002, hadron_angle=0.01, photon_min_e=0.2, hadron_min_e=0.5,
)

# CMS-like (Phase-1 orders of magnitude): 3.8 T, tracker |eta| < 2.5, calorimeters to |eta| = 3.
CMS = Detector(
    name="CMS-like", bfield=3.8, track_max_abs_eta=2.5, track_min_pt=0.5, track_max_vertex_radius=500.0,
    track_efficiency=0.95,
    track_pt_a=1.5e-4, track_pt_b=0.005, track_angle=5e-4,
    d0_point=0.010, d0_ms=0.090, z0_point=0.020, z0_ms=0.100,
    calo_max_abs_eta=3.0, ecal_stochastic=0.03, ecal_constant=0.005, hcal_stochastic=1.0, hcal_constant=0.05,
    photon_angle=0.003, hadron_angle=0.02, photon_min_e=0.5, hadron_min_e=1.0,
)


def quadrature(*terms):
    return np.sqrt(sum(np.square(t) for t in terms))


def eta_of(px, py, pz):
    return np.arcsinh(np.divide(pz, np.hypot(px, py), out=np.zeros_like(pz, dtype=np.float64),
                                where=np.hypot(px, py) > 0))


def calo_resolution(energy, stochastic: float, constant: float):
    """Relative energy resolution s/sqrt(E) (+) k."""
    return quadrature(stochastic / np.sqrt(np.maximum(energy, 1e-6)), constant)


def smear_relative(rng: np.random.Generator, value, sigma_rel):
    """value * (1 + sigma_rel N(0,1)), kept positive (a Gaussian tail below zero becomes 1 % of the value)."""
    smeared = value * (1.0 + sigma_rel * rng.standard_normal(np.shape(value)))
    return np.maximum(smeared, 0.01 * value)


def impact_parameters(vx, vy, vz, px, py, pz):
    """(d0, z0) in mm of a straight track from production vertex v with momentum p, w.r.t. the origin.

    d0 = (v x p)_z / pT is the signed transverse distance of closest approach to the beam line; z0 is z at that point.
    """
    pt = np.maximum(np.hypot(px, py), 1e-9)
    d0 = (vx * py - vy * px) / pt
    path_to_pca = (vx * px + vy * py) / pt
    z0 = vz - path_to_pca * pz / pt
    return d0, z0


def impact_parameter_errors(det: Detector, p, sin_theta):
    sin_theta = np.maximum(sin_theta, 1e-3)
    p = np.maximum(p, 1e-3)
    return (quadrature(det.d0_point, det.d0_ms / (p * sin_theta**1.5)),
            quadrature(det.z0_point, det.z0_ms / (p * sin_theta**2.5)))


@dataclass
class Tracks:
    """Reconstructed tracks: smeared momentum, impact parameters and their errors; `gen` = index in the Record."""

    gen: np.ndarray
    event: np.ndarray
    pt: np.ndarray
    eta: np.ndarray
    phi: np.ndarray
    charge: np.ndarray
    d0: np.ndarray
    d0err: np.ndarray
    z0: np.ndarray
    z0err: np.ndarray


def track_acceptance(record: Record, det: Detector, rng: np.random.Generator, candidates: np.ndarray) -> np.ndarray:
    """Which of the charged `candidates` (flat indices) leave a reconstructed track."""
    pt = record.pt[candidates]
    eta = eta_of(record.px[candidates], record.py[candidates], record.pz[candidates])
    efficient = rng.random(len(candidates)) < det.track_efficiency
    inside = np.hypot(record.vx[candidates], record.vy[candidates]) < det.track_max_vertex_radius
    return (pt > det.track_min_pt) & (np.abs(eta) < det.track_max_abs_eta) & inside & efficient


def reconstruct_tracks(record: Record, det: Detector, rng: np.random.Generator, gen: np.ndarray) -> Tracks:
    """Smear the charged particles `gen` (flat indices) into tracks."""
    px, py, pz = record.px[gen], record.py[gen], record.pz[gen]
    pt = np.hypot(px, py)
    eta = eta_of(px, py, pz)
    phi = np.arctan2(py, px)
    pt_meas = smear_relative(rng, pt, quadrature(det.track_pt_a * pt, det.track_pt_b))
    eta_meas = eta + det.track_angle * rng.standard_normal(len(gen))
    phi_meas = phi + det.track_angle * rng.standard_normal(len(gen))
    d0, z0 = impact_parameters(record.vx[gen], record.vy[gen], record.vz[gen], px, py, pz)
    p_meas = pt_meas * np.cosh(eta_meas)
    d0err, z0err = impact_parameter_errors(det, p_meas, 1.0 / np.cosh(eta_meas))
    return Tracks(
        gen=gen, event=record.event[gen], pt=pt_meas, eta=eta_meas, phi=phi_meas, charge=record.charge[gen],
        d0=d0 + d0err * rng.standard_normal(len(gen)), d0err=d0err,
        z0=z0 + z0err * rng.standard_normal(len(gen)), z0err=z0err,
    )


@dataclass
class Candidates:
    """Particle-flow candidates of many events, flat; `gen` = index of the source particle in the Record."""

    gen: np.ndarray
    event: np.ndarray
    px: np.ndarray
    py: np.ndarray
    pz: np.ndarray
    e: np.ndarray
    charge: np.ndarray
    pid: np.ndarray
    d0: np.ndarray
    d0err: np.ndarray
    dz: np.ndarray
    dzerr: np.ndarray

    def __len__(self) -> int:
        return len(self.gen)

    def take(self, index: np.ndarray) -> Candidates:
        return Candidates(**{k: v[index] for k, v in vars(self).items()})


def _four_vectors(pt, eta, phi, mass):
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    return px, py, pz, np.sqrt(px**2 + py**2 + pz**2 + mass**2)


def reduced_charged_pid(pdg: np.ndarray, charge: np.ndarray) -> np.ndarray:
    """Electrons and muons keep their PDG id; every other charged particle becomes 211 with the sign of its charge."""
    lepton = np.isin(np.abs(pdg), (11, 13))
    return np.where(lepton, pdg, 211 * np.sign(charge).astype(np.int64))


def reconstruct_candidates(record: Record, det: Detector, rng: np.random.Generator,
                           select: np.ndarray | None = None) -> Candidates:
    """PF candidates from the visible stable particles (optionally only those where `select` is true).

    Charged particles with a track: measured by the tracker, mass from the reduced PID. Photons, and electrons the
    tracker missed: ECAL resolution, massless. Neutral hadrons and charged hadrons the tracker missed: HCAL
    resolution, massless, reduced PID 130. Candidates are sorted by event, then by the Record order.
    """
    visible = record.is_visible_final
    if select is not None:
        visible &= select
    stable = np.flatnonzero(visible)
    charged = stable[record.charge[stable] != 0]
    tracked = charged[track_acceptance(record, det, rng, charged)]
    tracks = reconstruct_tracks(record, det, rng, tracked)
    pid_tracked = reduced_charged_pid(record.pid[tracked], record.charge[tracked])
    mass = np.where(np.abs(pid_tracked) == 11, ELECTRON_MASS, np.where(np.abs(pid_tracked) == 13, MUON_MASS, PION_MASS))
    tpx, tpy, tpz, te = _four_vectors(tracks.pt, tracks.eta, tracks.phi, mass)

    calo = np.setdiff1d(stable, tracked)
    calo = calo[np.abs(record.pid[calo]) != 13]  # a muon without a track leaves only a MIP: lost
    energy = record.e[calo]
    em = np.isin(np.abs(record.pid[calo]), (11, 22))
    sigma = np.where(em, calo_resolution(energy, det.ecal_stochastic, det.ecal_constant),
                     calo_resolution(energy, det.hcal_stochastic, det.hcal_constant))
    e_meas = smear_relative(rng, energy, sigma)
    angle = np.where(em, det.photon_angle, det.hadron_angle)
    eta = eta_of(record.px[calo], record.py[calo], record.pz[calo]) + angle * rng.standard_normal(len(calo))
    phi = np.arctan2(record.py[calo], record.px[calo]) + angle * rng.standard_normal(len(calo))
    seen = (np.abs(eta) < det.calo_max_abs_eta) & (e_meas > np.where(em, det.photon_min_e, det.hadron_min_e))
    calo, e_meas, eta, phi, em = calo[seen], e_meas[seen], eta[seen], phi[seen], em[seen]
    npt = e_meas / np.cosh(eta)
    npx, npy, npz, ne = _four_vectors(npt, eta, phi, np.zeros_like(npt))

    zeros = np.zeros(len(calo))
    gen = np.concatenate([tracked, calo])
    order = np.argsort(gen, kind="stable")  # back to event order
    return Candidates(
        gen=gen[order],
        event=record.event[gen][order],
        px=np.concatenate([tpx, npx])[order],
        py=np.concatenate([tpy, npy])[order],
        pz=np.concatenate([tpz, npz])[order],
        e=np.concatenate([te, ne])[order],
        charge=np.concatenate([tracks.charge, zeros])[order],
        pid=np.concatenate([pid_tracked, np.where(em, 22, 130)])[order],
        d0=np.concatenate([tracks.d0, zeros])[order],
        d0err=np.concatenate([tracks.d0err, zeros])[order],
        dz=np.concatenate([tracks.z0, zeros])[order],
        dzerr=np.concatenate([tracks.z0err, zeros])[order],
    )
