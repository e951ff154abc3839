"""Optimizers and learning-rate schedules built from the spec's `optim` and `schedule` sections.

Parameter groups carry the per-module learning-rate multipliers (`optim.lr_multipliers`, first matching regex wins)
and keep weight decay off 1-D parameters, biases, norms and class tokens (weaver's `init_opt` rule).
`radam_lookahead` is weaver's "ranger": torch's RAdam inside `Lookahead`, whose slow weights are part of its
state_dict, so a resumed run continues exactly (weaver loses them on resume).
"""

import math
import re
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

from hepml_dist.spec.optim import OptimSpec, ScheduleSpec

NO_DECAY_NAMES = ("bias", "norm", "cls_token", "class_token")


def decays(name: str, param: nn.Parameter) -> bool:
    """Whether weight decay applies: not to 1-D tensors, biases, norms or class tokens."""
    lowered = name.lower()
    return param.ndim > 1 and not any(part in lowered for part in NO_DECAY_NAMES)


def lr_multiplier(name: str, multipliers: dict[str, float]) -> float:
    for pattern, factor in multipliers.items():
        if re.search(pattern, name):
            return factor
    return 1.0


def param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]], optim: OptimSpec, include_frozen: bool = False
) -> list[dict]:
    """Parameters grouped by (lr multiplier, decay); each group records its multiplier and names.

    Frozen parameters are left out unless `include_frozen`: torch optimizers skip parameters whose grad is None, so
    holding them costs nothing while frozen, and a later phase that unfreezes them trains them with this optimizer.
    """
    groups: dict[tuple[float, bool], dict] = {}
    for name, param in named_params:
        if not param.requires_grad and not include_frozen:
            continue
        factor = lr_multiplier(name, optim.lr_multipliers)
        decay = decays(name, param) and optim.weight_decay > 0
        group = groups.setdefault(
            (factor, decay),
            {
                "params": [],
                "names": [],
                "lr": optim.lr * factor,
                "lr_multiplier": factor,
                "weight_decay": optim.weight_decay if decay else 0.0,
            },
        )
        group["params"].append(param)
        group["names"].append(name)
    if not groups:
        raise ValueError("no trainable parameters: training.freeze (or a phase's trainable list) froze them all")
    return list(groups.values())


class Lookahead(Optimizer):
    """Lookahead (Zhang et al., arXiv:1907.08610) around any optimizer: every k fast steps the slow weights move
    `alpha` of the way towards the fast ones and the fast weights restart from there.

    Shares `param_groups` with the inner optimizer, so schedulers and GradScaler see one set of groups.
    The slow weights and the fast-step counter are saved in `state_dict()`.
    """

    def __init__(self, inner: Optimizer, k: int = 6, alpha: float = 0.5):
        if k < 1 or not 0.0 < alpha <= 1.0:
            raise ValueError(f"Lookahead needs k >= 1 and 0 < alpha <= 1, got k={k}, alpha={alpha}")
        super().__init__(inner.param_groups, inner.defaults)
        self.param_groups = inner.param_groups
        self.inner, self.k, self.alpha = inner, k, alpha
        self.fast_steps = 0
        self.slow: list[torch.Tensor] | None = None  # created from the weights at the first step

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):  # type: ignore[override]
        if self.slow is None:
            self.slow = [p.detach().clone() for p in self._params()]
        loss = self.inner.step(closure)
        self.fast_steps += 1
        if self.fast_steps % self.k == 0:
            for fast, slow in zip(self._params(), self.slow):
                slow.add_(fast - slow, alpha=self.alpha)
                fast.copy_(slow)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {
            "inner": self.inner.state_dict(),
            "slow": None if self.slow is None else [s.clone() for s in self.slow],
            "fast_steps": self.fast_steps,
            "k": self.k,
            "alpha": self.alpha,
        }

    def load_state_dict(self, state_dict: dict) -> None:
        self.inner.load_state_dict(state_dict["inner"])
        self.param_groups = self.inner.param_groups
        self.fast_steps = int(state_dict["fast_steps"])
        slow = state_dict["slow"]
        params = self._params()
        if slow is not None and len(slow) != len(params):
            raise ValueError(f"Lookahead state has {len(slow)} slow weights for {len(params)} parameters")
        self.slow = None if slow is None else [s.to(p.device, p.dtype).clone() for s, p in zip(slow, params)]


