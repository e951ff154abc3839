"""Model families. Each family module registers a builder; `build_model(spec)` looks it up by `spec.model.family`."""

from hepml_dist.models.registry import FAMILIES, ModelFamily, build_model, get_family, register_family

__all__ = ["FAMILIES", "ModelFamily", "build_model", "get_family", "register_family"]
