"""The `realistic` FCC-ee detector of fcc-tau: the CLD-like response of `detector.py` plus what makes real data hard.

On top of the resolutions of `detector.CLD` (used unchanged), each effect with its numbers in `Effects` (values and
sources in docs/generators.md, "fcc-tau detectors"):

- a beam spot: every event's vertices move by a Gaussian offset (luminous region), d0 is measured from the beam
  line, dz from a reconstructed primary vertex (the true one smeared by its resolution);
- tracking efficiency falling at low pT and in the forward region, and fake tracks next to real ones, with wide
  impact parameters;
- particle-flow confusion: charged hadrons leave split-off neutral hadrons and photons (double-counted energy),
  photons closer than the calorimeter can separate merge into one, and a charged particle without a track
  reappears as a neutral hadron (or photon, for an electron) with its calorimeter energy;
- beam-induced background: soft gamma gamma -> hadrons particles overlaid on every event (Poisson mean
  `overlay_rate`), each from its own vertex in the luminous region;
- impact parameters signed with respect to the jet axis (`sign_impact_parameters`, after clustering): positive
  when the track's point of closest approach lies on the jet's side, as lifetime taggers sign them.

Everything is vectorised over the particles of a whole work unit; `reconstruct` returns the PF candidates and the
number of times each effect fired (for docs/generators.md and the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hepml_dist.generate.detector import (
    CLD,
    ELECTRON_MASS,
    MUON_MASS,
    PION_MASS,
    Candidates,
    Detector,
    calo_resolution,
    eta_of,
    impact_parameter_errors,
    impact_parameters,
    quadrature,
    reduced_charged_pid,
    smear_relative,
)
from hepml_dist.generate.jets import Jets
from hepml_dist.generate.pythia import Record

K0L_MASS = 0.49761


@dataclass(frozen=True)
class Effects:
    """Numbers of the realistic effects (GeV, mm, rad); docs/generators.md gives their sources."""

    beam_spot_x: float = 0.0064  # FCC-ee Z pole sigma_x* = sqrt(0.27 nm * 0.15 m)
    beam_spot_y: float = 0.00003  # sigma_y* = sqrt(1 pm * 0.8 mm) = 28 nm
    beam_spot_z: float = 0.3  # luminous region with 30 mrad crossing: ~ sigma_x* / (theta/2) / sqrt(2)
    vertex_z_resolution: float = 0.01  # primary-vertex z from ~10-20 tracks
    track_efficiency: float = 0.99  # plateau, pT > ~1 GeV, barrel
    track_low_pt_loss: float = 0.2  # extra loss at pT -> 0 ...
    track_low_pt_scale: float = 0.3  # ... recovering as exp(-pT / scale)
    track_forward_cos: float = 0.9  # |cos theta| beyond which the efficiency falls linearly ...
    track_forward_efficiency: float = 0.85  # ... to this value at the edge of the tracker
    fake_track_rate: float = 0.003  # fake tracks per reconstructed track
    fake_track_pt_mean: float = 1.0  # above the track threshold, exponential
    fake_track_angle: float = 0.05  # spread around the real track it is built next to
    fake_track_ip_width: float = 0.2  # d0, z0 of a fake ~ N(0, width)
    split_neutral_max: float = 0.3  # probability of a split-off neutral hadron: max * E / (E + half)
    split_neutral_half: float = 20.0
    split_neutral_fraction: tuple[float, float] = (0.1, 0.4)  # of the charged hadron's energy, uniform
    split_neutral_angle: float = 0.03
    split_photon_probability: float = 0.05  # per charged hadron above split_photon_min_e
    split_photon_min_e: float = 2.0
    split_photon_fraction: tuple[float, float] = (0.05, 0.2)
    split_photon_angle: float = 0.01
    photon_merge_angle: float = 0.008  # ~1.7 cm (3 cells of 5.1 mm) at the CLD ECAL inner radius of 2.15 m
    overlay_rate: float = 2.0  # soft gamma gamma -> hadrons particles per event (Poisson mean)
    overlay_pt_mean: float = 0.4  # exponential pT spectrum ...
    overlay_max_abs_eta: float = 3.0  # ... flat in eta
    overlay_fractions: tuple[float, float, float] = (0.5, 0.4, 0.1)  # charged pions, photons, K0L


REALISTIC = Effects()

# Candidate origins, counted per effect (`reconstruct`'s second result).
ORIGINS = ("particle", "lost_track_neutral", "fake_track", "split_neutral", "split_photon", "overlay")


@dataclass
class _Particles:
    """Visible particles (generated and overlaid) as flat arrays, sorted by event."""

    event: np.ndarray
    px: np.ndarray
    py: np.ndarray
    pz: np.ndarray
    e: np.ndarray
    pid: np.ndarray
    charge: np.ndarray
    vx: np.ndarray
    vy: np.ndarray
    vz: np.ndarray
    overlay: np.ndarray

    def take(self, index) -> _Particles:
        return _Particles(**{k: v[index] for k, v in vars(self).items()})


def _concat(a: _Particles, b: _Particles) -> _Particles:
    joined = _Particles(**{k: np.concatenate([getattr(a, k), getattr(b, k)]) for k in vars(a)})
    return joined.take(np.argsort(joined.event, kind="stable"))


def overlay_particles(rng: np.random.Generator, n_events: int, fx: Effects) -> _Particles:
    """Soft gamma gamma -> hadrons particles: Poisson(rate) per event, exponential pT, flat eta, own vertex."""
    counts = rng.poisson(fx.overlay_rate, n_events) if fx.overlay_rate > 0 else np.zeros(n_events, np.int64)
    n = int(counts.sum())
    event = np.repeat(np.arange(n_events), counts)
    pt = rng.exponential(fx.overlay_pt_mean, n)
    eta = rng.uniform(-fx.overlay_max_abs_eta, fx.overlay_max_abs_eta, n)
    phi = rng.uniform(-np.pi, np.pi, n)
    kind = rng.choice(3, size=n, p=np.asarray(fx.overlay_fractions) / sum(fx.overlay_fractions))
    sign = np.where(rng.random(n) < 0.5, 1, -1)
    pid = np.where(kind == 0, 211 * sign, np.where(kind == 1, 22, 130)).astype(np.int64)
    mass = np.choose(kind, [PION_MASS, 0.0, K0L_MASS])
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    vertex = rng.standard_normal((n, 3)) * (fx.beam_spot_x, fx.beam_spot_y, fx.beam_spot_z)
    return _Particles(event, px, py, pz, np.sqrt(px**2 + py**2 + pz**2 + mass**2), pid,
                      np.where(kind == 0, sign, 0).astype(np.float64), vertex[:, 0], vertex[:, 1], vertex[:, 2],
                      np.ones(n, dtype=bool))


def track_efficiency(fx: Effects, det: Detector, pt, cos_theta) -> np.ndarray:
    """Plateau x low-pT turn-on x forward fall-off (linear in |cos theta| up to the tracker's edge)."""
    low_pt = 1.0 - fx.track_low_pt_loss * np.exp(-np.maximum(pt - det.track_min_pt, 0.0) / fx.track_low_pt_scale)
    edge = np.tanh(det.track_max_abs_eta)  # |cos theta| at |eta| = the acceptance
    beyond = np.clip((np.abs(cos_theta) - fx.track_forward_cos) / (edge - fx.track_forward_cos), 0.0, 1.0)
    return fx.track_efficiency * low_pt * (1.0 - beyond * (1.0 - fx.track_forward_efficiency))


def close_pairs(event: np.ndarray, ux, uy, uz, max_angle: float) -> tuple[np.ndarray, np.ndarray]:
    """All ordered pairs (i, j), i != j, of the same event whose unit vectors are closer than `max_angle`.

    `event` must be sorted; the pairs of every event are enumerated at once (sum of n^2, small here)."""
    counts = np.bincount(event) if len(event) else np.zeros(0, np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    size = counts[event]
    first = np.repeat(np.arange(len(event)), size)
    offsets = np.concatenate([[0], np.cumsum(size)[:-1]]).astype(np.int64)
    second = starts[event][first] + np.arange(len(first)) - np.repeat(offsets, size)
    cos = ux[first] * ux[second] + uy[first] * uy[second] + uz[first] * uz[second]
    keep = (first != second) & (cos > np.cos(max_angle))
    return first[keep], second[keep]


def merge_photons(p: _Particles, fx: Effects) -> tuple[_Particles, int]:
    """Photons closer than `photon_merge_angle` become one: each joins its most energetic close neighbour (chains
    followed to the end), 4-momenta summed. Returns the particles left and how many photons were absorbed."""
    photon = np.flatnonzero(p.pid == 22)
    if len(photon) < 2:
        return p, 0
    norm = np.maximum(np.sqrt(p.px[photon] ** 2 + p.py[photon] ** 2 + p.pz[photon] ** 2), 1e-12)
    a, b = close_pairs(p.event[photon], p.px[photon] / norm, p.py[photon] / norm, p.pz[photon] / norm,
                       fx.photon_merge_angle)
    energy = p.e[photon]
    harder = (energy[b] > energy[a]) | ((energy[b] == energy[a]) & (b < a))
    a, b = a[harder], b[harder]
    parent = np.arange(len(photon))
    best = np.full(len(photon), -np.inf)
    np.maximum.at(best, a, energy[b])
    chosen = energy[b] == best[a]
    parent[a[chosen]] = b[chosen]  # ties in energy: any of them
    for _ in range(64):  # energies rise along a chain, so it ends; follow it to the root
        grand = parent[parent]
        if np.array_equal(grand, parent):
            break
        parent = grand
    root = photon[parent]
    absorbed = photon[parent != np.arange(len(photon))]
    for name in ("px", "py", "pz", "e"):
        values = getattr(p, name)
        np.add.at(values, root[parent != np.arange(len(photon))], values[absorbed])
    keep = np.ones(len(p.event), dtype=bool)
    keep[absorbed] = False
    return p.take(keep), len(absorbed)


def _fragments(p: _Particles, source: np.ndarray, fraction, angle: float, pid: int, rng) -> _Particles:
    """Neutral fragments of the particles `source`: `fraction` of their energy, direction smeared by `angle`."""
    e = p.e[source] * fraction
    eta = eta_of(p.px[source], p.py[source], p.pz[source]) + angle * rng.standard_normal(len(source))
    phi = np.arctan2(p.py[source], p.px[source]) + angle * rng.standard_normal(len(source))
    pt = e / np.cosh(eta)
    zeros = np.zeros(len(source))
    return _Particles(p.event[source], pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta), e,
                      np.full(len(source), pid, np.int64), zeros, zeros, zeros, zeros, p.overlay[source])


def _generated(record: Record, rng: np.random.Generator, fx: Effects) -> tuple[_Particles, np.ndarray]:
    """The visible stable particles of `record`, vertices moved by each event's beam-spot offset; the offsets."""
    stable = np.flatnonzero(record.is_visible_final)
    spot = rng.standard_normal((record.n_events, 3)) * (fx.beam_spot_x, fx.beam_spot_y, fx.beam_spot_z)
    event = record.event[stable]
    return _Particles(event, record.px[stable], record.py[stable], record.pz[stable], record.e[stable],
                      record.pid[stable], record.charge[stable], record.vx[stable] + spot[event, 0],
                      record.vy[stable] + spot[event, 1], record.vz[stable] + spot[event, 2],
                      np.zeros(len(stable), dtype=bool)), spot


def reconstruct(record: Record, rng: np.random.Generator, fx: Effects = REALISTIC, det: Detector = CLD,
                ) -> tuple[Candidates, dict[str, int]]:
    """PF candidates of the realistic detector (impact parameters not yet signed: `sign_impact_parameters`) and
    the count of candidates of each origin (`ORIGINS`) plus photons merged and tracks lost."""
    generated, spot = _generated(record, rng, fx)
    p = _concat(generated, overlay_particles(rng, record.n_events, fx))
    pv_z = spot[:, 2] + fx.vertex_z_resolution * rng.standard_normal(record.n_events)

    pt = np.hypot(p.px, p.py)
    momentum = np.maximum(np.sqrt(pt**2 + p.pz**2), 1e-12)
    eta = eta_of(p.px, p.py, p.pz)
    charged = p.charge != 0
    accepted = (charged & (pt > det.track_min_pt) & (np.abs(eta) < det.track_max_abs_eta)
                & (np.hypot(p.vx, p.vy) < det.track_max_vertex_radius))
    efficient = rng.random(len(pt)) < track_efficiency(fx, det, pt, p.pz / momentum)
    tracked = np.flatnonzero(accepted & efficient)
    lost = np.flatnonzero(accepted & ~efficient)

    # tracks: smeared like the ideal detector's
    tpt = smear_relative(rng, pt[tracked], quadrature(det.track_pt_a * pt[tracked], det.track_pt_b))
    teta = eta[tracked] + det.track_angle * rng.standard_normal(len(tracked))
    tphi = np.arctan2(p.py[tracked], p.px[tracked]) + det.track_angle * rng.standard_normal(len(tracked))
    d0, z0 = impact_parameters(p.vx[tracked], p.vy[tracked], p.vz[tracked], p.px[tracked], p.py[tracked],
                               p.pz[tracked])
    d0err, z0err = impact_parameter_errors(det, tpt * np.cosh(teta), 1.0 / np.cosh(teta))
    d0 = d0 + d0err * rng.standard_normal(len(tracked))
    dz = z0 + z0err * rng.standard_normal(len(tracked)) - pv_z[p.event[tracked]]
    pid = reduced_charged_pid(p.pid[tracked], p.charge[tracked])
    tcharge = p.charge[tracked]
    tevent = p.event[tracked]
    torigin = np.where(p.overlay[tracked], ORIGINS.index("overlay"), 0)

    # fake tracks, each built next to a real one
    n_fake = rng.binomial(len(tracked), fx.fake_track_rate) if len(tracked) else 0
    near = rng.integers(0, max(len(tracked), 1), n_fake)
    fpt = det.track_min_pt + rng.exponential(fx.fake_track_pt_mean, n_fake)
    feta = teta[near] + fx.fake_track_angle * rng.standard_normal(n_fake)
    fphi = tphi[near] + fx.fake_track_angle * rng.standard_normal(n_fake)
    fd0err, fz0err = impact_parameter_errors(det, fpt * np.cosh(feta), 1.0 / np.cosh(feta))
    fcharge = np.where(rng.random(n_fake) < 0.5, 1.0, -1.0)
    tpt, teta, tphi = (np.concatenate([tpt, fpt]), np.concatenate([teta, feta]), np.concatenate([tphi, fphi]))
    d0 = np.concatenate([d0, fx.fake_track_ip_width * rng.standard_normal(n_fake)])
    dz = np.concatenate([dz, fx.fake_track_ip_width * rng.standard_normal(n_fake)])
    d0err, z0err = np.concatenate([d0err, fd0err]), np.concatenate([z0err, fz0err])
    pid = np.concatenate([pid, 211 * fcharge.astype(np.int64)])
    tcharge = np.concatenate([tcharge, fcharge])
    tevent = np.concatenate([tevent, tevent[near]])
    torigin = np.concatenate([torigin, np.full(n_fake, ORIGINS.index("fake_track"))])
    mass = np.where(np.abs(pid) == 11, ELECTRON_MASS, np.where(np.abs(pid) == 13, MUON_MASS, PION_MASS))

    # calorimeter deposits: untracked particles (muons without a track are lost) and split-off fragments
    hadron = tracked[np.abs(p.pid[tracked]) > 100]
    p_split = fx.split_neutral_max * p.e[hadron] / (p.e[hadron] + fx.split_neutral_half)
    neutral_src = hadron[rng.random(len(hadron)) < p_split]
    photon_src = hadron[(p.e[hadron] > fx.split_photon_min_e) & (rng.random(len(hadron)) < fx.split_photon_probability)]
    calo = np.ones(len(pt), dtype=bool)
    calo[tracked] = False
    calo &= np.abs(p.pid) != 13
    deposits = p.take(calo)
    lost_charged = deposits.charge != 0
    deposits.pid = np.where(lost_charged, np.where(np.abs(deposits.pid) == 11, 22, 130), deposits.pid)
    origin_mark = np.where(deposits.overlay, ORIGINS.index("overlay"),
                           np.where(lost_charged, ORIGINS.index("lost_track_neutral"), 0))
    split_n = _fragments(p, neutral_src, rng.uniform(*fx.split_neutral_fraction, len(neutral_src)),
                         fx.split_neutral_angle, 130, rng)
    split_g = _fragments(p, photon_src, rng.uniform(*fx.split_photon_fraction, len(photon_src)),
                         fx.split_photon_angle, 22, rng)
    # the origin travels in `vx` (deposits have no vertex) through the sort and the photon merging
    deposits.vx = origin_mark.astype(np.float64)
    split_n.vx[:] = ORIGINS.index("split_neutral")
    split_g.vx[:] = ORIGINS.index("split_photon")
    deposits = _concat(_concat(deposits, split_n), split_g)
    deposits, n_merged = merge_photons(deposits, fx)

    em = deposits.pid == 22
    energy = deposits.e
    sigma = np.where(em, calo_resolution(energy, det.ecal_stochastic, det.ecal_constant),
                     calo_resolution(energy, det.hcal_stochastic, det.hcal_constant))
    e_meas = smear_relative(rng, energy, sigma)
    angle = np.where(em, det.photon_angle, det.hadron_angle)
    ceta = eta_of(deposits.px, deposits.py, deposits.pz) + angle * rng.standard_normal(len(energy))
    cphi = np.arctan2(deposits.py, deposits.px) + angle * rng.standard_normal(len(energy))
    seen = (np.abs(ceta) < det.calo_max_abs_eta) & (e_meas > np.where(em, det.photon_min_e, det.hadron_min_e))
    cpt = e_meas[seen] / np.cosh(ceta[seen])

    tpx, tpy, tpz = tpt * np.cos(tphi), tpt * np.sin(tphi), tpt * np.sinh(teta)
    zeros = np.zeros(int(seen.sum()))
    event = np.concatenate([tevent, deposits.event[seen]])
    order = np.argsort(event, kind="stable")
    origin = np.concatenate([torigin, deposits.vx[seen].astype(np.int64)])
    candidates = Candidates(
        gen=np.full(len(event), -1),
        event=event[order],
        px=np.concatenate([tpx, cpt * np.cos(cphi[seen])])[order],
        py=np.concatenate([tpy, cpt * np.sin(cphi[seen])])[order],
        pz=np.concatenate([tpz, cpt * np.sinh(ceta[seen])])[order],
        e=np.concatenate([np.sqrt(tpx**2 + tpy**2 + tpz**2 + mass**2), e_meas[seen]])[order],
        charge=np.concatenate([tcharge, zeros])[order],
        pid=np.concatenate([pid, np.where(em[seen], 22, 130)])[order],
        d0=np.concatenate([d0, zeros])[order],
        d0err=np.concatenate([d0err, zeros])[order],
        dz=np.concatenate([dz, zeros])[order],
        dzerr=np.concatenate([z0err, zeros])[order],
    )
    counts = {name: int(np.sum(origin == i)) for i, name in enumerate(ORIGINS)}
    counts.update(photons_merged=n_merged, tracks_lost=len(lost), tracks_real=len(tracked),
                  split_neutral_made=len(neutral_src), split_photon_made=len(photon_src))
    return candidates, counts


def sign_impact_parameters(candidates: Candidates, jets: Jets) -> Candidates:
    """d0 and dz of the jets' charged constituents signed as lifetime taggers do (ATLAS, Eur. Phys. J. C 79 (2019)
    970): d0 is + when the point of closest approach lies on the jet's side of the beam line, dz is + when the
    track crosses the jet axis in front of the primary vertex, sign(dz) = sign((eta_jet - eta_track) dz).

    With n = (t_y, -t_x) the normal to the track's transverse direction t, the point of closest approach is d0 n, so
    the signed d0 is d0 * sign(n . jet). Candidates outside every jet keep their unsigned values."""
    members = jets.constituents
    jet = jets.constituent_jet
    px, py, pz = candidates.px[members], candidates.py[members], candidates.pz[members]
    pt = np.maximum(np.hypot(px, py), 1e-12)
    normal_dot_jet = (py * jets.px[jet] - px * jets.py[jet]) / pt
    track_eta = np.arcsinh(pz / pt)
    d0, dz = candidates.d0.copy(), candidates.dz.copy()
    d0[members] = d0[members] * np.where(normal_dot_jet >= 0, 1.0, -1.0)
    dz[members] = dz[members] * np.where(jets.eta[jet] - track_eta >= 0, 1.0, -1.0)
    signed = Candidates(**vars(candidates))
    signed.d0, signed.dz = d0, dz
    return signed
