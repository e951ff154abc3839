"""ONNX export of trained ParT-family, AOT and MLPF models, checked against onnxruntime.

`export_onnx(run_dir_or_checkpoint)` rebuilds the model from its checkpoint (`load_trained`), switches it to its
shape-static export code (`model.export_mode`: dense pair path, no trimming or packing), traces it with the legacy
TorchScript exporter (`dynamo=False`: the dynamo exporter needs onnxscript and cannot trace data-dependent code), and
writes FILE plus FILE.json describing the inputs and output columns. Batch and length axes are dynamic.

I/O contract:
  part  inputs  pf_features [N, C, P], pf_vectors [N, 4, P] (px, py, pz, E), pf_mask [N, 1, P]   (weaver names)
        outputs one classification task: `softmax` [N, K] class probabilities, followed by the 128-d (model width)
                class-token embedding when model.export_embed is set (Sophon: 188 + 128 = 316 columns);
                otherwise one output per task, named after it: probabilities [N, K] for classification (a bce task
                gives [N, 2] = (1 - p, p)), values [N, T] for regression; export_embed adds `<task>_embedding`.
  aot   inputs  features [N, C, O], mask [N, 1, O], event_features [N, F] (when the model uses them)
        outputs one per task as above.
  mlpf  inputs  features [N, 17, E] (the elements, unstandardised, as the loader gives them), mask [N, 1, E]
        outputs one per task and element, [N, E, ...]: existence probabilities [N, E, 2], particle-class
                probabilities [N, E, K], kinematics [N, E, 5] (log(pT / pT_elem), eta, sin phi, cos phi,
                log(E / E_elem) in the task's `targets` order; decode as docs/mlpf.md). Padded elements give
                meaningless values: read only where mask is 1. N and E are dynamic.
"""

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from hepml_dist import files, runs
from hepml_dist.errors import UserError
from hepml_dist.extras import require
from hepml_dist.spec import JobSpec
from hepml_dist.spec.data import FEATURE_SETS
from hepml_dist.spec.tasks import TaskSpec

OPSET = 17
TOLERANCE = 1e-4


def probabilities(task: TaskSpec, output: torch.Tensor) -> torch.Tensor:
    """What an inference client wants from a task output: class probabilities, or the regression values."""
    if task.kind == "regression":
        return output
    if task.loss == "bce":
        p = torch.sigmoid(output)
        return torch.cat((1 - p, p), dim=-1)
    return torch.softmax(output, dim=-1)


def output_columns(task: TaskSpec) -> list[str]:
    if task.kind == "regression":
        return list(task.targets or [])
    return list(task.classes or [str(i) for i in range(task.output_dim if task.loss != "bce" else 2)])


class PartForOnnx(nn.Module):
    """pf_features, pf_vectors, pf_mask -> softmax (or one output per task)."""

    def __init__(self, model: nn.Module, spec: JobSpec):
        super().__init__()
        self.model, self.tasks, self.embed = model, spec.tasks, spec.model.export_embed
        classification = [t for t in spec.tasks if t.kind != "regression"]
        self.single = len(spec.tasks) == 1 and len(classification) == 1

    def forward(self, pf_features, pf_vectors, pf_mask):
        task_outputs, embeddings = self.model.forward_with_embeddings(
            {"features": pf_features, "vectors": pf_vectors, "mask": pf_mask})
        outputs = []
        for task in self.tasks:
            outputs.append(probabilities(task, task_outputs[task.name]))
            if self.embed:
                outputs.append(embeddings[task.name])
        if self.single:
            return torch.cat(outputs, dim=-1)
        return tuple(outputs)


class AotForOnnx(nn.Module):
    """features, mask[, event_features] -> one output per task."""

    def __init__(self, model: nn.Module, spec: JobSpec):
        super().__init__()
        self.model, self.tasks = model, spec.tasks

    def forward(self, features, mask, event_features=None):
        batch = {"features": features, "mask": mask}
        if event_features is not None:
            batch["event_features"] = event_features
        outputs = self.model(batch)
        return tuple(probabilities(t, outputs[t.name]) for t in self.tasks)


class MlpfForOnnx(nn.Module):
    """features, mask -> one per-element output per task (probabilities or regression values)."""

    def __init__(self, model: nn.Module, spec: JobSpec):
        super().__init__()
        self.model, self.tasks = model, spec.tasks

    def forward(self, features, mask):
        outputs = self.model({"features": features, "mask": mask})
        return tuple(probabilities(t, outputs[t.name]) for t in self.tasks)


