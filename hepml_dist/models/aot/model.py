"""AnalysisObjectTransformer (AOT): event classification from reconstructed objects plus event-level features.

The idea of HF `maciek-g/AnalysisObjectTransformer` (= GitHub m-glowacki/ParticleTransfomer 628f79a,
`particle_transfomer.py`) rebuilt on the ParT building blocks of hepml_dist.models.blocks:
object embedding (BN + [LN -> Linear -> GELU] per width) -> self-attention blocks with the padding mask ->
CaiT class-attention blocks with a learned class token -> final LN -> event features joined -> MLP head -> logits.

Defects of that reference code that are *not* carried over:
the class token is a real parameter (not re-drawn on every call, on the CPU); every block keeps both residuals
(ParT's pre-LN block); event features are standardised (BatchNorm) and embedded before they are used, never fed raw;
widths are free (embedding, attention and head widths are independent); the model returns logits (use BCE with logits).

Batch keys: `features` [B, C, O], `mask` [B, 1, O] (1 = real object), `event_features` [B, F] (F =
len(data.inputs.event_features); unused with event_fusion: none).
"""

import torch
from torch import nn

from hepml_dist.errors import UserError
from hepml_dist.models.blocks import (
    Block,
    ClassAttentionPathway,
    Packing,
    ParticleEmbedding,
    compute_dtype,
    key_padding_bias,
    make_head,
)
from hepml_dist.spec import JobSpec
from hepml_dist.spec.data import FEATURE_SETS
from hepml_dist.spec.model_aot import AotModelSpec
from hepml_dist.spec.tasks import TaskSpec


class EventEmbedding(nn.Module):
    """BatchNorm over the event features (MET, HT, ... have very different scales), then Linear -> GELU -> Linear."""

    def __init__(self, num_features: int, dim: int):
        super().__init__()
        self.layers = nn.Sequential(
            nn.BatchNorm1d(num_features), nn.Linear(num_features, dim), nn.GELU(), nn.Linear(dim, dim)
        )

    def forward(self, event_features: torch.Tensor) -> torch.Tensor:
        return self.layers(event_features.float())


class AnalysisObjectTransformer(nn.Module):
    """forward(batch) -> {task: logits [B, K] (or [B, 1] for bce) or regression values [B, T]}."""

    def __init__(self, cfg: AotModelSpec, tasks: list[TaskSpec], input_dim: int, num_event_features: int):
        super().__init__()
        if cfg.event_fusion != "none" and num_event_features == 0:
            raise UserError(
                f"model.event_fusion is {cfg.event_fusion!r} but data.inputs.event_features is empty; "
                "list the event features (e.g. [ht, met]) or set model.event_fusion: none"
            )
        dim = cfg.embed_dims[-1]
        self.input_dim, self.event_fusion = input_dim, cfg.event_fusion
        self.embed = ParticleEmbedding(input_dim, cfg.embed_dims)
        self.blocks = nn.ModuleList(
            Block(dim, cfg.num_heads, cfg.ffn_ratio, cfg.dropout, cfg.dropout, cfg.dropout)
            for _ in range(cfg.num_encoder_layers)
        )
        self.event_embed = EventEmbedding(num_event_features, dim) if cfg.event_fusion != "none" else None
        self.pathway = ClassAttentionPathway(dim, cfg.num_heads, cfg.ffn_ratio, cfg.num_class_layers)
        head_in = 2 * dim if cfg.event_fusion == "concat_head" else dim
        self.heads = nn.ModuleDict(
            {t.name: make_head(head_in, cfg.head_dims, "gelu", cfg.dropout, t.output_dim) for t in tasks}
        )
        self.export_mode = False  # set by hepml_dist.inference.export: no data-dependent shapes

    def embedding(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The event representation the heads see: [B, D] or [B, 2D] (class token joined with the event embedding)."""
        features = batch["features"]
        if features.shape[1] != self.input_dim:
            raise ValueError(
                f"batch['features'] has {features.shape[1]} channels; this model was built for {self.input_dim}"
            )
        mask = batch["mask"][:, 0] > 0.5
        dtype = compute_dtype(features.device)
        packing = None if self.export_mode else Packing.of(mask)
        x = self.embed(features, mask, packing)
        bias = key_padding_bias(mask, dtype)
        for block in self.blocks:
            x = block(x, bias, packing=packing)
        if packing is not None:
            x = packing.unpack(x)
        event = self.event_embed(batch["event_features"]) if self.event_embed is not None else None
        if self.event_fusion == "token":  # one more object for the class token to attend to
            x = torch.cat((x, event[:, None].to(x.dtype)), dim=1)
            mask = torch.cat((mask, mask.new_ones(mask.shape[0], 1)), dim=1)
        cls_mask = torch.cat((mask.new_ones(mask.shape[0], 1), mask), dim=1)
        cls = self.pathway(x, key_padding_bias(cls_mask, dtype))
        if self.event_fusion == "concat_head":
            return torch.cat((cls, event.to(cls.dtype)), dim=-1)
        return cls

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        z = self.embedding(batch)
        return {name: head(z) for name, head in self.heads.items()}


def build(spec: JobSpec) -> AnalysisObjectTransformer:
    inputs = spec.data.inputs
    return AnalysisObjectTransformer(spec.model, spec.tasks, FEATURE_SETS[inputs.features], len(inputs.event_features))
