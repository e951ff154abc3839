"""`training.compile: true`: the engines run the model through torch.compile (inductor), applied from outside the
model, and a small ParT computes the same outputs and gradients as in eager mode (to float32 round-off).

Compiling costs tens of seconds of CPU per graph and shape on first use (inductor builds C++ kernels; later runs
hit torch's on-disk cache), so both tests are marked integration.
"""

import copy

import pytest
import torch
from train_helpers import tiny_job, write_jet_dataset

from hepml_dist.data.stream import ShardStream
from hepml_dist.models import build_model, get_family
from hepml_dist.spec import parse_spec
from hepml_dist.train.engine import make_engine

RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = write_jet_dataset(tmp_path_factory.mktemp("jets") / "data", examples=800)
    # no dropout and no random trimming: eager and compiled see the same function
    # two class-attention blocks as in the JetClass ParT (the case that dynamic-shape compilation got wrong)
    job = tiny_job(data, model={"dropout": 0.0, "num_cls_layers": 2}, training={"compile": True},
                   tracking={"mode": "disabled"},
                   data={"loader_workers": 0})
    spec = parse_spec(job)
    stream = ShardStream(spec.data, "train", rank=0, world_size=1, seed=0, training=True)
    batches = list(stream.batches(0))[:3]
    # and a batch of the short jets among them, of another batch size: a new shape, so the compiled graphs are
    # compiled again (one more shape would cost another minute of inductor on 2 cores and test nothing new)
    every = {k: torch.cat([b[k] for b in batches]) for k in batches[0]}
    keep = every["mask"].sum((1, 2)) <= 6
    batches.append({k: v[keep] for k, v in every.items()})
    return spec, batches


def fresh_pair(spec):
    torch.manual_seed(0)
    eager = build_model(spec)
    return eager, copy.deepcopy(eager)


def assert_close(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=RTOL, atol=ATOL, msg=lambda m: f"{what} {key}: {m}")


def frames_compiled() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["frames"].values())


@pytest.mark.integration
def test_ddp_engine_compiles_and_matches_eager(setup):
    spec, batches = setup
    family = get_family(spec.model.family)
    eager, model = fresh_pair(spec)
    before = frames_compiled()
    engine = make_engine(model, spec, torch.device("cpu"), total_steps=10)
    assert engine.module is model and engine.model is model  # one process: no DDP wrapper, compiled in place
    assert not any("_orig_mod" in k for k in model.state_dict())  # checkpoints keep the bare model's names

    lengths = [int(b["mask"].sum((1, 2)).max()) for b in batches]
    assert lengths[3] < lengths[0] and len(batches[3]["mask"]) != len(batches[0]["mask"])
    for batch in (batches[0], batches[3], batches[1]):  # training mode, forward and backward
        out_eager, out_compiled = eager(batch), engine.forward(batch)
        assert_close(out_eager, out_compiled, "train output")
        loss_eager = sum(family.losses(out_eager, batch, spec).values())
        loss_compiled = sum(family.losses(out_compiled, batch, spec).values())
        loss_eager.backward()
        engine.backward({"loss": loss_compiled}, last_micro_batch=True)
        grads_eager = {n: p.grad for n, p in eager.named_parameters() if p.grad is not None}
        grads_compiled = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert len(grads_compiled) == len(list(model.parameters()))
        assert_close(grads_eager, grads_compiled, "gradient")
        eager.zero_grad(set_to_none=True)
        model.zero_grad(set_to_none=True)
    assert frames_compiled() > before, "torch.compile traced nothing: the model ran eagerly"

    eager.eval()
    model.eval()
    with torch.no_grad():
        assert_close(eager(batches[2]), engine.eval_forward(batches[2]), "eval output")


@pytest.mark.integration
def test_deepspeed_engine_compiles_and_trains_like_eager(setup, monkeypatch):
    import torch.distributed as dist

    spec, batches = setup
    spec = spec.model_copy(update={"parallel": spec.parallel.model_copy(update={"strategy": "deepspeed", "zero_stage": 2})})
    family = get_family(spec.model.family)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    import socket

    with socket.socket() as probe:  # a free port on loopback
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        eager_model, compiled_model = fresh_pair(spec)
        eager = make_engine(eager_model, spec.model_copy(update={"training": spec.training.model_copy(update={"compile": False})}),
                            torch.device("cpu"), total_steps=10)
        compiled = make_engine(compiled_model, spec, torch.device("cpu"), total_steps=10)
        assert compiled.engine.is_compiled and not eager.engine.is_compiled
        initial = {k: v.detach().clone() for k, v in compiled.eval_module().state_dict().items()}
        for step, batch in enumerate(batches[:3]):  # outputs after 0, 1 and 2 optimizer steps
            outputs = {}
            for name, engine in (("eager", eager), ("compiled", compiled)):
                outputs[name] = engine.forward(batch)
                engine.backward(family.losses(outputs[name], batch, spec), last_micro_batch=True)
                engine.step(step)
            assert_close(outputs["eager"], outputs["compiled"], f"step {step} output")
        # (weights themselves are not compared: a bias right before BatchNorm has a true gradient of zero, and
        # Adam's first steps turn its round-off gradient into +-lr in either mode)
        moved = compiled.eval_module().state_dict()
        assert any(not torch.equal(initial[k], moved[k]) for k in initial), "the compiled engine did not train"
    finally:
        dist.destroy_process_group()
