"""Building blocks shared by the model families, single-device and free of distributed code.

Two kinds of attention live here:
- the ParT blocks (`Attention`, `Block`, `ClassAttentionPathway`, `ParticleEmbedding`; used by ParT and its
  descendants and by the AnalysisObjectTransformer): attention with an additive float bias (pair features and the
  padding mask folded into one tensor), and per-token layers that may run on the real tokens only (`Packing`);
- `MultiHeadAttention` with boolean key masks (OmniJet-alpha, MLPF), plus MLPF's feed-forward block.

Masks are boolean `[B, L]` with True for real entries. Attention always passes a key mask (or bias) to
`scaled_dot_product_attention`, so padded keys never contribute; SDPA then picks a kernel that supports masks
(memory-efficient or math), never the mask-less flash path that makes outputs depend on the amount of padding.

`CrossRankState` marks a module whose data-dependent state updates (the OmniJet codebook's k-means start and
dead-code refresh) must agree across data-parallel ranks. The module calls `self.collectives`; the training engine
hands it collectives over its process group (hepml_dist.train.distributed), and on one device they do nothing.
"""

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU, "silu": nn.SiLU}


class Collectives(Protocol):
    """The two collectives a `CrossRankState` module needs."""

    def broadcast_from_rank0(self, *tensors: torch.Tensor) -> None:
        """Make each tensor equal to rank 0's, in place."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a small statistics tensor over ranks, in place; returns it."""


class SingleDevice:
    """Collectives of a model that runs alone: nothing to agree with."""

    def broadcast_from_rank0(self, *tensors: torch.Tensor) -> None:
        pass

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor


class CrossRankState(nn.Module):
    """A module with state updated in place from the data; `collectives` keeps those updates equal on every rank
    (DDP synchronises gradients, not in-place edits of parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.collectives: Collectives = SingleDevice()


# ----------------------------------------------------------------------------------------------------------------
# ParT blocks (arXiv:2202.03772; weaver-core ParticleTransformer), batch-first: x is [B, P, D] or packed [N, D]

def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype matmuls run in here: the autocast dtype when autocast is on, else float32."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return torch.float32


def masked_value(dtype: torch.dtype) -> float:
    # Half the most negative finite value: zero attention weight, yet no overflow to -inf when the scores are added.
    return -0.5 * torch.finfo(dtype).max


def key_padding_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, 1, P] additive attention bias: 0 for real keys, a large negative value for padded ones."""
    bias = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, masked_value(dtype))
    return bias[:, None, None, :]


def masked_batch_norm(norm: nn.BatchNorm1d, x: torch.Tensor, counted: torch.Tensor) -> torch.Tensor:
    """`norm` on rows x [N, C] as if only the rows where `counted` [N] (bool) is true had been passed (the others
    are normalised with the same statistics). In eval mode (running statistics) it is `norm(x)`.

    The statistics are two matrix-vector products and the normalisation one fused multiply-add: x can be
    millions of rows (every pair of a padded batch), where each elementwise pass costs as much as a matmul.
    Rows that are not counted must be finite (they get weight 0)."""
    if not norm.training:
        return norm(x)
    weight = counted.to(x.dtype)
    count = weight.sum()
    mean = (weight @ x) / count
    var = ((weight @ (x * x)) / count - mean * mean).clamp(min=0.0)
    with torch.no_grad():  # as nn.BatchNorm1d: exponential average (momentum), unbiased variance
        norm.num_batches_tracked.add_(1)
        norm.running_mean.lerp_(mean, norm.momentum)
        norm.running_var.lerp_(var * count / (count - 1).clamp(min=1), norm.momentum)
    scale = norm.weight * torch.rsqrt(var + norm.eps)
    return torch.addcmul(norm.bias - mean * scale, x, scale)


