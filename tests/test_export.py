"""`hepml export onnx`: weaver I/O names, dynamic batch and length, onnxruntime equals PyTorch."""

import json
from pathlib import Path

import numpy as np
import onnxruntime
import torch
from typer.testing import CliRunner

from hepml_dist.cli import app
from hepml_dist.data.features import build_batch, get_builder, to_torch
from hepml_dist.data.plot import read_examples
from hepml_dist.generate import get_process
from hepml_dist.generate.runner import generate_dataset
from hepml_dist.inference.export import example_elements, example_jets
from hepml_dist.models import build_model
from hepml_dist.runs import write_model_checkpoint
from hepml_dist.spec import load_job

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
SMALL_PART = ["model.embed_dims=[32,64,32]", "model.pair_embed_dims=[16,16]", "model.num_heads=4", "model.num_layers=2"]


def trained_run(tmp_path: Path, job: str, overrides: list[str]) -> tuple[Path, torch.nn.Module]:
    """A run directory with one checkpoint of a randomly initialised model (with non-trivial BatchNorm statistics)."""
    spec = load_job(ROOT / "jobs" / f"{job}.yaml", overrides)
    torch.manual_seed(0)
    model = build_model(spec)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    run = tmp_path / job
    write_model_checkpoint(run / "checkpoints" / "step-00000100", spec, model)
    return run, model.eval()


def onnx_outputs(path: Path, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, {k: v.numpy() for k, v in inputs.items()})))


