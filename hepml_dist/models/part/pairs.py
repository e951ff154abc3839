"""Pairwise interaction features of ParT (arXiv:2202.03772 eq. 3), computed from 4-vectors on the model's device.

For particles a, b with (px, py, pz, E) the features are, in this channel order,
    ln kT = ln(min(pT_a, pT_b) * Delta),   ln z = ln(min(pT_a, pT_b) / (pT_a + pT_b)),
    ln Delta,   ln m^2 = ln((E_a + E_b)^2 - |p_a + p_b|^2),
with Delta = sqrt(Delta_y^2 + Delta_phi^2) in *rapidity* y (not pseudorapidity) and Delta_phi wrapped to [-pi, pi).
Every argument of a logarithm is clamped to >= 1e-8, as in weaver-core's `pairwise_lv_fts` (pp type), so padded or
collinear pairs give finite values. The features are symmetric in (a, b).

`PairEmbedding` turns them into ParT's attention bias: one value per head and pair.
"""

import math

import torch
from torch import nn

from hepml_dist.models.blocks import masked_batch_norm

EPS = 1e-8
NUM_PAIR_FEATURES = 4


def pt_rapidity_phi(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pT, y, phi) of 4-vectors whose last axis is (px, py, pz, E)."""
    px, py, pz, energy = vectors.unbind(-1)
    pt = torch.sqrt(px.square() + py.square())  # not hypot: ONNX has no such operator
    # y = 1/2 ln((E + pz) / (E - pz)) written as ln(1 + 2 pz / (E - pz)) like the reference; the extra clamp only
    # matters for unphysical inputs (E < |pz| after rounding) where the reference would give NaN.
    rapidity = 0.5 * torch.log((1 + 2 * pz / (energy - pz).clamp(min=1e-20)).clamp(min=1e-20))
    # ONNX exports atan2 as atan(y / x): keep (0, 0), i.e. padding, away from 0 / 0.
    px = torch.where((px == 0) & (py == 0), torch.ones_like(px), px)
    return pt, rapidity, torch.atan2(py, px)


def wrap_phi(dphi: torch.Tensor) -> torch.Tensor:
    return (dphi + math.pi) % (2 * math.pi) - math.pi


@torch.no_grad()
def pair_features(vectors_a: torch.Tensor, vectors_b: torch.Tensor, same: torch.Tensor | None = None) -> torch.Tensor:
    """[..., 4] (ln kT, ln z, ln Delta, ln m^2) for broadcastable 4-vector tensors [..., 4] (px, py, pz, E).

    Always in float32 and outside autocast: the logarithms of small differences need the precision. `same`
    (bool, broadcastable to [...]) marks pairs of a particle with itself: their Delta is exactly 0 (compiled
    kernels may compute the two rapidities of one particle differently in the last bit, and ln Delta of a
    round-off difference is far from ln EPS).
    """
    with torch.autocast(device_type=vectors_a.device.type, enabled=False):
        a, b = vectors_a.float(), vectors_b.float()
        pt_a, y_a, phi_a = pt_rapidity_phi(a)
        pt_b, y_b, phi_b = pt_rapidity_phi(b)
        delta = torch.sqrt((y_a - y_b).square() + wrap_phi(phi_a - phi_b).square())
        if same is not None:
            delta = delta.masked_fill(same, 0.0)
        pt_min = torch.minimum(pt_a, pt_b)
        ln_kt = torch.log((pt_min * delta).clamp(min=EPS))
        ln_z = torch.log((pt_min / (pt_a + pt_b).clamp(min=EPS)).clamp(min=EPS))
        ln_delta = torch.log(delta.clamp(min=EPS))
        total = a + b
        m2 = total[..., 3].square() - total[..., :3].square().sum(-1)
        ln_m2 = torch.log(m2.clamp(min=EPS))
        return torch.stack((ln_kt, ln_z, ln_delta, ln_m2), dim=-1)


class PairEmbedding(nn.Module):
    """Pair features -> BN -> [Linear -> BN -> GELU] per width -> Linear -> BN (-> GELU): one bias per head.

    The Linear layers act on pairs like weaver's 1x1 Conv1d (same parameters and default initialisation).
    """

    def __init__(self, dims: list[int], num_heads: int, pre_activation: bool):
        super().__init__()
        layers: list[nn.Module] = [nn.BatchNorm1d(NUM_PAIR_FEATURES)]
        input_dim = NUM_PAIR_FEATURES
        for dim in [*dims, num_heads]:
            layers += [nn.Linear(input_dim, dim), nn.BatchNorm1d(dim), nn.GELU()]
            input_dim = dim
        if pre_activation:  # Sophon: no activation after the last layer
            layers.pop()
        self.layers = nn.Sequential(*layers)
        self.num_heads = num_heads

    def forward(
        self, vectors: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype, layout: str = "sparse"
    ) -> torch.Tensor:
        """vectors [B, 4, P], mask [B, P] -> U [B, H, P, P] in `dtype`; zero on pairs with a padded particle.

        `layout`: "sparse" embeds the real a >= b pairs (data-dependent count); "triangle" every a >= b pair of the
        padded batch (static shapes, for torch.compile); "square" every (a, b) pair (static, for the ONNX export,
        which cannot trace torch.tril_indices of a dynamic length)."""
        batch, length = mask.shape
        v = vectors.transpose(1, 2)
        if layout != "sparse":
            if layout == "triangle":
                rows, cols = torch.tril_indices(length, length, device=mask.device)
                pairs = pair_features(v[:, rows], v[:, cols], same=rows == cols)  # [B, T, 4]
                counted = mask[:, rows] & mask[:, cols]
            else:
                position = torch.arange(length, device=mask.device)
                itself = position[:, None] == position[None, :]  # (not torch.eye: ONNX Runtime has no bool EyeLike)
                pairs = pair_features(v[:, :, None, :], v[:, None, :, :], same=itself)
                # BatchNorm statistics over the pairs the sparse path embeds: real ones with a >= b
                counted = (mask[:, :, None] & mask[:, None, :]).tril()
            u = pairs.reshape(-1, NUM_PAIR_FEATURES)
            for layer in self.layers:
                u = masked_batch_norm(layer, u, counted.reshape(-1)) if isinstance(layer, nn.BatchNorm1d) else layer(u)
            if layout == "triangle":
                u = u.view(batch, -1, self.num_heads)
                square = u.new_zeros(batch, length, length, self.num_heads)
                square[:, rows, cols] = u
                square[:, cols, rows] = u
                u = square
            else:
                u = u.view(batch, length, length, -1)
            pair_mask = mask[:, :, None, None] & mask[:, None, :, None]
            return u.masked_fill(~pair_mask, 0.0).permute(0, 3, 1, 2).to(dtype)  # as the sparse path
        # The features are symmetric in (a, b): embed each real pair with a >= b once, then mirror it.
        pair_mask = (mask[:, :, None] & mask[:, None, :]).tril()
        b, i, j = pair_mask.nonzero(as_tuple=True)
        u = self.layers(pair_features(v[b, i], v[b, j])).to(dtype)
        out = u.new_zeros(batch, self.num_heads, length, length)
        out_view = out.permute(0, 2, 3, 1)
        out_view[b, i, j] = u
        out_view[b, j, i] = u
        return out
