"""OmniJet-alpha constituent preprocessing and token sequences, vectorised over jets (numpy).

Preprocessing (omnijet_alpha `experiment_tokenization_transformer.yaml`, confirmed against the released 8192-token
tokenizer): per constituent pT (GeV), Delta eta and Delta phi to the jet axis (the sum of the constituent 4-vectors);
constituents with |Delta eta| >= 0.8 or |Delta phi| >= 0.8 are removed; features are
(log pT - 1.8, 3 Delta eta, 3 Delta phi). The `omnijet_constituents` feature set of the loader must produce the same.

Token sequences: [start 0] + (code + 1 per constituent) + [stop K + 1], padded with 0 to a fixed length.
"""

import numpy as np

PT_OFFSET, ANGLE_SCALE, ANGLE_CUT = 1.8, 3.0, 0.8
START = 0


def _wrap(phi: np.ndarray) -> np.ndarray:
    return (phi + np.pi) % (2 * np.pi) - np.pi


def compact(values: list[np.ndarray], keep: np.ndarray, length: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Move the kept entries of each row to the front (order preserved) and cut the rows to `length`."""
    order = np.argsort(~keep, axis=1, kind="stable")[:, :length]
    kept = np.take_along_axis(keep, order, axis=1)
    return [np.where(kept, np.take_along_axis(v, order, axis=1), 0) for v in values], kept


def constituent_features(columns: dict[str, np.ndarray], max_constituents: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokenizer inputs `features [N, 3, P]` (float32) and `mask [N, P]` (bool) from stored jet columns.

    Uses `part_px, part_py, part_pz, part_energy` [N, P'] and `part_n` [N]; at most `max_constituents` survive
    (the stored order, pT-descending, decides which).
    """
    px, py, pz, energy = (np.asarray(columns[f"part_{k}"], dtype=np.float64) for k in ("px", "py", "pz", "energy"))
    real = np.arange(px.shape[1])[None, :] < np.asarray(columns["part_n"])[:, None]
    px, py, pz, energy = (np.where(real, v, 0.0) for v in (px, py, pz, energy))
    jet_px, jet_py, jet_pz = px.sum(1, keepdims=True), py.sum(1, keepdims=True), pz.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        jet_eta = np.arcsinh(jet_pz / np.hypot(jet_px, jet_py))
        pt = np.hypot(px, py)
        eta_rel = np.arcsinh(pz / pt) - jet_eta
        phi_rel = _wrap(np.arctan2(py, px) - np.arctan2(jet_py, jet_px))
        log_pt = np.log(pt) - PT_OFFSET
    keep = real & (pt > 0) & (np.abs(eta_rel) < ANGLE_CUT) & (np.abs(phi_rel) < ANGLE_CUT)
    (log_pt, eta_rel, phi_rel), mask = compact([log_pt, eta_rel, phi_rel], keep, max_constituents)
    features = np.stack([log_pt, ANGLE_SCALE * eta_rel, ANGLE_SCALE * phi_rel], axis=1).astype(np.float32)
    return features, mask


def physical_constituents(features: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    """Inverse preprocessing: `part_pt` (GeV), `part_etarel`, `part_phirel` [N, P], 0 in padding."""
    return {
        "part_pt": np.where(mask, np.exp(features[:, 0] + PT_OFFSET), 0.0).astype(np.float32),
        "part_etarel": np.where(mask, features[:, 1] / ANGLE_SCALE, 0.0).astype(np.float32),
        "part_phirel": np.where(mask, features[:, 2] / ANGLE_SCALE, 0.0).astype(np.float32),
    }


def codes_to_tokens(codes: np.ndarray, mask: np.ndarray, codebook_size: int, length: int) -> tuple[np.ndarray, np.ndarray]:
    """Token sequences `tokens [N, length]` (int32) and their lengths `tokens_n` (start and stop included).

    Jets with more than length - 2 constituents keep the first length - 2 (the hardest).
    """
    n = np.minimum(mask.sum(1), length - 2)
    slot = np.arange(length)[None, :]
    body = np.zeros((len(codes), length), dtype=np.int64)
    width = min(codes.shape[1], length - 1)
    body[:, 1 : width + 1] = codes[:, :width] + 1
    tokens = np.where(slot <= n[:, None], body, 0)
    tokens[:, 0] = START
    tokens[np.arange(len(codes)), n + 1] = codebook_size + 1
    return tokens.astype(np.int32), (n + 2).astype(np.int32)


def tokens_to_codes(tokens: np.ndarray, codebook_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Codebook indices [N, L-1] and mask from token sequences: drop the start token, stop at the first stop token."""
    body = tokens[:, 1:]
    stop = codebook_size + 1
    stopped = np.cumsum((body == stop) | (body == START), axis=1) > 0
    mask = ~stopped
    return np.where(mask, body - 1, 0).astype(np.int64), mask
