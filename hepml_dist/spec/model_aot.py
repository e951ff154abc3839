"""Spec of the AnalysisObjectTransformer: event classification from reconstructed objects plus event features."""

from collections.abc import Iterator
from typing import Literal

from pydantic import Field

from hepml_dist.spec.base import ModelSection


class AotModelSpec(ModelSection):
    """Object embedding, self-attention over objects, CaiT class attention, event features joined before the head."""

    family: Literal["aot"] = "aot"
    """Model family; selects the builder in the model registry."""
    embed_dims: list[int] = Field(default_factory=lambda: [64, 64, 64], min_length=1)
    """Widths of the object-embedding MLP; the last one is the model dimension."""
    num_heads: int = Field(8, ge=1)
    """Attention heads."""
    num_encoder_layers: int = Field(3, ge=1)
    """Self-attention blocks over the objects."""
    num_class_layers: int = Field(2, ge=1)
    """Class-attention blocks."""
    ffn_ratio: int = Field(2, ge=1)
    """Feed-forward width in units of the model dimension."""
    event_fusion: Literal["concat_head", "token", "none"] = "concat_head"
    """How event-level features enter: embedded and concatenated with the class token before the head,
    appended as an extra token before class attention, or not used."""
    head_dims: list[int] = Field(default_factory=lambda: [128, 64])
    """Hidden widths of the output MLP."""
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    """Dropout in attention blocks and the head's hidden layers (never after the output layer)."""
    luminosity_fb: float = Field(140.0, gt=0.0)
    """Integrated luminosity (fb^-1) at which `hepml evaluate` and `hepml report` quote the expected significance
    of the signal task (events weighted by their `gen_xsec_weight`); it does not change the model or training."""

    def attention_widths(self) -> Iterator[tuple[str, int, str, int]]:
        yield "model.embed_dims", self.embed_dims[-1], "model.num_heads", self.num_heads
