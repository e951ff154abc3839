"""Spec of MLPF: attention-based particle-flow reconstruction (jpata/particleflow v2.2.0 CLIC configuration)."""

from typing import Literal

from pydantic import Field

from hepml_dist.spec.base import ModelSection


class MlpfModelSpec(ModelSection):
    """Element embedding per type, separate attention stacks for identification and regression, per-element heads."""

    family: Literal["mlpf"] = "mlpf"
    """Model family; selects the builder in the model registry."""
    num_heads: int = Field(32, ge=1)
    """Attention heads; the model width is num_heads x head_dim."""
    head_dim: int = Field(32, ge=1)
    """Width of one attention head."""
    num_convs: int = Field(3, ge=1)
    """Attention layers in each of the two stacks (identification, regression)."""
    num_element_types: int = Field(2, ge=1)
    """Distinct element types with their own embedding (CLIC: tracks and clusters)."""
    num_classes: int = Field(6, ge=2)
    """Particle classes including `none` (CLIC: none, charged hadron, neutral hadron, photon, electron, muon)."""
    activation: Literal["relu", "gelu", "elu"] = "relu"
    """Activation in all feed-forward blocks."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout in attention and feed-forward layers."""
    pt_weighted_regression: bool = True
    """Weight the pT and energy regression terms by sqrt(target pT) (particleflow v2.2.0)."""
