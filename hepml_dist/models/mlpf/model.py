"""MLPF (jpata/particleflow v2.2.0, CLIC attention model): per-element particle-flow reconstruction.

Every detector element (track or calorimeter cluster) gets at most one particle: whether one exists, its class, and
its kinematics relative to the element. Batch in: `features [B, 17, E]` (channel 0 = element type: 0 padding,
1 track, 2 cluster; 1 pT or ET, 2 eta, 3 sin phi, 4 cos phi, 5 p or E) and `mask [B, 1, E]`. Outputs, per element
(padding zeroed): `{existence task: [B, E, 2], class task: [B, E, num_classes], regression task: [B, E, T]}` in the
order of the regression task's `targets` (`log_pt_ratio, eta, sin_phi, cos_phi, log_energy_ratio`), plus the scalar
`aux_padding_fraction`.

Layers (same shapes as the reference, 51,577,874 parameters in the CLIC configuration):
- a type-split embedding (one FFN per element type) for each of two branches, identification and regression;
- per branch, `num_convs` attention blocks and a final LayerNorm;
- identification heads: existence and particle class; regression heads: log(pT / pT_elem) and log(E / E_elem) with
  one FFN per element type, and eta, sin phi, cos phi as a * x_elem + b (a skip from the element's own value);
  the energy is built on top of |p| so that E >= |p| (m^2 >= 0) by construction.

The attention block is textbook pre-LN: x + MHA(LN x), then x + FFN(LN x), with FFN = Linear-act-Linear. The v2.2.0
block instead adds the attention output to the *normalised* input (no residual around LN0), makes the last block of
each stack cross-attention from the initial embeddings, and ends its FFN with an activation; particleflow's own
HEAD (PR #462) moved to the pre-LN block as a bug fix. The parameter shapes are identical, so the counts agree, but
v2.2.0 checkpoints are not weight-compatible in function. Attention is SDPA with a key-padding mask on every backend.
"""

import torch
from torch import nn

from hepml_dist.errors import UserError
from hepml_dist.models.blocks import ACTIVATIONS, MultiHeadAttention, feed_forward, nonempty_key_mask
from hepml_dist.spec import JobSpec
from hepml_dist.spec.data import FEATURE_SETS
from hepml_dist.spec.model_mlpf import MlpfModelSpec
from hepml_dist.spec.tasks import TaskSpec

# Element feature channels shared by tracks and clusters (this alignment makes the skip connections possible).
TYPE, PT, ETA, SIN_PHI, COS_PHI, ENERGY = range(6)
REGRESSION_TARGETS = ("log_pt_ratio", "eta", "sin_phi", "cos_phi", "log_energy_ratio")


def task_roles(spec: JobSpec) -> dict[str, TaskSpec]:
    """The job's tasks by role: `existence` (binary), `particle_class` (multiclass), `kinematics` (regression)."""
    by_kind = {kind: [t for t in spec.tasks if t.kind == kind] for kind in ("binary", "multiclass", "regression")}
    if any(len(tasks) != 1 for tasks in by_kind.values()):
        raise UserError(
            f"{spec.name}: MLPF needs exactly one binary (existence), one multiclass (particle class) "
            "and one regression task"
        )
    roles = {
        "existence": by_kind["binary"][0],
        "particle_class": by_kind["multiclass"][0],
        "kinematics": by_kind["regression"][0],
    }
    if sorted(roles["kinematics"].targets or []) != sorted(REGRESSION_TARGETS):
        raise UserError(f"tasks: the MLPF regression task must list the targets {list(REGRESSION_TARGETS)} (any order)")
    if roles["particle_class"].output_dim != spec.model.num_classes:
        task = roles["particle_class"]
        raise UserError(f"tasks: {task.name} has {task.output_dim} classes, model.num_classes is {spec.model.num_classes}")
    return roles


def padding_fraction(mask: torch.Tensor) -> float:
    """Share of padded element slots in a batch (mask [B, 1, E] or [B, E]); the loader's bucketing should keep it low."""
    return 1.0 - float(mask.float().mean())


class AttentionBlock(nn.Module):
    """Pre-LN self-attention block over the elements of an event; padded elements stay zero."""

    def __init__(self, dim: int, num_heads: int, activation: str, dropout: float):
        super().__init__()
        self.norm_attn = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads, dropout)
        self.norm_ffn = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, dim), ACTIVATIONS[activation](), nn.Dropout(dropout), nn.Linear(dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        keep = mask[..., None].to(x.dtype)
        x = x + self.dropout(self.attn(self.norm_attn(x), key_mask)) * keep
        return x + self.dropout(self.ffn(self.norm_ffn(x))) * keep


class AttentionStack(nn.Module):
    def __init__(self, cfg: MlpfModelSpec):
        super().__init__()
        dim = cfg.num_heads * cfg.head_dim
        block = (dim, cfg.num_heads, cfg.activation, cfg.dropout)
        self.blocks = nn.ModuleList(AttentionBlock(*block) for _ in range(cfg.num_convs))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, key_mask: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, mask, key_mask)
        return self.norm(x) * mask[..., None]