@dataclass(frozen=True)
class Packing:
    """Where the real tokens of a padded [B, L] batch are: `index` into the flattened B * L positions (row-major).

    Per-token layers run on the packed rows [N, D] only; attention unpacks to [B, L, D], with zeros in the padding.
    """

    index: torch.Tensor
    batch: int
    length: int

    @staticmethod
    def of(mask: torch.Tensor) -> "Packing":
        return Packing(mask.reshape(-1).nonzero().squeeze(1), *mask.shape)

    def unpack(self, rows: torch.Tensor) -> torch.Tensor:
        dense = rows.new_zeros(self.batch * self.length, rows.shape[-1]).index_copy(0, self.index, rows)
        return dense.view(self.batch, self.length, -1)

    def pack(self, dense: torch.Tensor) -> torch.Tensor:
        return dense.reshape(self.batch * self.length, -1).index_select(0, self.index)


class ParticleEmbedding(nn.Module):
    """BatchNorm over the input channels, then [LayerNorm -> Linear -> GELU] per width (a GELU after the last too)."""

    def __init__(self, input_dim: int, dims: list[int]):
        super().__init__()
        self.input_bn = nn.BatchNorm1d(input_dim)
        layers: list[nn.Module] = []
        for dim in dims:
            layers += [nn.LayerNorm(input_dim), nn.Linear(input_dim, dim), nn.GELU()]
            input_dim = dim
        self.layers = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor, mask: torch.Tensor, packing: Packing | None = None) -> torch.Tensor:
        """features [B, C, P], mask [B, P] (bool) -> the real particles' rows [N, D] with `packing`, else [B, P, D]
        with zeros in the padding (dense code: export and static shapes; BatchNorm statistics of real particles)."""
        x = features.transpose(1, 2)
        if packing is not None:  # BatchNorm statistics of real particles only
            return self.layers(self.input_bn(packing.pack(x)))
        x = masked_batch_norm(self.input_bn, x.reshape(-1, x.shape[-1]), mask.reshape(-1))
        x = self.layers(x).view(*mask.shape, -1)
        return x.masked_fill(~mask[..., None], 0.0)




class Attention(nn.Module):
    """Multi-head attention through `scaled_dot_product_attention` with an additive float bias."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.in_proj = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(
        self, query: torch.Tensor, keys: torch.Tensor | None, bias: torch.Tensor, packing: Packing | None = None
    ) -> torch.Tensor:
        """query [B, Q, D] (or packed rows [N, D]); keys [B, K, D] (None: self-attention on query);
        bias broadcastable to [B, H, Q, K]."""
        if keys is None:
            qkv = self.in_proj(query)
            q, k, v = (packing.unpack(qkv) if packing is not None else qkv).chunk(3, dim=-1)
        else:
            dim = query.shape[-1]
            q = F.linear(query, self.in_proj.weight[:dim], self.in_proj.bias[:dim])
            k, v = F.linear(keys, self.in_proj.weight[dim:], self.in_proj.bias[dim:]).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype), dropout_p=self.dropout if self.training else 0.0
        )
        out = out.transpose(1, 2).flatten(2)
        return self.out_proj(packing.pack(out) if packing is not None else out)


class Block(nn.Module):
    """ParT block: pre-LN attention with a per-"head" output scale and a post-attention LN; FFN with an inner LN and
    a learnable scale on its residual. With `cls` given it is a CaiT class-attention block (raw cls as query)."""

    def __init__(
        self, dim: int, num_heads: int, ffn_ratio: int, dropout: float, attn_dropout: float, activation_dropout: float
    ):
        super().__init__()
        self.num_heads = num_heads
        self.pre_attn_norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, attn_dropout)
        # Scales the out_proj output viewed as num_heads groups of channels (the reference's placement).
        self.c_attn = nn.Parameter(torch.ones(num_heads))
        self.post_attn_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.pre_fc_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, dim * ffn_ratio)
        self.act = nn.GELU()
        self.act_dropout = nn.Dropout(activation_dropout)
        self.post_fc_norm = nn.LayerNorm(dim * ffn_ratio)
        self.fc2 = nn.Linear(dim * ffn_ratio, dim)
        self.w_resid = nn.Parameter(torch.ones(dim))

    def forward(
        self, x: torch.Tensor, bias: torch.Tensor, cls: torch.Tensor | None = None, packing: Packing | None = None
    ) -> torch.Tensor:
        """x [B, P, D], or the packed real particles [N, D] with `packing`; with `cls` [B, 1, D] returns the new cls."""
        if cls is None:
            residual = x
            h = self.attn(self.pre_attn_norm(x), None, bias, packing)
        else:
            residual = cls
            h = self.attn(cls, self.pre_attn_norm(torch.cat((cls, x), dim=1)), bias)
        h = (h.unflatten(-1, (self.num_heads, -1)) * self.c_attn[:, None]).flatten(-2)
        x = residual + self.dropout(self.post_attn_norm(h))
        f = self.fc2(self.post_fc_norm(self.act_dropout(self.act(self.fc1(self.pre_fc_norm(x))))))
        return self.w_resid * x + self.dropout(f)


class ClassAttentionPathway(nn.Module):
    """A learned class token refined by class-attention blocks over the particles, then a final LayerNorm."""

    def __init__(self, dim: int, num_heads: int, ffn_ratio: int, num_layers: int):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(Block(dim, num_heads, ffn_ratio, 0.0, 0.0, 0.0) for _ in range(num_layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, cls_bias: torch.Tensor) -> torch.Tensor:
        """x [B, P, D], cls_bias [B, 1, 1, 1 + P] -> [B, D]."""
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        for block in self.blocks:
            cls = block(x, cls_bias, cls=cls)
        return self.norm(cls.squeeze(1))


def make_head(in_dim: int, hidden: list[int], activation: str, dropout: float, out_dim: int) -> nn.Sequential:
    """[Linear -> activation -> Dropout] per hidden width, then Linear to the task's outputs (no dropout after it)."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), ACTIVATIONS[activation](), nn.Dropout(dropout)]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)




