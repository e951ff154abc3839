"""The model registry: family name -> how to build the model and compute its task losses.

The family names are those of the spec (`hepml_dist.spec.MODEL_FAMILIES`, from the model-spec union); family
NAME lives in the package `hepml_dist.models.NAME`, whose `__init__` calls `register_family`. `get_family` imports
that package on first use, so the registry has no if/elif chain and a new family is one package plus its spec.
"""

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hepml_dist.spec import MODEL_FAMILIES, JobSpec

Batch = dict[str, torch.Tensor]
Outputs = dict[str, torch.Tensor]
# (outputs, batch, spec) -> {task name: scalar loss, already multiplied by the task weight}
LossFn = Callable[[Outputs, Batch, JobSpec], dict[str, torch.Tensor]]
SummedMetricsFn = Callable[[Outputs, Batch, JobSpec], dict[str, tuple[float, float]]]


@dataclass(frozen=True)
class ModelFamily:
    """How one model family is built and trained."""

    name: str
    build: Callable[[JobSpec], nn.Module]
    """Builds the single-device model from the whole spec (it needs model, tasks and data.inputs)."""
    losses: LossFn
    """Per-task losses of this family's outputs."""
    use_static_shapes: Callable[[nn.Module], None] | None = None
    """Switches a built model to shape-static code before torch.compile (ParT); None: nothing to switch."""
    examples: str = "jets"
    """What one example of this family is, for throughput in logs ("jets", "events")."""
    metrics: Callable[[JobSpec], SummedMetricsFn | None] | None = None
    """For jobs the per-task Collector cannot score: spec -> a function (outputs, batch, spec) -> {name: (sum,
    count)} whose sums validation adds up (evaluate/summed_metrics.py); None for the jobs the Collector scores."""


FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    if family.name not in MODEL_FAMILIES:
        raise ValueError(f"model family {family.name!r} has no model spec; add it to hepml_dist.spec.job.ModelSpec")
    if family.name in FAMILIES:
        raise ValueError(f"model family {family.name!r} is registered twice")
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> ModelFamily:
    if name not in MODEL_FAMILIES:
        raise KeyError(f"no model family {name!r}; known: {', '.join(MODEL_FAMILIES)}")
    if name not in FAMILIES:
        importlib.import_module(f"{__package__}.{name}")
    return FAMILIES[name]


def build_model(spec: JobSpec) -> nn.Module:
    """The model of a job, on CPU, freshly initialised (pretrained weights are loaded by the training engine)."""
    return get_family(spec.model.family).build(spec)


def count_parameters(spec: JobSpec) -> int:
    """Number of parameters of the job's model (built on the meta device: no memory, no initialisation cost)."""
    with torch.device("meta"):
        model = build_model(spec)
    return sum(p.numel() for p in model.parameters())