class TypeSplit(nn.Module):
    """One FFN per element type; each element takes the output of its own type's FFN (0 for padding)."""

    def __init__(self, num_types: int, dim_in: int, dim_out: int, width: int, activation: str, dropout: float):
        super().__init__()
        self.per_type = nn.ModuleList(feed_forward(dim_in, dim_out, width, activation, dropout) for _ in range(num_types))

    def forward(self, x: torch.Tensor, element_type: torch.Tensor) -> torch.Tensor:
        out = 0
        for t, ffn in enumerate(self.per_type, start=1):
            out = out + ffn(x) * (element_type == t)[..., None].to(x.dtype)
        return out


class LinearSkip(nn.Module):
    """Prediction a * x_elem + b, with (a, b) from an FFN: the element's own eta / sin phi / cos phi as a skip."""

    def __init__(self, dim: int, activation: str, dropout: float):
        super().__init__()
        self.ffn = feed_forward(dim, 2, dim, activation, dropout)

    def forward(self, h: torch.Tensor, x_elem: torch.Tensor) -> torch.Tensor:
        slope, offset = self.ffn(h).unbind(-1)
        return slope * x_elem + offset


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


class KinematicsHead(nn.Module):
    """log(pT/pT_elem), eta, sin phi, cos phi and log(E/E_elem) per element, relative to the element itself."""

    def __init__(self, cfg: MlpfModelSpec, targets: list[str]):
        super().__init__()
        dim, act, drop, types = cfg.num_heads * cfg.head_dim, cfg.activation, cfg.dropout, cfg.num_element_types
        self.targets = targets
        self.pt = TypeSplit(types, dim, 1, dim, act, drop)
        self.eta = LinearSkip(dim, act, drop)
        self.sin_phi = LinearSkip(dim, act, drop)
        self.cos_phi = LinearSkip(dim, act, drop)
        self.energy = TypeSplit(types, dim, 1, dim, act, drop)

    def forward(self, h: torch.Tensor, x: torch.Tensor, element_type: torch.Tensor) -> torch.Tensor:
        # physics in fp32 under autocast: exp/cosh/log of bf16 values would lose the percent-level resolution
        log_pt_ratio = self.pt(h, element_type)[..., 0].float()
        eta = self.eta(h, x[..., ETA].float()).float()
        # E >= |p|: start from the (detached) momentum implied by the pT and eta predictions, add a non-negative log.
        pt = torch.exp(log_pt_ratio.detach().clamp(max=20.0)) * x[..., PT]
        momentum = pt * torch.cosh(eta.detach().clamp(-20.0, 20.0))
        log_energy_floor = _finite(torch.log(momentum / x[..., ENERGY]))
        log_energy_ratio = log_energy_floor + torch.relu(self.energy(h, element_type)[..., 0].float())
        values = {
            "log_pt_ratio": log_pt_ratio,
            "eta": eta,
            "sin_phi": self.sin_phi(h, x[..., SIN_PHI]).float(),
            "cos_phi": self.cos_phi(h, x[..., COS_PHI]).float(),
            "log_energy_ratio": log_energy_ratio,
        }
        return torch.stack([values[name] for name in self.targets], dim=-1)


class Mlpf(nn.Module):
    def __init__(self, spec: JobSpec):
        super().__init__()
        cfg = spec.model
        roles = task_roles(spec)
        self.names = {role: task.name for role, task in roles.items()}
        dim, act, drop, types = cfg.num_heads * cfg.head_dim, cfg.activation, cfg.dropout, cfg.num_element_types
        self.input_dim = FEATURE_SETS[spec.data.inputs.features]  # mlpf_elements: 17
        self.id_embedding = TypeSplit(types, self.input_dim, dim, dim, act, drop)
        self.reg_embedding = TypeSplit(types, self.input_dim, dim, dim, act, drop)
        self.id_stack = AttentionStack(cfg)
        self.reg_stack = AttentionStack(cfg)
        self.heads = nn.ModuleDict({
            self.names["existence"]: feed_forward(dim, roles["existence"].output_dim, dim, act, drop),
            self.names["particle_class"]: feed_forward(dim, cfg.num_classes, dim, act, drop),
            self.names["kinematics"]: KinematicsHead(cfg, list(roles["kinematics"].targets or [])),
        })  # fmt: skip

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = batch["features"].transpose(1, 2)
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"MLPF expects {self.input_dim} element features, got {x.shape[-1]}")
        mask = batch["mask"][:, 0] > 0
        keys = nonempty_key_mask(mask)
        element_type = torch.where(mask, x[..., TYPE].round().long(), 0)
        keep = mask[..., None].to(x.dtype)
        h_id = self.id_stack(self.id_embedding(x, element_type), mask, keys)
        h_reg = self.reg_stack(self.reg_embedding(x, element_type), mask, keys)
        existence, particle_class, kinematics = (self.names[r] for r in ("existence", "particle_class", "kinematics"))
        return {
            existence: self.heads[existence](h_id) * keep,
            particle_class: self.heads[particle_class](h_id) * keep,
            kinematics: self.heads[kinematics](h_reg, x, element_type) * keep,
            "aux_padding_fraction": 1.0 - mask.to(x.dtype).mean(),
        }
