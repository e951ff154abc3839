"""Small layers shared by the OmniJet-alpha and MLPF families: masked multi-head attention on SDPA, feed-forward blocks.

Masks are boolean `[B, L]` with True for real entries. Attention always passes a key mask to
`scaled_dot_product_attention`, so padded keys never contribute; SDPA then picks a kernel that supports masks
(memory-efficient or math), never the mask-less flash path that makes outputs depend on the amount of padding.
"""

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "elu": nn.ELU, "silu": nn.SiLU}


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


def broadcast_from_rank0(*tensors: torch.Tensor) -> None:
    """Make data-dependent state updates (codebook init and refresh) identical on every rank.

    DDP synchronises gradients, not in-place edits of parameters, so a codebook that each rank re-seeds from its own
    batch would drift apart. A no-op without an initialised process group (single device, tests).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        for tensor in tensors:
            torch.distributed.broadcast(tensor, src=0)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a small statistics tensor (codebook hit counts) over ranks; identity on a single device."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(tensor)
    return tensor
