"""Optimizers and schedules: parameter groups (no decay on biases/norms/cls tokens, lr multipliers), Lookahead
maths and its resumable state, and the shape of each learning-rate schedule."""

import copy
import math

import pytest
import torch
from torch import nn

from hepml_dist.spec.optim import OptimSpec, ScheduleSpec
from hepml_dist.train.optim import Lookahead, build_optimizer, build_scheduler, param_groups


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.embed = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.heads = nn.ModuleDict({"kinematics": nn.Linear(4, 2), "tau_id": nn.Linear(4, 1)})

    def forward(self, x):
        h = self.norm(self.embed(x)) + self.cls_token[0, 0]
        return self.heads["kinematics"](h).sum() + self.heads["tau_id"](h).sum()


def test_groups_split_decay_and_multipliers():
    model = Tiny()
    spec = OptimSpec(lr=1e-3, weight_decay=0.1, lr_multipliers={r"heads\.kinematics": 3.0})
    groups = param_groups(model.named_parameters(), spec)
    by_name = {name: g for g in groups for name in g["names"]}
    assert by_name["embed.weight"]["weight_decay"] == 0.1
    for name in ("embed.bias", "norm.weight", "norm.bias", "cls_token", "heads.kinematics.bias"):
        assert by_name[name]["weight_decay"] == 0.0, name
    assert by_name["heads.kinematics.weight"]["lr"] == pytest.approx(3e-3)
    assert by_name["heads.tau_id.weight"]["lr"] == pytest.approx(1e-3)


def test_frozen_parameters_are_left_out_and_all_frozen_is_an_error():
    model = Tiny()
    model.embed.weight.requires_grad_(False)
    names = {n for g in param_groups(model.named_parameters(), OptimSpec()) for n in g["names"]}
    assert "embed.weight" not in names and "embed.bias" in names
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(model.named_parameters(), OptimSpec())


def test_lookahead_interpolates_every_k_steps():
    p = nn.Parameter(torch.tensor([0.0]))
    inner = torch.optim.SGD([p], lr=1.0)
    opt = Lookahead(inner, k=2, alpha=0.5)
    for _ in range(2):
        p.grad = torch.tensor([-1.0])  # each fast step adds 1
        opt.step()
    # fast weights reached 2 after two steps; slow = 0 + 0.5 * (2 - 0) = 1 and the fast weights restart there
    assert p.item() == pytest.approx(1.0)
    p.grad = torch.tensor([-1.0])
    opt.step()
    assert p.item() == pytest.approx(2.0)


def _train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        torch.manual_seed(100 + i)
        opt.zero_grad()
        model(torch.randn(5, 3)).backward()
        opt.step()


def test_ranger_state_round_trip_continues_exactly():
    spec = OptimSpec(name="radam_lookahead", lr=1e-2, lookahead_k=3, weight_decay=0.01)
    reference = Tiny()
    ref_opt = build_optimizer(reference, spec)
    _train(reference, ref_opt, 8)

    model = Tiny()
    opt = build_optimizer(model, spec)
    _train(model, opt, 4)  # stops between two slow-weight updates
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert saved_opt["slow"] is not None and saved_opt["fast_steps"] == 4

    resumed = Tiny()
    resumed.load_state_dict(saved_model)
    resumed_opt = build_optimizer(resumed, spec)
    resumed_opt.load_state_dict(saved_opt)
    _train(resumed, resumed_opt, 4, start=4)
    for a, b in zip(reference.parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-7)


def _lrs(schedule: ScheduleSpec, total: int, lr: float = 1.0) -> list[float]:
    p = nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr": lr}], lr=lr)
    sched = build_scheduler(opt, schedule, total)
    values = []
    for _ in range(total):
        values.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return values


def test_cosine_warms_up_then_decays_to_final_ratio():
    lrs = _lrs(ScheduleSpec(name="cosine", warmup_steps=10, final_ratio=0.01), 110)
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.01, abs=1e-3)


def test_flat_then_decay_is_flat_then_exponential():
    lrs = _lrs(ScheduleSpec(name="flat_then_decay", flat_fraction=0.7, final_ratio=0.01), 100)
    assert lrs[:70] == [1.0] * 70
    # exponential: constant ratio between consecutive steps in the decay part
    ratios = [b / a for a, b in zip(lrs[71:], lrs[72:])]
    assert max(ratios) - min(ratios) < 1e-9
    assert lrs[-1] == pytest.approx(0.01 ** (29 / 30))


def test_onecycle_peaks_at_lr_and_respects_multipliers():
    p, q = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [p], "lr": 1.0}, {"params": [q], "lr": 3.0}])
    sched = build_scheduler(opt, ScheduleSpec(name="onecycle", pct_start=0.3, div_factor=25), 100)
    peak = [0.0, 0.0]
    for _ in range(99):
        peak = [max(peak[i], g["lr"]) for i, g in enumerate(opt.param_groups)]
        opt.step()
        sched.step()
    assert peak[0] == pytest.approx(1.0, rel=1e-3) and peak[1] == pytest.approx(3.0, rel=1e-3)


def test_constant_with_warmup():
    lrs = _lrs(ScheduleSpec(name="constant", warmup_steps=4), 10)
    assert lrs == pytest.approx([0.25, 0.5, 0.75, 1.0] + [1.0] * 6)
    assert not any(math.isnan(x) for x in lrs)
