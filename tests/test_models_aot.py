"""AnalysisObjectTransformer: invariances, learned class token, event-feature fusion modes, gradients, logits out."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hepml_dist.errors import UserError
from hepml_dist.models import build_model, get_family
from hepml_dist.spec import load_job

ROOT = Path(__file__).resolve().parents[1]


def spec_of(*overrides: str):
    return load_job(ROOT / "jobs/aot-quickstart.yaml", list(overrides))


def model_of(*overrides: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(spec_of(*overrides))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm1d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def events(num: int, length: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = torch.randint(0, length + 1, (num,), generator=g)
    mask = (torch.arange(length)[None] < n[:, None]).float()[:, None]
    return {
        "features": torch.randn(num, 6, length, generator=g) * mask,
        "mask": mask,
        "event_features": 100 * torch.rand(num, 4, generator=g),  # HT, MET in GeV: unscaled on purpose
        "label_signal": torch.randint(0, 2, (num,), generator=g),
        "weight": torch.rand(num, generator=g),
    }


@pytest.mark.parametrize("fusion", ["concat_head", "token", "none"])
def test_invariant_to_object_order_padding_and_padded_values(fusion):
    model = model_of(f"model.event_fusion={fusion}")
    batch = events(6, 8, seed=1)
    order = torch.randperm(8)
    shuffled = {**batch, "features": batch["features"][..., order], "mask": batch["mask"][..., order]}
    longer = {**batch, "features": F.pad(batch["features"], (0, 12), value=7.0), "mask": F.pad(batch["mask"], (0, 12))}
    with torch.no_grad():
        reference = model(batch)["signal"]
        torch.testing.assert_close(model(shuffled)["signal"], reference, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(longer)["signal"], reference, atol=1e-5, rtol=1e-5)
    assert reference.shape == (6, 1)


def test_event_features_change_the_output_unless_fusion_is_none():
    batch = events(4, 6)
    other = {**batch, "event_features": batch["event_features"].flip(0)}
    with torch.no_grad():
        for fusion, uses_events in (("concat_head", True), ("token", True), ("none", False)):
            model = model_of(f"model.event_fusion={fusion}")
            changed = not torch.allclose(model(batch)["signal"], model(other)["signal"])
            assert changed == uses_events, fusion


def test_class_token_is_a_learned_parameter_and_outputs_are_logits():
    model = model_of()
    assert "pathway.cls_token" in dict(model.named_parameters())
    batch = events(64, 6, seed=2)
    with torch.no_grad():
        first, second = model(batch)["signal"], model(batch)["signal"]
    torch.testing.assert_close(first, second)  # no token re-drawn per call
    model.heads["signal"][-1].bias.data.fill_(5.0)
    with torch.no_grad():
        assert (model(batch)["signal"] > 1).any()  # not squashed by a sigmoid


def test_every_parameter_gets_a_gradient():
    spec = spec_of()
    for fusion in ("concat_head", "token"):
        model = model_of(f"model.event_fusion={fusion}").train()
        batch = events(32, 6, seed=3)
        loss = get_family("aot").losses(model(batch), batch, spec)["signal"]
        loss.backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, (fusion, name)


def test_event_with_no_objects_is_finite():
    model = model_of()
    batch = events(3, 5)
    batch["mask"][1] = 0.0
    with torch.no_grad():
        assert torch.isfinite(model(batch)["signal"]).all()


def test_event_fusion_without_event_features_is_a_clear_error():
    spec = spec_of("data.inputs.event_features=[]")
    with pytest.raises(UserError, match="data.inputs.event_features"):
        build_model(spec)
