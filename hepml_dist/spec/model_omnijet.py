"""Spec of the OmniJet-alpha family: VQ-VAE tokenizer, GPT backbone and the fine-tuned task heads.

Defaults follow the released 8192-token OmniJet-alpha models (arXiv:2403.05618, uhh-pd-ml/omnijet_alpha).
"""

from collections.abc import Iterator, Sequence
from typing import Literal

from pydantic import Field

from hepml_dist.spec.base import Finding, ModelSection, Section
from hepml_dist.spec.tasks import TaskSpec


class TokenizerSpec(Section):
    """The VQ-VAE that turns each constituent into one codebook index."""

    input_dim: int = Field(3, ge=1)
    """Constituent features fed to the tokenizer (pT, Delta eta, Delta phi after preprocessing)."""
    hidden_dim: int = Field(128, ge=1)
    """Width of the NormFormer encoder and decoder."""
    latent_dim: int = Field(4, ge=1)
    """Dimension of a codebook vector."""
    codebook_size: int = Field(8192, ge=2)
    """Number of codebook vectors; the backbone vocabulary is this plus a start and a stop token."""
    num_blocks: int = Field(4, ge=1)
    """NormFormer blocks in the encoder and in the decoder."""
    num_heads: int = Field(8, ge=1)
    """Attention heads in the encoder and decoder."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout in the NormFormer blocks."""
    vq_alpha: float = Field(10.0, ge=0.0)
    """Weight of the quantiser loss against the reconstruction loss."""
    vq_beta: float = Field(0.9, ge=0.0, le=1.0)
    """Share of the quantiser loss on the codebook term (the commitment term gets 1 - beta)."""
    replace_freq: int = Field(10, ge=0)
    """Steps between dead-code replacements that keep the codebook alive (0 = never)."""
    sync_nu: float = Field(1.0, ge=0.0)
    """Straight-through "sync" strength: the decoder's gradient reaches the codebook with this factor (vqtorch nu)."""
    kmeans_iters: int = Field(10, ge=0)
    """Lloyd iterations of the k-means codebook initialisation on the first training batch (0 = random latents)."""


class BackboneSpec(Section):
    """The GPT-style decoder trained by next-token prediction on token sequences."""

    embedding_dim: int = Field(256, ge=1)
    """Token-embedding and model width."""
    num_blocks: int = Field(3, ge=1)
    """Decoder blocks (post-LN, causal)."""
    num_heads: int = Field(8, ge=1)
    """Attention heads."""
    max_sequence_length: int = Field(128, ge=2)
    """Longest token sequence, start and stop tokens included."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Attention dropout."""


class OmniHeadSpec(Section):
    """The task head on top of the backbone's per-token embeddings."""

    kind: Literal["summation", "class_attention"] = "class_attention"
    """`summation`: masked sum of per-token MLP outputs; `class_attention`: a class token attends to the tokens."""
    hidden_dim: int = Field(128, ge=1)
    """Width of the head's hidden layers."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout in the head."""
    num_blocks: int = Field(3, ge=1)
    """class_attention: cross-attention blocks in which the class token attends to the tokens."""
    num_heads: int = Field(2, ge=1)
    """class_attention: heads of the cross-attention (the backbone width must be divisible by it)."""


class OmniJetModelSpec(ModelSection):
    """One stage of the OmniJet-alpha chain; later stages start from the earlier stage's checkpoint (`training.init_from`)."""

    family: Literal["omnijet"] = "omnijet"
    """Model family; selects the builder in the model registry."""
    stage: Literal["tokenizer", "backbone", "classifier"] = "classifier"
    """`tokenizer` trains the VQ-VAE; `backbone` trains the generative GPT; `classifier` trains task heads on it."""
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    """The VQ-VAE tokenizer."""
    backbone: BackboneSpec = Field(default_factory=BackboneSpec)
    """The generative backbone."""
    head: OmniHeadSpec = Field(default_factory=OmniHeadSpec)
    """The task head (classifier stage only)."""

    def attention_widths(self) -> Iterator[tuple[str, int, str, int]]:
        yield "model.backbone.embedding_dim", self.backbone.embedding_dim, "model.backbone.num_heads", self.backbone.num_heads
        yield "model.tokenizer.hidden_dim", self.tokenizer.hidden_dim, "model.tokenizer.num_heads", self.tokenizer.num_heads
        if self.stage == "classifier" and self.head.kind == "class_attention":
            yield "model.backbone.embedding_dim", self.backbone.embedding_dim, "model.head.num_heads", self.head.num_heads

    def check(self, tasks: Sequence[TaskSpec]) -> Iterator[Finding]:
        if self.stage != "backbone":
            return
        vocabulary = self.tokenizer.codebook_size + 2
        for i, task in enumerate(tasks):
            if task.kind == "multiclass" and task.output_dim != vocabulary:
                yield (
                    f"tasks[{i}].num_classes",
                    f"next-token prediction over {self.tokenizer.codebook_size} codes has {vocabulary} classes "
                    "(codes + start + stop); set num_classes to that",
                )
