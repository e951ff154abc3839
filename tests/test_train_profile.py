"""training.profile: the loop profiles exactly the asked steps and writes a table whose phases add up to the step, a
JSON summary and a Chrome trace; a run without it, or resumed past the window, writes nothing. Also the fused CPU
optimizer the profile led to."""

import json

import pytest
import torch
from train_helpers import tiny_job, write_jet_dataset

from hepml_dist.spec import parse_spec
from hepml_dist.train.loop import train_loop_per_worker
from hepml_dist.train.optim import build_optimizer
from hepml_dist.train.profile import PHASES, StepProfiler


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_jet_dataset(tmp_path_factory.mktemp("profile-data"), examples=1200)


def run(dataset, run_dir, **training):
    job = tiny_job(dataset, training={"epochs": None, "steps": 8, "eval_interval": 100, **training},
                   tracking={"mode": "disabled"}, checkpoint={"interval": 100})
    spec = parse_spec(job)
    train_loop_per_worker({"spec": spec.model_dump(mode="json"), "run_dir": str(run_dir), "ray": False})


def test_profiled_steps_add_up_and_the_trace_holds_each_phase(dataset, tmp_path):
    run(dataset, tmp_path, profile={"steps": 3, "start_step": 4})
    summary = json.loads((tmp_path / "profile/rank0.json").read_text())
    assert (summary["first_step"], summary["last_step"], summary["steps"]) == (4, 6, 3)
    assert list(summary["phases_ms"]) == list(PHASES)
    for name in ("data_wait", "forward", "losses", "backward", "optimizer"):
        assert summary["phases_ms"][name] > 0, name
    # the phases are disjoint ranges inside the profiled wall time: together never more than the step
    assert sum(summary["phases_ms"].values()) <= summary["wall_ms"] * 1.02
    assert summary["operators"] and all(op["self_cpu_ms"] >= 0 for op in summary["operators"])

    events = json.loads((tmp_path / "profile/rank0.trace.json").read_text())["traceEvents"]
    forwards = [e for e in events if e.get("name") == "hepml/forward"]
    optimizer_steps = [e for e in events if e.get("name") == "hepml/optimizer"]
    assert len(forwards) == len(optimizer_steps) == 3  # one micro-batch per step, three steps

    table = (tmp_path / "profile/rank0.txt").read_text()
    assert "Steps 4-6 (3 steps" in table and "backward" in table and "rest" in table


def test_no_profile_unless_asked_and_none_past_the_window(dataset, tmp_path):
    run(dataset, tmp_path)
    assert not (tmp_path / "profile").exists()
    spec = parse_spec(tiny_job(dataset, training={"profile": {"steps": 2, "start_step": 3}}))
    resumed = StepProfiler(spec.training.profile, tmp_path, 0, torch.device("cpu"), step=5)
    assert resumed.after_step(6) is None and resumed.close(6) is None
    assert not (tmp_path / "profile").exists()


def test_a_window_from_the_first_step_starts_at_once(dataset, tmp_path):
    spec = parse_spec(tiny_job(dataset, training={"profile": {"steps": 2, "start_step": 1}}))
    profiler = StepProfiler(spec.training.profile, tmp_path, 0, torch.device("cpu"), step=0)
    assert profiler.profiler is not None
    torch.ones(4).sum()
    assert profiler.after_step(1) is None
    assert "steps 1-2" in profiler.after_step(2)
    assert json.loads((tmp_path / "profile/rank0.json").read_text())["steps"] == 2


def test_cpu_adamw_is_fused_and_steps_like_the_reference(tmp_path):
    spec = parse_spec(tiny_job(tmp_path))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2))
    reference = torch.nn.Sequential(*[torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2)])
    reference.load_state_dict(model.state_dict())
    fused = build_optimizer(model, spec.optim)
    assert fused.defaults["fused"] is True
    plain = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]}
                               for g in build_optimizer(reference, spec.optim).param_groups],
                              lr=spec.optim.lr, betas=spec.optim.betas, eps=spec.optim.eps, foreach=False)
    x = torch.randn(16, 6)
    for _ in range(3):
        for net, opt in ((model, fused), (reference, plain)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
