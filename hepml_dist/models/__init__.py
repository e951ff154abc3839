"""Model families. Each family module registers a builder; `build_model(spec)` looks it up by `spec.model.family`."""

from hepml_dist.models.registry import FAMILIES, ModelFamily, build_model, get_family, register_family
from hepml_dist.spec import JobSpec


def count_parameters(spec: JobSpec) -> int:
    """Number of parameters of the job's model (built on the meta device: no memory, no initialisation cost)."""
    import torch

    with torch.device("meta"):
        model = build_model(spec)
    return sum(p.numel() for p in model.parameters())


__all__ = ["FAMILIES", "ModelFamily", "build_model", "count_parameters", "get_family", "register_family"]
