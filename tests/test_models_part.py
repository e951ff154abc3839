"""ParT family: reference parameter counts, equality with weaver-core's ParticleTransformer, attention, invariances,
gradients, mixed precision and training-time trimming. Small configurations except for the parameter counts."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from hepml_dist.cli import app
from hepml_dist.inference.export import example_jets
from hepml_dist.models import build_model, count_parameters, get_family
from hepml_dist.models.blocks import Attention, masked_value
from hepml_dist.models.part.model import TRIM_WARMUP_CALLS, state_dict_from_weaver
from hepml_dist.spec import load_job

ROOT = Path(__file__).resolve().parents[1]


def spec_of(job: str, *overrides: str):
    return load_job(ROOT / "jobs" / f"{job}.yaml", list(overrides))


def model_of(job: str, *overrides: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build_model(spec_of(job, *overrides))
    # Non-trivial running statistics, so eval-mode tests exercise the BatchNorm layers.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def padded(batch: dict, length: int, fill: float = 0.0) -> dict:
    """The same jets with the constituent axis padded to `length` (padding filled with `fill`)."""
    extra = length - batch["mask"].shape[-1]
    return {
        "features": F.pad(batch["features"], (0, extra), value=fill),
        "vectors": F.pad(batch["vectors"], (0, extra), value=fill),
        "mask": F.pad(batch["mask"], (0, extra), value=0.0),
    }


def test_reference_parameter_counts():
    assert count_parameters(spec_of("part-jetclass")) == 2_143_486
    assert count_parameters(spec_of("sophon")) == 2_304_688
    model = build_model(spec_of("part-jetclass"))  # the meta-device count is the real one
    assert sum(p.numel() for p in model.parameters()) == 2_143_486


def test_show_params_prints_the_count():
    result = CliRunner().invoke(app, ["show", str(ROOT / "jobs/sophon.yaml"), "--params"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "parameters: 2304688"


@pytest.mark.parametrize("overrides", [(), ("model.use_pre_activation_pair=true", "model.head.hidden=[24]")])
def test_equals_weaver_core_particle_transformer(overrides):
    """weaver-core's model with random weights; ours loads them through state_dict_from_weaver and must agree."""
    from weaver.nn.model.ParticleTransformer import ParticleTransformer as WeaverParT

    spec = spec_of("part-quickstart", *overrides)
    m = spec.model
    torch.manual_seed(1)
    reference = WeaverParT(
        input_dim=17, num_classes=5, pair_input_dim=4, use_pre_activation_pair=m.use_pre_activation_pair,
        embed_dims=m.embed_dims, pair_embed_dims=m.pair_embed_dims, num_heads=m.num_heads, num_layers=m.num_layers,
        num_cls_layers=m.num_cls_layers, fc_params=[(w, 0.1) for w in m.head.hidden], trim=True,
    ).eval()
    for module in reference.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    state = reference.state_dict()
    # The published 2022 checkpoints use nn.MultiheadAttention names inside a wrapper's `mod.`.
    published = {"mod." + k.replace("in_proj.weight", "in_proj_weight").replace("in_proj.bias", "in_proj_bias"): v
                 for k, v in state.items()}
    model = build_model(spec).eval()
    model.load_state_dict(state_dict_from_weaver(published, "jet_class"), strict=True)
    batch = example_jets(6, 30, 17, seed=3)
    with torch.no_grad():
        ours = model(batch)["jet_class"]
        theirs = reference(batch["features"], batch["vectors"], batch["mask"])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def plain_attention(attn: Attention, query, keys, bias):
    """softmax(Q K^T / sqrt(d) + bias) V, written out."""
    dim, heads = query.shape[-1], attn.num_heads
    w, b = attn.in_proj.weight, attn.in_proj.bias
    q = F.linear(query, w[:dim], b[:dim])
    k = F.linear(keys, w[dim : 2 * dim], b[dim : 2 * dim])
    v = F.linear(keys, w[2 * dim :], b[2 * dim :])
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(dim // heads) + bias
    out = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)
    return attn.out_proj(out)


