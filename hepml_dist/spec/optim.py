"""Spec of the optimizer and the learning-rate schedule."""

from typing import Annotated, Literal

from pydantic import Field

from hepml_dist.spec.base import Section


class OptimSpec(Section):
    """Optimizer, weight decay, per-module learning rates and gradient clipping."""

    name: Literal["adamw", "radam_lookahead", "adam", "sgd"] = "adamw"
    """Optimizer; `radam_lookahead` is weaver's "ranger" (RAdam inside Lookahead), the ParT recipe."""
    lr: float = Field(1e-3, gt=0.0)
    """Base (peak) learning rate."""
    weight_decay: float = Field(0.01, ge=0.0)
    """Decoupled weight decay; never applied to biases, norms, 1-D parameters or class tokens."""
    betas: tuple[Annotated[float, Field(ge=0.0, lt=1.0)], Annotated[float, Field(ge=0.0, lt=1.0)]] = (0.9, 0.999)
    """Adam-style moment coefficients (ParT recipe: 0.95, 0.999)."""
    eps: float = Field(1e-8, gt=0.0)
    """Adam-style epsilon (ParT recipe: 1e-5)."""
    lookahead_k: int = Field(6, ge=1)
    """Lookahead: fast steps between slow-weight updates."""
    lookahead_alpha: float = Field(0.5, gt=0.0, le=1.0)
    """Lookahead: interpolation factor towards the fast weights."""
    lr_multipliers: dict[str, float] = Field(default_factory=dict)
    """Regex on parameter names -> learning-rate multiplier (first match wins), e.g. {'heads\\.kinematics': 3}."""
    clip_grad_norm: float | None = Field(None, gt=0.0)
    """Clip the global gradient norm to this value (after unscaling); None disables clipping."""


class ScheduleSpec(Section):
    """Learning-rate schedule, stepped once per optimizer step."""

    name: Literal["onecycle", "cosine", "flat_then_decay", "constant"] = "constant"
    """onecycle (warm-up then cosine anneal), cosine (warm-up then cosine to `final_ratio`),
    flat_then_decay (ParT: flat, then exponential decay to `final_ratio`), constant."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up steps (cosine and constant)."""
    pct_start: float = Field(0.3, gt=0.0, lt=1.0)
    """onecycle: fraction of the run spent rising to the peak."""
    div_factor: float = Field(25.0, gt=0.0)
    """onecycle: the start learning rate is lr / div_factor."""
    final_div_factor: float = Field(1e4, gt=0.0)
    """onecycle: the last learning rate is the start lr / final_div_factor."""
    cycle_momentum: bool = True
    """onecycle: cycle Adam's beta1 between 0.85 and 0.95 opposite to the learning rate."""
    flat_fraction: float = Field(0.7, ge=0.0, le=1.0)
    """flat_then_decay: fraction of the run at the full learning rate."""
    final_ratio: float = Field(0.01, ge=0.0, le=1.0)
    """cosine and flat_then_decay: last learning rate as a fraction of lr."""