@dataclass
class OnnxGraph:
    """What to trace: the wrapper, its inputs (name -> example tensor, dynamic axes) and its outputs."""

    module: nn.Module
    inputs: dict[str, torch.Tensor]
    dynamic_axes: dict[str, dict[int, str]]
    outputs: dict[str, list[str]] = field(default_factory=dict)  # output name -> column names


def example_jets(num: int, length: int, channels: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random jets with physical 4-vectors and varied lengths (some padding), for tracing and checking."""
    g = torch.Generator().manual_seed(seed)
    n_real = torch.randint(1, length + 1, (num,), generator=g)
    n_real[0] = length
    mask = (torch.arange(length)[None] < n_real[:, None]).float()[:, None]
    pt = 1 + 50 * torch.rand(num, length, generator=g)
    eta, phi = 0.4 * torch.randn(num, length, generator=g), 0.4 * torch.randn(num, length, generator=g)
    mass = 0.14 * torch.rand(num, length, generator=g)
    pz = pt * torch.sinh(eta)
    energy = torch.sqrt(pt**2 + pz**2 + mass**2)
    vectors = torch.stack((pt * torch.cos(phi), pt * torch.sin(phi), pz, energy), dim=1) * mask
    features = torch.randn(num, channels, length, generator=g) * mask
    return {"features": features, "vectors": vectors, "mask": mask}


def part_graph(spec: JobSpec, model: nn.Module, num: int, length: int) -> OnnxGraph:
    jets = example_jets(num, length, FEATURE_SETS[spec.data.inputs.features])
    module = PartForOnnx(model, spec)
    inputs = {"pf_features": jets["features"], "pf_vectors": jets["vectors"], "pf_mask": jets["mask"]}
    axes = {name: {0: "N", 2: "n_pf"} for name in inputs}
    width = spec.model.embed_dims[-1]
    outputs: dict[str, list[str]] = {}
    for task in spec.tasks:
        outputs[task.name] = output_columns(task)
        if spec.model.export_embed:
            outputs[f"{task.name}_embedding"] = [f"embedding_{i}" for i in range(width)]
    if module.single:
        outputs = {"softmax": [c for cols in outputs.values() for c in cols]}
    for name in outputs:
        axes[name] = {0: "N"}
    return OnnxGraph(module.eval(), inputs, axes, outputs)


def aot_graph(spec: JobSpec, model: nn.Module, num: int, length: int) -> OnnxGraph:
    jets = example_jets(num, length, FEATURE_SETS[spec.data.inputs.features])
    inputs = {"features": jets["features"], "mask": jets["mask"]}
    axes = {"features": {0: "N", 2: "n_obj"}, "mask": {0: "N", 2: "n_obj"}}
    if model.event_embed is not None:
        generator = torch.Generator().manual_seed(1)
        inputs["event_features"] = torch.randn(num, len(spec.data.inputs.event_features), generator=generator)
        axes["event_features"] = {0: "N"}
    outputs = {t.name: output_columns(t) for t in spec.tasks}
    axes.update({name: {0: "N"} for name in outputs})
    return OnnxGraph(AotForOnnx(model, spec).eval(), inputs, axes, outputs)


def example_elements(num: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random CLIC-like events (tracks and clusters with positive pT and E >= |p|, some padding) in the 17-feature
    `mlpf_elements` layout, for tracing and checking the MLPF export."""
    g = torch.Generator().manual_seed(seed)
    n_real = torch.randint(1, length + 1, (num,), generator=g)
    n_real[0] = length
    mask = (torch.arange(length)[None] < n_real[:, None]).float()
    pt = 0.2 + 20 * torch.rand(num, length, generator=g)
    eta, phi = torch.randn(num, length, generator=g), 3 * (2 * torch.rand(num, length, generator=g) - 1)
    energy = pt * torch.cosh(eta) * (1 + 0.2 * torch.rand(num, length, generator=g))
    kind = 1 + torch.randint(0, 2, (num, length), generator=g).float()
    features = 0.1 * torch.randn(num, 17, length, generator=g)
    for channel, value in enumerate((kind, pt, eta, torch.sin(phi), torch.cos(phi), energy)):
        features[:, channel] = value
    return {"features": features * mask[:, None], "mask": mask[:, None]}


def mlpf_graph(spec: JobSpec, model: nn.Module, num: int, length: int) -> OnnxGraph:
    inputs = example_elements(num, length)
    axes = {name: {0: "N", 2: "n_elements"} for name in inputs}
    outputs = {t.name: output_columns(t) for t in spec.tasks}
    axes.update({name: {0: "N", 1: "n_elements"} for name in outputs})
    return OnnxGraph(MlpfForOnnx(model, spec).eval(), inputs, axes, outputs)


GRAPHS: dict[str, Callable[[JobSpec, nn.Module, int, int], OnnxGraph]] = {
    "part": part_graph, "aot": aot_graph, "mlpf": mlpf_graph}


def build_graph(spec: JobSpec, model: nn.Module, num: int = 3, length: int = 16) -> OnnxGraph:
    if spec.model.family not in GRAPHS:
        raise UserError(
            f"ONNX export is not available for model family {spec.model.family!r} (available: {', '.join(GRAPHS)})"
        )
    model.eval()
    model.export_mode = True
    return GRAPHS[spec.model.family](spec, model, num, length)


def _cosh(g, x):
    return g.op("Cosh", x)


def trace_to_onnx(graph: OnnxGraph, path: Path, opset: int = OPSET) -> None:
    # ONNX has Cosh (opset 9) but the TorchScript exporter has no mapping for aten::cosh (MLPF's E >= |p| floor)
    torch.onnx.register_custom_op_symbolic("aten::cosh", _cosh, opset)
    with warnings.catch_warnings():
        # Shape checks in forward become constants in the trace (harmless); the legacy exporter is deprecated.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        _export(graph, path, opset)


def _export(graph: OnnxGraph, path: Path, opset: int) -> None:
    torch.onnx.export(
        graph.module,
        tuple(graph.inputs.values()),
        str(path),
        input_names=list(graph.inputs),
        output_names=list(graph.outputs),
        dynamic_axes=graph.dynamic_axes,
        opset_version=opset,
        dynamo=False,
        do_constant_folding=True,
    )


def max_difference(spec: JobSpec, model: nn.Module, path: Path, num: int, length: int) -> float:
    """Largest |onnxruntime - PyTorch| on fresh inputs of another batch size and length than the traced ones.

    PyTorch runs its ordinary (packed, sparse) code path, so this also checks that the export path computes the same.
    """
    onnxruntime = require("onnxruntime")  # the `export` extra: only this check needs it

    check = GRAPHS[spec.model.family](spec, model, num, length)
    model.export_mode = False
    with torch.no_grad():
        expected = check.module(*check.inputs.values())
    expected = expected if isinstance(expected, tuple) else (expected,)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {k: v.numpy() for k, v in check.inputs.items()})
    return max(float(np.abs(g - e.numpy()).max()) for g, e in zip(got, expected))