def fused_on_cpu(groups: list[dict]) -> dict[str, bool]:
    """`fused=True` where every parameter is an fp32 CPU tensor. torch's CPU default is a Python loop of several
    kernels per parameter (11.7 % of a ParT tau-ID step on 2 cores, 378 copies per step); the fused kernel does
    each parameter in one pass. GPU parameters keep torch's default (multi-tensor `foreach`)."""
    params = [p for group in groups for p in group["params"]]
    cpu = bool(params) and all(p.device.type == "cpu" and p.dtype == torch.float32 for p in params)
    return {"fused": True} if cpu else {}


def _adamw(groups: list[dict], o: OptimSpec) -> Optimizer:
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                             **fused_on_cpu(groups))


def _adam(groups: list[dict], o: OptimSpec) -> Optimizer:
    # Adam with L2-coupled decay is what `adam` means; use adamw for decoupled decay.
    return torch.optim.Adam(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                            **fused_on_cpu(groups))


def _sgd(groups: list[dict], o: OptimSpec) -> Optimizer:
    return torch.optim.SGD(groups, lr=o.lr, momentum=o.betas[0], nesterov=True, weight_decay=o.weight_decay)


def _radam_lookahead(groups: list[dict], o: OptimSpec) -> Optimizer:
    radam = torch.optim.RAdam(groups, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay, decoupled_weight_decay=True)
    return Lookahead(radam, k=o.lookahead_k, alpha=o.lookahead_alpha)


OPTIMIZERS: dict[str, Callable[[list[dict], OptimSpec], Optimizer]] = {
    "adamw": _adamw,
    "adam": _adam,
    "sgd": _sgd,
    "radam_lookahead": _radam_lookahead,
}


def build_optimizer(model: nn.Module, optim: OptimSpec, lr: float | None = None) -> Optimizer:
    """The optimizer over all the model's parameters (frozen ones wait with grad None until a phase unfreezes them);
    `lr` overrides the base learning rate (phases)."""
    spec = optim if lr is None else optim.model_copy(update={"lr": lr})
    return OPTIMIZERS[spec.name](param_groups(model.named_parameters(), spec, include_frozen=True), spec)


# ----------------------------------------------------------------------------------------------------------------
# Schedules: factor of each group's base lr as a function of the optimizer step (LambdaLR), or torch's OneCycleLR.


def _warmup(step: int, warmup: int) -> float:
    return min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0


def constant_factor(s: ScheduleSpec, total: int) -> Callable[[int], float]:
    return lambda step: _warmup(step, s.warmup_steps)


def cosine_factor(s: ScheduleSpec, total: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < s.warmup_steps:
            return _warmup(step, s.warmup_steps)
        progress = min(1.0, (step - s.warmup_steps) / max(1, total - s.warmup_steps))
        return s.final_ratio + (1.0 - s.final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def flat_then_decay_factor(s: ScheduleSpec, total: int) -> Callable[[int], float]:
    """ParT/weaver `flat+decay`: full lr for `flat_fraction` of the run, then exponential decay to `final_ratio`
    (weaver decays once per epoch; here every step, which ends at the same place without jumps)."""
    flat = int(round(s.flat_fraction * total))

    def factor(step: int) -> float:
        if step < s.warmup_steps:
            return _warmup(step, s.warmup_steps)
        if step < flat or total <= flat:
            return 1.0
        progress = min(1.0, (step - flat) / max(1, total - flat))
        return s.final_ratio**progress if s.final_ratio > 0 else 1.0 - progress

    return factor


LAMBDA_SCHEDULES: dict[str, Callable[[ScheduleSpec, int], Callable[[int], float]]] = {
    "constant": constant_factor,
    "cosine": cosine_factor,
    "flat_then_decay": flat_then_decay_factor,
}


def build_scheduler(optimizer: Optimizer, schedule: ScheduleSpec, total_steps: int) -> LRScheduler:
    """The lr scheduler, stepped once per optimizer step over `total_steps` steps."""
    if schedule.name == "onecycle":
        return OneCycleLR(
            optimizer,
            max_lr=[group["lr"] for group in optimizer.param_groups],
            total_steps=max(total_steps, 2),
            pct_start=schedule.pct_start,
            div_factor=schedule.div_factor,
            final_div_factor=schedule.final_div_factor,
            cycle_momentum=schedule.cycle_momentum,
            base_momentum=0.85,
            max_momentum=0.95,
            anneal_strategy="cos",
        )
    return LambdaLR(optimizer, LAMBDA_SCHEDULES[schedule.name](schedule, total_steps))
