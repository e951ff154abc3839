"""Pythia 8 as a batch source: configured generators and flat numpy views of many events at once.

`nextBatch` hands back an awkward array of whole event records; `Record` flattens it into one numpy array per
particle property (all events concatenated), with mother/daughter links turned into indices into those flat arrays.
Every process builds on this, so nothing on the hot path calls Pythia once per particle.
"""

from __future__ import annotations

from dataclasses import dataclass

import awkward as ak
import numpy as np

from hepml_dist.extras import require

NEUTRINOS = (12, 14, 16)
MAX_PYTHIA_SEED = 900_000_000  # Random:seed must lie in [0, 900000000]


def common_settings(init_seed: int) -> list[str]:
    """Settings every generator gets: quiet, our seed, and decays with vertices (mm) for long-lived particles."""
    return [
        "Print:quiet = on",
        "Next:numberCount = 0",
        "Random:setSeed = on",
        f"Random:seed = {init_seed}",
        # Decay everything Pythia decays by default (tau, B, D, K0S, Lambda, ...) and keep the decay vertices: the
        # impact parameters of their daughters are the lifetime information the taggers learn from. Only particles
        # with c*tau0 > 1 m (pi+-, K+-, K0L, n, mu) are left to the detector, as in a real experiment.
        "ParticleDecays:limitTau0 = on",
        "ParticleDecays:tau0Max = 1000",
    ]


def _new_pythia():
    return require("pythia8mc").Pythia("", False)  # the `gen` extra: only generating needs it


def check_settings(settings) -> None:
    """Raise ValueError naming the first setting Pythia does not accept (checked without initialising)."""
    pythia = _new_pythia()
    for line in settings:
        if not pythia.readString(line):
            raise ValueError(f"Pythia rejected the setting {line!r} (expected 'Key = value', see the Pythia 8 "
                             "manual for the key)")


def make_pythia(settings: list[str], init_seed: int):
    """An initialised Pythia with `settings` (plus the common ones); a bad setting raises ValueError naming it."""
    pythia = _new_pythia()
    for line in [*common_settings(init_seed), *settings]:
        if not pythia.readString(line):
            raise ValueError(f"Pythia rejected the setting {line!r}")
    if not pythia.init():
        raise RuntimeError(f"Pythia failed to initialise with settings {settings}")
    return pythia


def reseed(pythia, seed: int) -> None:
    """Restart Pythia's random stream: what follows depends only on `seed` (and the generator's settings)."""
    pythia.rndm.init(int(seed) % MAX_PYTHIA_SEED)


_CHARGE3: dict[int, int] = {}  # PDG id -> 3 x charge, filled from Pythia's particle table as ids appear


def charges(pdg: np.ndarray, particle_data) -> np.ndarray:
    """Electric charge of each PDG id (looked up in Pythia's particle table once per distinct id)."""
    ids, inverse = np.unique(pdg, return_inverse=True)
    for i in ids.tolist():
        if i not in _CHARGE3:
            _CHARGE3[i] = int(particle_data.chargeType(i))
    table = np.array([_CHARGE3[i] for i in ids.tolist()], dtype=np.float64) / 3.0
    return table[inverse].reshape(pdg.shape)


@dataclass
class Record:
    """Many Pythia events as flat particle arrays; links (`mother1`, `daughter1`, ...) are flat indices, -1 = none.

    `event` gives each particle's event number, `offsets[i]:offsets[i+1]` the particles of event i (index 0 of each
    event is Pythia's system line). Vertices `vx, vy, vz` are production vertices in mm; momenta in GeV.
    """

    n_events: int
    offsets: np.ndarray
    event: np.ndarray
    pid: np.ndarray
    status: np.ndarray
    mother1: np.ndarray
    daughter1: np.ndarray
    daughter2: np.ndarray
    px: np.ndarray
    py: np.ndarray
    pz: np.ndarray
    e: np.ndarray
    m: np.ndarray
    vx: np.ndarray
    vy: np.ndarray
    vz: np.ndarray
    charge: np.ndarray

    @property
    def pt(self) -> np.ndarray:
        return np.hypot(self.px, self.py)

    @property
    def is_final(self) -> np.ndarray:
        return self.status > 0

    @property
    def is_visible_final(self) -> np.ndarray:
        """Stable particles a detector can see (everything but neutrinos)."""
        return (self.status > 0) & ~np.isin(np.abs(self.pid), NEUTRINOS)

    def daughters(self, index: int) -> np.ndarray:
        """Flat indices of the daughters of particle `index` (Pythia's daughter1..daughter2 range convention)."""
        d1, d2 = int(self.daughter1[index]), int(self.daughter2[index])
        if d1 < 0:
            return np.empty(0, dtype=np.int64)
        if d2 < 0 or d2 == d1:
            return np.array([d1])
        if d2 > d1:
            return np.arange(d1, d2 + 1)
        return np.array([d2, d1])  # d2 < d1: two separate daughters

    def last_copy(self, index: int) -> int:
        """Follow a particle down its chain of copies (recoil, shower) to the copy that decays."""
        pid = self.pid[index]
        while True:
            same = [d for d in self.daughters(index) if self.pid[d] == pid]
            if not same:
                return index
            index = same[0]


def from_batch(batch, particle_data) -> Record:
    """Flatten `Pythia.nextBatch` output into a Record."""
    prt = batch.prt
    counts = ak.to_numpy(ak.num(prt)).astype(np.int64)
    offsets = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    flat = ak.flatten(prt)
    event = np.repeat(np.arange(len(counts)), counts)
    base = offsets[:-1][event]

    def link(field: str) -> np.ndarray:
        local = ak.to_numpy(flat[field]).astype(np.int64)
        return np.where(local > 0, local + base, -1)

    def num(array) -> np.ndarray:
        return ak.to_numpy(ak.fill_none(array, 0.0)).astype(np.float64)

    pid = ak.to_numpy(flat.id).astype(np.int64)
    vertex = flat.vProd  # None where Pythia left the vertex at the origin
    return Record(
        n_events=len(counts),
        offsets=offsets,
        event=event,
        pid=pid,
        status=ak.to_numpy(flat.status).astype(np.int64),
        mother1=link("mother1"),
        daughter1=link("daughter1"),
        daughter2=link("daughter2"),
        px=num(flat.p.px),
        py=num(flat.p.py),
        pz=num(flat.p.pz),
        e=num(flat.p.e),
        m=num(flat.m),
        vx=num(vertex.px),
        vy=num(vertex.py),
        vz=num(vertex.pz),
        charge=charges(pid, particle_data),
    )


def generate(pythia, n_events: int) -> Record:
    """Generate `n_events` events (failed ones are retried by Pythia's 'skip' mode) as a Record."""
    return from_batch(pythia.nextBatch(n_events), pythia.particleData)


def visible_momentum(record: Record, index: int) -> np.ndarray:
    """(px, py, pz, E) of a decayed particle minus its neutrino daughters (the visible tau, for example)."""
    p4 = np.array([record.px[index], record.py[index], record.pz[index], record.e[index]])
    for d in record.daughters(index):
        if abs(record.pid[d]) in NEUTRINOS:
            p4 -= (record.px[d], record.py[d], record.pz[d], record.e[d])
    return p4
