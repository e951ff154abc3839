"""The engine interface of the training loop, and the factory that applies data parallelism to a model from outside.

The loop sees one `Engine`: `forward` and `backward` per micro-batch, `step` per optimizer step (PCGrad
projection, unscale, clip, step, schedule), `eval_forward` for validation, and the checkpoint hooks. `make_engine`
builds the DDP engine (hepml_dist.train.ddp; PCGrad, single process) or the DeepSpeed engine
(hepml_dist.train.deepspeed_engine) from the job's sections, optionally torch.compile'd, and hands the model's
`CrossRankState` modules the process group's collectives.
"""

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from hepml_dist.models import get_family
from hepml_dist.models.blocks import CrossRankState
from hepml_dist.precision import require_precision
from hepml_dist.spec import JobSpec
from hepml_dist.train.ddp import DdpEngine, make_pcgrad, wrap_ddp
from hepml_dist.train.deepspeed_engine import make_deepspeed_engine
from hepml_dist.train.distributed import ProcessGroupCollectives, broadcast_parameters, is_distributed
from hepml_dist.train.optim import build_optimizer, build_scheduler

Batch = dict[str, torch.Tensor]


class Engine(Protocol):
    """What the training loop calls; `module` is the bare single-device model (its state_dict is model.pt)."""

    module: nn.Module
    model: Any  # what forward runs through: the DDP wrapper, the DeepSpeed engine, or `module` itself
    grad_norm: float
    task_weights: dict[str, float]  # PCGrad's weights of the last step (empty without PCGrad)

    def forward(self, batch: Batch) -> Batch: ...

    def backward(self, losses: dict[str, torch.Tensor], last_micro_batch: bool) -> None: ...

    def skip_micro_batch(self, last_micro_batch: bool) -> None: ...

    def step(self, step: int, measure_grad_norm: bool = True) -> bool:
        """The optimizer step; False when fp16 loss scaling found overflowing gradients and skipped it.
        `measure_grad_norm`: set `grad_norm` (always done when gradients are clipped, which needs it)."""

    def lr(self) -> float: ...

    def eval_module(self) -> nn.Module: ...

    def eval_forward(self, batch: Batch) -> Batch: ...

    def after_eval(self) -> None: ...

    def save_shards(self, folder: Path) -> None:
        """Every rank: write its own part of the training state into the checkpoint folder being assembled."""

    def full_state_dict(self, folder: Path | None = None) -> dict[str, torch.Tensor] | None:
        """The fp32 weights of the bare model on rank 0 (None elsewhere)."""

    def train_state(self) -> dict[str, Any] | None:
        """Optimizer, scheduler and scaler state for rank 0's training.pt (None: kept in the shards)."""

    def load(self, folder: Path) -> None: ...

    def rewrap(self) -> None:
        """Re-register the trainable parameters after requires_grad changed (a new training phase)."""


COMPILE_BACKEND = "inductor"
# Static shapes: one graph per shape (ParT's static-shape code keeps them few). Dynamic-shape graphs are not used:
# torch 2.13 reuses a backward kernel with the strides of an earlier length in ParT's class-attention blocks
# (an assert_size_stride failure in backward, seen with tests/test_compile.py's two class blocks; pytorch#165506).
COMPILE_OPTIONS = {"backend": COMPILE_BACKEND, "dynamic": False}
COMPILE_RECOMPILE_LIMIT = 32


def prepare_for_compile(module: nn.Module, family_name: str) -> None:
    """Switch a model with data-dependent shapes to its static-shape code (the family's `use_static_shapes`; ParT
    and its descendants: sequence lengths rounded up to a multiple of 16 instead of one graph per batch length),
    and give torch room for the few graphs that remain (train and eval, each bucket of lengths, the last batch)."""
    family = get_family(family_name)
    if family.use_static_shapes is not None:
        family.use_static_shapes(module)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_RECOMPILE_LIMIT)


def compile_model(module: nn.Module, family_name: str) -> nn.Module:
    """torch.compile the bare model in place (`nn.Module.compile`), before any DDP wrapper: parameter names and
    state_dict keys stay as they are (no `_orig_mod.` prefix), so checkpoints, freezing regexes and `eval_module`
    are unchanged, and evaluation runs compiled too. Data-dependent parts (ParT's packing and trimming) become
    graph breaks, not errors. Compiled once per module (a new phase's engine reuses it)."""
    if getattr(module, "_compiled_call_impl", None) is None:
        prepare_for_compile(module, family_name)
        module.compile(**COMPILE_OPTIONS)
    return module


def share_collectives(module: nn.Module) -> None:
    """Give the model's CrossRankState modules (the OmniJet codebook) the process group's collectives."""
    if is_distributed():
        for sub in module.modules():
            if isinstance(sub, CrossRankState):
                sub.collectives = ProcessGroupCollectives()


def make_ddp_engine(module: nn.Module, spec: JobSpec, device: torch.device, total_steps: int, lr: float | None = None,
                    schedule_start: int = 0) -> DdpEngine:
    """DDP (or a single process); with PCGrad the model stays unwrapped and PCGrad does the one all-reduce.
    `lr` (a phase's own learning rate) starts a fresh cosine schedule at `schedule_start`."""
    module = module.to(device)
    if spec.training.compile:
        compile_model(module, spec.model.family)
    optimizer = build_optimizer(module, spec.optim, lr=lr)
    schedule = spec.schedule if lr is None else spec.schedule.model_copy(update={"name": "cosine", "warmup_steps": 0})
    scheduler = build_scheduler(optimizer, schedule, total_steps - schedule_start)
    scaler = None
    if spec.training.precision == "fp16-mixed":
        scaler = torch.amp.GradScaler(device.type, init_scale=2.0 ** spec.training.fp16_initial_scale_power)
    tasks = [t.name for t in spec.tasks]
    sections = dict(device=device, training=spec.training, optim=spec.optim, parallel=spec.parallel, task_names=tasks,
                    scaler=scaler)
    if spec.training.multitask == "pcgrad":
        broadcast_parameters(module)
        return DdpEngine(module, module, optimizer, scheduler, pcgrad=make_pcgrad(module, spec.training, tasks),
                         **sections)
    return DdpEngine(module, wrap_ddp(module, spec.parallel, device), optimizer, scheduler, **sections)


def make_engine(module: nn.Module, spec: JobSpec, device: torch.device, total_steps: int, lr: float | None = None,
                schedule_start: int = 0) -> Engine:
    """The job's engine around `module` (moved to `device`), over `total_steps` optimizer steps."""
    require_precision(device, spec.training.precision)
    share_collectives(module)
    if spec.parallel.strategy == "deepspeed":
        if spec.training.compile:
            prepare_for_compile(module, spec.model.family)
        return make_deepspeed_engine(module, spec, device, total_steps,
                                     compile_options=COMPILE_OPTIONS if spec.training.compile else None)
    return make_ddp_engine(module, spec, device, total_steps, lr=lr, schedule_start=schedule_start)
