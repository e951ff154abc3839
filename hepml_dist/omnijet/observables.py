"""Jet and constituent observables of OmniJet-alpha jets, from padded constituents in the tokenizer's coordinates.

A jet is `part_pt` (GeV), `part_etarel`, `part_phirel` [N, P] and `mask` [N, P] (what `physical_constituents`
gives). The constituents are massless: shifting every eta by the jet's eta is a boost along the beam and shifting
every phi a rotation, so jet pT and mass computed in these relative coordinates are those of the jet itself (made
of the constituents that survive preprocessing).
"""

import numpy as np

JET_OBSERVABLES = ("multiplicity", "jet_pt", "jet_mass")
CONSTITUENT_OBSERVABLES = ("part_pt", "part_etarel", "part_phirel")
OBSERVABLES = (*JET_OBSERVABLES, *CONSTITUENT_OBSERVABLES)
LABELS = {
    "multiplicity": "constituent multiplicity",
    "jet_pt": r"jet $p_T$ [GeV]",
    "jet_mass": "jet mass [GeV]",
    "part_pt": r"constituent $p_T$ [GeV]",
    "part_etarel": r"constituent $\Delta\eta$",
    "part_phirel": r"constituent $\Delta\phi$",
}

TEXT_LABELS = {  # the same, for HTML tables
    "multiplicity": "constituent multiplicity",
    "jet_pt": "jet p<sub>T</sub> [GeV]",
    "jet_mass": "jet mass [GeV]",
    "part_pt": "constituent p<sub>T</sub> [GeV]",
    "part_etarel": "constituent &Delta;&eta;",
    "part_phirel": "constituent &Delta;&phi;",
}


def jet_kinematics(pt: np.ndarray, etarel: np.ndarray, phirel: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Per jet: `multiplicity`, `jet_pt` and `jet_mass` (GeV) of the massless constituents where `mask`."""
    pt, eta, phi = (np.where(mask, np.asarray(v, dtype=np.float64), 0.0) for v in (pt, etarel, phirel))
    px, py = (pt * np.cos(phi)).sum(1), (pt * np.sin(phi)).sum(1)
    pz, energy = (pt * np.sinh(eta)).sum(1), (pt * np.cosh(eta)).sum(1)
    mass2 = energy**2 - px**2 - py**2 - pz**2
    return {"multiplicity": mask.sum(1).astype(np.float64), "jet_pt": np.hypot(px, py),
            "jet_mass": np.sqrt(np.clip(mass2, 0.0, None))}


def observables(jets: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every observable of OBSERVABLES: one value per jet, or one per constituent (all jets' constituents)."""
    mask = jets["mask"]
    out = jet_kinematics(jets["part_pt"], jets["part_etarel"], jets["part_phirel"], mask)
    out.update({name: np.asarray(jets[name], dtype=np.float64)[mask] for name in CONSTITUENT_OBSERVABLES})
    return out


def select(jets: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    """The jets `rows` (indices or a boolean mask) of padded jet arrays."""
    return {key: value[rows] for key, value in jets.items()}
