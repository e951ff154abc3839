"""Spec of the training run: length, precision, multi-task strategy, evaluation and fine-tuning."""

from typing import Literal

from pydantic import Field

from hepml_dist.spec.base import Section


class PcgradSpec(Section):
    """Projecting conflicting gradients (Yu et al., arXiv:2001.06782)."""

    mode: Literal["global", "local"] = "global"
    """global: project the gradients of the whole global batch (one all-reduce of all task gradients;
    the paper's algorithm); local: project per rank, then average (cheaper, noisier)."""
    order: Literal["seeded", "fixed"] = "seeded"
    """Order in which other tasks are projected out: shuffled with a seed shared by all ranks, or task order."""
    protect: list[str] = Field(default_factory=list)
    """Tasks whose gradients are never projected (MultiParTau's reference protects kinematics)."""


class PhaseSpec(Section):
    """A later training phase in which only some modules learn (MultiParTau phase 2)."""

    start_epoch: int = Field(ge=1)
    """First epoch (1-based) of the phase."""
    trainable: list[str] = Field(min_length=1)
    """Regexes on parameter names that learn from this phase on; everything else is frozen. The phase replaces
    `training.freeze`, so it can also unfreeze modules."""
    lr: float | None = Field(None, gt=0.0)
    """New base learning rate for the phase (a fresh optimizer and cosine schedule); None keeps the current one."""


class ProfileSpec(Section):
    """torch.profiler over a few optimizer steps on every rank: where each millisecond of a step goes."""

    steps: int = Field(0, ge=0, le=100)
    """Optimizer steps to profile; 0 (the default) profiles nothing. Each rank writes RUN_DIR/profile/rank<r>.txt
    (milliseconds per step in each phase: data wait, forward, losses, step flags, backward, optimizer, and the
    rest; then the operators by own CPU time), rank<r>.json (the same numbers) and rank<r>.trace.json (a Chrome
    trace: open it in ui.perfetto.dev). Profiled steps run slower than the others (the profiler's own cost)."""
    start_step: int = Field(20, ge=1)
    """First profiled optimizer step (1-based); later than the first steps, which warm up the allocator and caches."""


class TrainingSpec(Section):
    """How long and how to train."""

    epochs: int | None = Field(None, ge=1)
    """Epochs to train (each `data.steps_per_epoch` steps); exactly one of epochs and steps is set."""
    steps: int | None = Field(None, ge=1)
    """Optimizer steps to train; exactly one of epochs and steps is set."""
    precision: Literal["fp32", "bf16-mixed", "fp16-mixed"] = "fp32"
    """Numerical precision: fp32, bf16 autocast, or fp16 autocast with dynamic loss scaling (a GradScaler; DeepSpeed's
    own scaler under DeepSpeed). fp16 on CPU runs too, for testing the fp16 path (the driver says so)."""
    fp16_initial_scale_power: int = Field(16, ge=0, le=64)
    """fp16-mixed: the loss scale starts at 2**power and halves after every step whose gradients overflow (that step
    is skipped and counted as `overflow_steps`), doubling again after 2000 clean steps (1000 under DeepSpeed)."""
    grad_accum: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""
    multitask: Literal["sum", "pcgrad"] = "sum"
    """How task losses combine: weighted sum, or PCGrad gradient surgery."""
    pcgrad: PcgradSpec = Field(default_factory=PcgradSpec)
    """PCGrad settings (used when multitask is pcgrad)."""
    eval_interval: int = Field(1000, ge=1)
    """Optimizer steps between validations (and reports to Ray)."""
    log_interval: int = Field(50, ge=1)
    """Optimizer steps between training-metric log lines."""
    seed: int = Field(42, ge=0, lt=2**63)
    """Seed of model initialisation, data order and dropout."""
    init_from: str | None = None
    """Checkpoint (or run directory) whose weights initialise the model, loaded after any weight initialisation."""
    init_modules: list[str] = Field(default_factory=list)
    """Regexes on parameter names to load from `init_from`; empty loads every matching name."""
    freeze: list[str] = Field(default_factory=list)
    """Regexes on parameter names that do not train (e.g. the OmniJet backbone in frozen mode)."""
    phases: list[PhaseSpec] = Field(default_factory=list)
    """Later phases that change which modules train (each replaces the one before and `freeze`)."""
    nan_policy: Literal["raise", "skip"] = "raise"
    """A non-finite loss stops the run with an error naming step and task, or skips that batch."""
    nan_skip_limit: int = Field(100, ge=1)
    """nan_policy skip: the run stops (naming the step and task) once more than this many micro-batches were
    skipped, since a model that keeps producing NaN has diverged and skipping only hides it."""
    profile: ProfileSpec = Field(default_factory=ProfileSpec)
    """Profiling of a few steps (off unless profile.steps is set), e.g. --set training.profile.steps=10."""
    compile: bool = False
    """Wrap the model with torch.compile (inductor, static shapes; ParT then runs its static-shape code). Slower
    on CPU (0.61x eager for MultiParTau, 0.13x for ParT JetClass): see docs/predict-and-tune.md before switching it on."""
