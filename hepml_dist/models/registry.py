"""The model registry: family name -> how to build the model and compute its task losses.

A family module calls `register_family` at import time; `build_model` imports the family modules
listed in FAMILY_MODULES on first use, so the registry has no if/elif chain and stays open to new families.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hepml_dist.spec import JobSpec

Batch = dict[str, torch.Tensor]
Outputs = dict[str, torch.Tensor]
# (outputs, batch, spec) -> {task name: scalar loss, already multiplied by the task weight}
LossFn = Callable[[Outputs, Batch, JobSpec], dict[str, torch.Tensor]]

# Modules that register families, imported lazily (importing them pulls in torch).
FAMILY_MODULES = {
    "part": "hepml_dist.models.part",
    "aot": "hepml_dist.models.aot",
    "omnijet": "hepml_dist.models.omnijet",
    "mlpf": "hepml_dist.models.mlpf",
}


@dataclass(frozen=True)
class ModelFamily:
    """How one model family is built and trained."""

    name: str
    build: Callable[[JobSpec], nn.Module]
    """Builds the single-device model from the whole spec (it needs model, tasks and data.inputs)."""
    losses: LossFn
    """Per-task losses of this family's outputs."""


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered twice")
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> ModelFamily:
    if name not in FAMILIES and name in FAMILY_MODULES:
        importlib.import_module(FAMILY_MODULES[name])
    if name not in FAMILIES:
        raise KeyError(f"no model family {name!r}; known: {', '.join(sorted(FAMILY_MODULES))}")
    return FAMILIES[name]


def build_model(spec: JobSpec) -> nn.Module:
    """The model of a job, on CPU, freshly initialised (pretrained weights are loaded by the training engine)."""
    return get_family(spec.model.family).build(spec)