# ----------------------------------------------------------------------------------------------------------------
# Attention with boolean key masks and feed-forward blocks (OmniJet-alpha, MLPF)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with a fused q/k/v projection (same parameter shapes as `nn.MultiheadAttention`).

    Self-attention when `context` is None; cross-attention (e.g. a class token attending to a sequence) otherwise.
    """

    def __init__(self, dim: int, num_heads: int, dropout: float = 0.0, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.out_proj = nn.Linear(dim, dim)

    def forward(
        self,
        x: torch.Tensor,
        key_mask: torch.Tensor,
        context: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """x: queries [B, Lq, D]; key_mask: bool [B, Lk]; context: keys/values [B, Lk, D] (default x)."""
        if context is None:
            q, k, v = self.in_proj(x).chunk(3, dim=-1)
        else:
            sizes = [x.shape[-1], 2 * x.shape[-1]]
            w_q, w_kv = self.in_proj.weight.split(sizes)
            b_q, b_kv = (None, None) if self.in_proj.bias is None else self.in_proj.bias.split(sizes)
            q = F.linear(x, w_q, b_q)
            k, v = F.linear(context, w_kv, b_kv).chunk(2, dim=-1)
        batch, len_q, dim = q.shape
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
        attn_mask = key_mask[:, None, None, :]
        if causal:
            attn_mask = attn_mask & torch.ones(len_q, k.shape[2], dtype=torch.bool, device=q.device).tril()
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, len_q, dim))


def nonempty_key_mask(mask: torch.Tensor) -> torch.Tensor:
    """Key mask with the first key enabled in examples that have no real entry, so softmax never sees only -inf.

    The outputs of such examples are masked away afterwards; this only keeps NaNs out of the backward pass.
    """
    empty = ~mask.any(dim=1, keepdim=True)
    first = torch.zeros_like(mask)
    first[:, 0] = True
    return mask | (empty & first)


def feed_forward(dim_in: int, dim_out: int, width: int, activation: str = "relu", dropout: float = 0.0) -> nn.Sequential:
    """MLPF's `ffn` block: Linear -> activation -> LayerNorm -> Dropout -> Linear."""
    return nn.Sequential(
        nn.Linear(dim_in, width),
        ACTIVATIONS[activation](),
        nn.LayerNorm(width),
        nn.Dropout(dropout),
        nn.Linear(width, dim_out),
    )