def test_sdpa_attention_equals_plain_softmax_with_bias_and_mask():
    torch.manual_seed(0)
    attn = Attention(32, 4, dropout=0.0).eval()
    x = torch.randn(3, 10, 32)
    bias = torch.randn(3, 4, 10, 10)
    padded_keys = torch.zeros(3, 1, 1, 10, dtype=torch.bool)
    padded_keys[1, ..., 6:] = True
    bias = bias.masked_fill(padded_keys, masked_value(torch.float32))
    torch.testing.assert_close(attn(x, None, bias), plain_attention(attn, x, x, bias), atol=1e-5, rtol=1e-5)
    cls = torch.randn(3, 1, 32)  # class attention: another query than the keys
    torch.testing.assert_close(attn(cls, x, bias[:, :, :1]), plain_attention(attn, cls, x, bias[:, :, :1]), atol=1e-5, rtol=1e-5)
    every_key_masked = torch.full((3, 1, 1, 10), masked_value(torch.float32))
    assert torch.isfinite(attn(x, None, every_key_masked)).all()


@pytest.mark.parametrize("job", ["part-quickstart", "multipartau-quickstart"])
def test_invariant_to_constituent_order(job):
    model = model_of(job)
    batch = example_jets(5, 20, model.input_dim, seed=1)
    order = torch.randperm(20)  # shuffles real and padded slots together
    shuffled = {k: v[..., order] for k, v in batch.items()}
    with torch.no_grad():
        a, b = model(batch), model(shuffled)
    for task in a:
        torch.testing.assert_close(a[task], b[task], atol=1e-5, rtol=1e-5)


def test_invariant_to_amount_of_padding_and_to_padded_values():
    model = model_of("part-quickstart")
    batch = example_jets(5, 20, 17, seed=2)
    with torch.no_grad():
        short = model(batch)["jet_class"]
        long = model(padded(batch, 64))["jet_class"]
        garbage = padded(batch, 64)
        pad = garbage["mask"] == 0
        garbage["features"] = torch.where(pad, 100 * torch.randn_like(garbage["features"]), garbage["features"])
        garbage["vectors"] = torch.where(pad, 1000 * torch.rand_like(garbage["vectors"]), garbage["vectors"])
        noisy = model(garbage)["jet_class"]
    torch.testing.assert_close(short, long, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(short, noisy, atol=1e-5, rtol=1e-5)


def test_jet_without_particles_gives_finite_outputs():
    model = model_of("part-quickstart")
    batch = example_jets(4, 12, 17)
    batch["mask"][2] = 0.0
    with torch.no_grad():
        assert torch.isfinite(model(batch)["jet_class"]).all()
    model.train()
    assert torch.isfinite(model(batch)["jet_class"]).all()


def tau_labels(batch_size: int, generator: torch.Generator) -> dict:
    is_tau = torch.randint(0, 2, (batch_size,), generator=generator)
    labels = {
        "label_is_tau": is_tau,
        "label_charge": torch.where(is_tau == 1, torch.randint(0, 2, (batch_size,), generator=generator), -1),
        "label_decay_mode": torch.where(is_tau == 1, torch.randint(0, 6, (batch_size,), generator=generator), -1),
    }
    for name in ("log_pt_ratio", "delta_eta", "sin_delta_phi", "cos_delta_phi", "log_mass_ratio"):
        labels[f"target_{name}"] = torch.randn(batch_size, generator=generator)
    return labels


def test_every_parameter_gets_a_gradient_with_all_task_losses():
    spec = spec_of("multipartau-quickstart")
    model = model_of("multipartau-quickstart").train()
    g = torch.Generator().manual_seed(0)
    # SGD steps in between: the particle-weight head's zero-initialised output layers pass gradients on from step 2
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    for step in range(TRIM_WARMUP_CALLS + 1):  # the last step trims
        optimizer.zero_grad()
        batch = {**example_jets(16, 20, model.input_dim, seed=step), **tau_labels(16, g)}
        losses = get_family("part").losses(model(batch), batch, spec)
        sum(losses.values()).backward()
        optimizer.step()
    assert set(losses) == {"tau_id", "charge", "decay_mode", "kinematics"}
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_bf16_autocast_is_close_to_fp32():
    model = model_of("part-quickstart")
    batch = example_jets(8, 24, 17, seed=4)
    with torch.no_grad():
        fp32 = model(batch)["jet_class"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(batch)["jet_class"]
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), fp32, atol=0.05, rtol=0.05)


