"""Spec of the Particle Transformer family: ParT (JetClass), Sophon, MultiParTau and SingleParTau.

Defaults are the ParT paper configuration (arXiv:2202.03772, weaver-core 2022 model).
"""

from collections.abc import Iterator
from typing import Literal

from pydantic import Field

from hepml_dist.spec.base import ModelSection, Section


class HeadSpec(Section):
    """The MLP that turns a class-token embedding into one task's outputs."""

    hidden: list[int] = Field(default_factory=list)
    """Widths of the hidden layers; empty means a single Linear (the ParT JetClass head)."""
    activation: Literal["relu", "gelu"] = "relu"
    """Activation after each hidden layer (Sophon: relu; MultiParTau: gelu)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout after each hidden activation; a task may override it with `tasks[i].head_dropout`."""


class PartModelSpec(ModelSection):
    """Particle Transformer: particle embedding, pair-feature attention bias, particle and class-attention blocks."""

    family: Literal["part"] = "part"
    """Model family; selects the builder in the model registry."""
    embed_dims: list[int] = Field(default_factory=lambda: [128, 512, 128], min_length=1)
    """Widths of the particle-embedding MLP; the last one is the model dimension."""
    pair_embed_dims: list[int] = Field(default_factory=lambda: [64, 64, 64])
    """Widths of the 1x1-convolution pair embedding before the final projection to one bias per head."""
    pair_input_dim: int = Field(4, ge=0)
    """Number of pair features (4 = ln kT, ln z, ln Delta, ln m^2); 0 turns the pair bias off (ParT plain)."""
    use_pre_activation_pair: bool = False
    """True drops the GELU after the last pair-embedding layer (Sophon: True, ParT JetClass: False)."""
    num_heads: int = Field(8, ge=1)
    """Attention heads in every block."""
    num_layers: int = Field(8, ge=1)
    """Particle-attention blocks (with the pair bias)."""
    num_cls_layers: int = Field(2, ge=1)
    """Class-attention blocks (CaiT style, no pair bias)."""
    ffn_ratio: int = Field(4, ge=1)
    """Hidden width of the feed-forward layers in units of the model dimension."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Residual dropout in the particle blocks."""
    attn_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout on attention weights in the particle blocks."""
    activation_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout after the feed-forward activation in the particle blocks."""
    head: HeadSpec = Field(default_factory=HeadSpec)
    """The per-task output MLP."""
    task_pathways: Literal["shared", "per_task"] = "shared"
    """`shared`: one class token and one set of class-attention blocks feed every task head (ParT, Sophon);
    `per_task`: each task has its own class token, class-attention blocks and final norm (MultiParTau)."""
    trim: bool = True
    """Training-time sequence trimming (random particle subsets to a quantile length; speed-up and augmentation)."""
    init: Literal["default", "moco"] = "default"
    """Weight initialisation: `default` is PyTorch's (the 2022 paper model); `moco` is Xavier-uniform with
    depth-scaled output projections (weaver-core since 2024, used by Sophon)."""
    export_embed: bool = False
    """ONNX export appends the class-token embedding to the softmax output (Sophon: 188 + 128 = 316 columns)."""

    def attention_widths(self) -> Iterator[tuple[str, int, str, int]]:
        yield "model.embed_dims", self.embed_dims[-1], "model.num_heads", self.num_heads