@dataclass
class ExportResult:
    path: Path
    inputs: list[str]
    outputs: dict[str, list[str]]
    max_abs_difference: float | None


def export_onnx(
    source: str | Path, out: str | Path | None = None, opset: int = OPSET, check: bool = True
) -> ExportResult:
    """Export the model of a run directory or checkpoint folder to ONNX; by default FOLDER/model.onnx."""
    folder = runs.resolve_checkpoint(source)
    spec, model = runs.load_trained(folder)
    out = Path(out) if out is not None else folder / "model.onnx"
    out.parent.mkdir(parents=True, exist_ok=True)
    graph = build_graph(spec, model)
    with files.replacing(out) as tmp:
        trace_to_onnx(graph, tmp, opset)
        difference = max_difference(spec, model, tmp, num=5, length=23) if check else None
        if difference is not None and not difference <= TOLERANCE:
            raise UserError(
                f"{out}: onnxruntime differs from PyTorch by {difference:.2e} (> {TOLERANCE}); the export is not written"
            )
    description = {
        "job": spec.name,
        "checkpoint": str(folder),
        "family": spec.model.family,
        "exporter": f"torch.onnx TorchScript (dynamo=False), opset {opset}",
        "features": spec.data.inputs.features,
        "max_length": spec.data.inputs.max_length,
        "event_features": spec.data.inputs.event_features,
        "inputs": {name: ["N", *(("C", "P") if t.dim() == 3 else ("F",))] for name, t in graph.inputs.items()},
        "outputs": graph.outputs,
        "max_abs_difference_vs_pytorch": difference,
    }
    files.write_text(out.with_name(out.name + ".json"), json.dumps(description, indent=1))
    return ExportResult(out, list(graph.inputs), graph.outputs, difference)
