"""Model families, one package each (part, aot, omnijet, mlpf): architecture, losses and registration.

`build_model(spec)` builds the model of a job through the registry; `get_family(name)` gives its losses and hooks.
Shared layers are in `blocks.py`, the task losses shared by families in `losses.py`. Model code is single-device:
data parallelism is applied from outside (hepml_dist.train).
"""

from hepml_dist.models.registry import FAMILIES, ModelFamily, build_model, count_parameters, get_family, register_family

__all__ = ["FAMILIES", "ModelFamily", "build_model", "count_parameters", "get_family", "register_family"]