def test_sophon_export_keeps_weaver_names_and_matches_pytorch(tmp_path):
    run, model = trained_run(tmp_path, "sophon", SMALL_PART)
    out = tmp_path / "sophon.onnx"
    result = runner.invoke(app, ["export", "onnx", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pf_features", "pf_vectors", "pf_mask"]
    assert [o.name for o in session.get_outputs()] == ["softmax"]
    for num, length in ((7, 40), (1, 128)):  # other batch sizes and lengths than traced
        assert_sophon_parity(out, model, example_jets(num, length, 17, seed=num))
    description = json.loads(out.with_name("sophon.onnx.json").read_text())
    assert description["outputs"]["softmax"][:2] == ["0", "1"] and description["features"] == "sophon_full"


def assert_sophon_parity(onnx_file: Path, model: torch.nn.Module, jets: dict[str, torch.Tensor]) -> None:
    """onnxruntime's `softmax` output = PyTorch's 188 probabilities followed by the class-token embedding."""
    got = onnx_outputs(onnx_file, {"pf_features": jets["features"], "pf_vectors": jets["vectors"],
                                   "pf_mask": jets["mask"]})["softmax"]
    with torch.no_grad():
        outputs, embeddings = model.forward_with_embeddings(jets)
        embedding = embeddings["jet_class"]
        probabilities = outputs["jet_class"].softmax(-1)
    assert got.shape == (len(jets["mask"]), 188 + 32)  # 188 probabilities, then the embedding (model width 32 here)
    np.testing.assert_allclose(got[:, :188], probabilities.numpy(), atol=1e-5)
    np.testing.assert_allclose(got[:, 188:], embedding.numpy(), atol=1e-4)


def test_sophon_export_matches_pytorch_on_generated_jets(tmp_path):
    """Real jets (jetclass2-lite, through the sophon_full feature builder) at several batch sizes and lengths."""
    data = tmp_path / "jets"
    generate_dataset(get_process("jetclass2-lite"), 200, data, seed=3, show_progress=False,
                     options={"classes": "X_bb,X_cc,QCD"})
    columns, _ = read_examples(data, "train", 10**6)
    run, model = trained_run(tmp_path, "sophon", SMALL_PART)
    out = tmp_path / "sophon.onnx"
    assert runner.invoke(app, ["export", "onnx", str(run), "--out", str(out)]).exit_code == 0
    for num, length in ((1, 128), (5, 16), (64, 64), (len(columns["part_n"]), 100)):
        raw = {name: values[:num] for name, values in columns.items()}
        batch = to_torch(build_batch(raw, get_builder("sophon_full"), max_length=length))
        assert batch["mask"].shape == (num, 1, length) and batch["mask"].sum() > 0
        assert_sophon_parity(out, model, batch)


def test_multitask_export_has_one_output_per_task(tmp_path):
    run, model = trained_run(tmp_path, "multipartau-quickstart", [])
    result = runner.invoke(app, ["export", "onnx", str(run)])
    assert result.exit_code == 0, result.output
    path = run / "checkpoints" / "step-00000100" / "model.onnx"
    jets = example_jets(4, 20, model.input_dim, seed=1)
    got = onnx_outputs(path, {"pf_features": jets["features"], "pf_vectors": jets["vectors"], "pf_mask": jets["mask"]})
    with torch.no_grad():
        expected = model(jets)
    np.testing.assert_allclose(got["tau_id"], expected["tau_id"].softmax(-1).numpy(), atol=1e-5)
    charge = torch.sigmoid(expected["charge"])
    np.testing.assert_allclose(got["charge"], torch.cat((1 - charge, charge), -1).numpy(), atol=1e-5)
    np.testing.assert_allclose(got["kinematics"], expected["kinematics"].numpy(), atol=1e-4)
    assert got["decay_mode"].shape == (4, 6)


def test_aot_export_matches_pytorch(tmp_path):
    run, model = trained_run(tmp_path, "aot-quickstart", [])
    out = tmp_path / "aot.onnx"
    assert runner.invoke(app, ["export", "onnx", str(run), "-o", str(out)]).exit_code == 0
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(9)[None] < torch.tensor([9, 3, 0, 5, 7])[:, None]).float()[:, None]
    batch = {"features": torch.randn(5, 6, 9, generator=g) * mask, "mask": mask, "event_features": 50 * torch.rand(5, 4, generator=g)}
    got = onnx_outputs(out, batch)["signal"]
    with torch.no_grad():
        p = torch.sigmoid(model(batch)["signal"])
    np.testing.assert_allclose(got, torch.cat((1 - p, p), -1).numpy(), atol=1e-5)


def test_mlpf_export_has_dynamic_elements_and_matches_pytorch(tmp_path):
    """One graph serves any number of events and of elements: onnxruntime equals PyTorch at two element counts
    (neither the traced one), for all three per-element outputs."""
    run, model = trained_run(tmp_path, "mlpf-quickstart", [])
    out = tmp_path / "mlpf.onnx"
    result = runner.invoke(app, ["export", "onnx", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["features", "mask"]
    assert [o.name for o in session.get_outputs()] == ["existence", "particle_class", "kinematics"]
    for num, length in ((3, 41), (2, 130)):
        events = example_elements(num, length, seed=length)
        got = onnx_outputs(out, events)
        with torch.no_grad():
            expected = model(events)
        real = events["mask"][:, 0].bool().numpy()
        assert got["particle_class"].shape == (num, length, 6) and got["kinematics"].shape == (num, length, 5)
        np.testing.assert_allclose(got["existence"][real], expected["existence"].softmax(-1).numpy()[real], atol=1e-5)
        np.testing.assert_allclose(got["particle_class"][real],
                                   expected["particle_class"].softmax(-1).numpy()[real], atol=1e-5)
        np.testing.assert_allclose(got["kinematics"][real], expected["kinematics"].numpy()[real], atol=1e-4)
    description = json.loads(out.with_name("mlpf.onnx.json").read_text())
    assert description["family"] == "mlpf" and description["max_abs_difference_vs_pytorch"] <= 1e-4
    assert description["outputs"]["kinematics"] == ["log_pt_ratio", "eta", "sin_phi", "cos_phi", "log_energy_ratio"]


def test_export_of_a_missing_run_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["export", "onnx", str(tmp_path / "nowhere")])
    assert result.exit_code == 2 and "no such run directory" in result.output