def test_training_trims_to_a_quantile_length_keeping_real_particles():
    model = model_of("part-quickstart").train()
    batch = example_jets(40, 32, 17, seed=5)
    batch["features"][:, 0] = torch.arange(1, 33).float() * batch["mask"][:, 0]  # particle ids, 0 in padding
    n_real = batch["mask"].sum(dim=(1, 2))
    lengths = set()
    for _ in range(TRIM_WARMUP_CALLS + 20):
        features, vectors, mask = model.select_particles(batch["features"], batch["vectors"], batch["mask"][:, 0] > 0.5)
        length = mask.shape[1]
        lengths.add(length)
        assert torch.quantile(n_real, 0.9) - 1 <= length <= n_real.max()
        ids = features[:, 0] * mask
        for jet in range(40):
            kept = set(ids[jet][mask[jet]].long().tolist())
            assert len(kept) == min(int(n_real[jet]), length) and kept <= set(range(1, int(n_real[jet]) + 1))
    assert int(n_real.max()) in lengths  # warm-up calls and q >= 1 keep everything
    assert len(lengths) > 1


def test_task_modules_are_named_after_their_task():
    names = [n for n, _ in model_of("multipartau-quickstart").named_parameters()]
    for task in ("tau_id", "charge", "decay_mode", "kinematics"):
        assert any(n.startswith(f"pathways.{task}.cls_token") for n in names)
        assert any(n.startswith(f"heads.{task}.") for n in names)
    shared = [n for n, _ in model_of("part-quickstart").named_parameters()]
    assert "pathways.shared.cls_token" in shared and not any(n.startswith("pathways.jet_class") for n in shared)


def test_moco_init_scales_output_projections_with_depth():
    model = model_of("part-quickstart", "model.init=moco", "model.num_layers=3")
    dim = 32
    xavier_bound = math.sqrt(6 / (dim + dim))
    for layer, block in enumerate(model.blocks, start=1):
        bound = xavier_bound / math.sqrt(2 * layer)
        assert block.attn.out_proj.weight.abs().max() <= bound
        assert block.attn.out_proj.weight.abs().max() > 0.8 * bound
        assert block.attn.in_proj.bias.abs().max() == 0


@pytest.mark.parametrize("job", ["part-quickstart", "multipartau-quickstart"])
def test_static_shape_code_trains_like_the_packed_code(job):
    """`static_shapes` (what torch.compile runs): dense pairs, lengths rounded up to 16; the same outputs,
    gradients and BatchNorm running statistics as the packed code in training mode, and in eval mode."""
    packed, static = (model_of(job, "model.trim=false").train() for _ in range(2))
    for module in (*packed.modules(), *static.modules()):  # the same function: no dropout anywhere
        if isinstance(module, (torch.nn.Dropout, Attention)):
            module.p = module.dropout = 0.0
    static.static_shapes = True
    spec = spec_of(job)
    g = torch.Generator().manual_seed(1)
    batch = padded(example_jets(12, 19, packed.input_dim, seed=3), 40)
    if job.startswith("multipartau"):
        batch |= tau_labels(12, g)
    else:
        batch["label_jet_class"] = torch.randint(0, spec.tasks[0].output_dim, (12,), generator=g)
    family = get_family("part")
    outputs = {}
    for name, model in (("packed", packed), ("static", static)):
        outputs[name] = model(batch)
        sum(family.losses(outputs[name], batch, spec).values()).backward()
    for task in outputs["packed"]:
        torch.testing.assert_close(outputs["static"][task], outputs["packed"][task], atol=2e-5, rtol=1e-4)
    grads = {n: p.grad for n, p in packed.named_parameters()}
    for n, p in static.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=2e-5, rtol=1e-3, msg=lambda m: f"{n}: {m}")
    buffers = dict(packed.named_buffers())
    for n, b in static.named_buffers():
        torch.testing.assert_close(b, buffers[n], atol=1e-5, rtol=1e-5, msg=lambda m: f"{n}: {m}")
    packed.eval(), static.eval()
    with torch.no_grad():
        for task, value in packed(batch).items():
            torch.testing.assert_close(static(batch)[task], value, atol=2e-5, rtol=1e-4)
