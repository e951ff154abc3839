"""The DDP engine (also the single-process one): PyTorch DistributedDataParallel around the bare model, or PCGrad.

Mixed precision is torch.autocast (bf16, or fp16 with a GradScaler; gradients are unscaled before clipping).
With PCGrad the model stays unwrapped: PCGrad all-reduces the per-task gradients itself (hepml_dist.train.pcgrad).
"""

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hepml_dist.precision import autocast
from hepml_dist.spec.optim import OptimSpec
from hepml_dist.spec.parallel import ParallelSpec
from hepml_dist.spec.training import TrainingSpec
from hepml_dist.train.distributed import broadcast_buffers, is_distributed, rank
from hepml_dist.train.pcgrad import PCGrad


def zero_loss(module: nn.Module) -> torch.Tensor:
    """Exactly zero, but connected to every trainable parameter (so every gradient hook fires)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return sum((p.sum() * 0.0 for p in params[1:]), params[0].sum() * 0.0)


def wrap_ddp(module: nn.Module, parallel: ParallelSpec, device: torch.device) -> nn.Module:
    if not is_distributed():
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids,
                                               find_unused_parameters=parallel.find_unused_parameters)


def make_pcgrad(module: nn.Module, training: TrainingSpec, task_names: list[str]) -> PCGrad:
    pc = training.pcgrad
    return PCGrad(list(module.named_parameters()), task_names, mode=pc.mode, order=pc.order, protect=pc.protect,
                  seed=training.seed)


@dataclass
class DdpEngine:
    """`model` is what the loop calls (the DDP wrapper, or the bare model); `module` is the bare model."""

    module: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    device: torch.device
    training: TrainingSpec
    optim: OptimSpec
    parallel: ParallelSpec
    task_names: list[str]
    scaler: torch.amp.GradScaler | None = None
    pcgrad: PCGrad | None = None
    grad_norm: float = float("nan")
    task_weights: dict[str, float] = field(default_factory=dict)

    kind = "ddp"

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.pcgrad is not None:
            broadcast_buffers(self.module)  # no DDP wrapper here to keep BatchNorm statistics in step
        with autocast(self.device, self.training.precision):
            return self.model(batch)

    def _sync_context(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces gradients only on the last micro-batch of an accumulation."""
        if not last_micro_batch and isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, losses: dict[str, torch.Tensor], last_micro_batch: bool) -> None:
        scale = 1.0 / self.training.grad_accum
        if self.pcgrad is not None:
            scaled = {k: (self.scaler.scale(v) if self.scaler else v) for k, v in losses.items()}
            self.pcgrad.accumulate(scaled, scale=scale)
            return
        total = sum(losses.values()) * scale
        with self._sync_context(last_micro_batch):
            (self.scaler.scale(total) if self.scaler else total).backward()

    def skip_micro_batch(self, last_micro_batch: bool) -> None:
        """A micro-batch dropped by nan_policy=skip adds nothing; on the last micro-batch DDP still has to reduce
        the gradients accumulated so far, so a zero loss touching every parameter goes through backward."""
        if self.pcgrad is None and last_micro_batch and isinstance(self.model, nn.parallel.DistributedDataParallel):
            zero_loss(self.module).backward()

    def step(self, step: int, measure_grad_norm: bool = True) -> bool:
        if self.pcgrad is not None:
            weights = self.pcgrad.apply(step)
            self.task_weights = dict(zip(self.pcgrad.task_names, weights.tolist()))
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        clip = self.optim.clip_grad_norm
        if clip or measure_grad_norm:  # the norm of every gradient: about 2 % of a small model's CPU step
            params = [p for p in self.module.parameters() if p.requires_grad]
            self.grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip if clip else math.inf))
        else:
            self.grad_norm = float("nan")
        applied = True
        if self.scaler is not None:
            # The scaler skips optimizer.step() when the gradients hold inf/NaN and then lowers the scale: a lower
            # scale after update() is how it says the step was skipped (the same on every rank, DDP or PCGrad,
            # because the gradients were all-reduced before unscaling).
            scale = self.scaler.get_scale()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            applied = self.scaler.get_scale() >= scale
        else:
            self.optimizer.step()
        with warnings.catch_warnings():  # after a skipped fp16 step torch warns that the schedule stepped alone
            warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return applied

    def lr(self) -> float:
        group = self.optimizer.param_groups[0]
        return float(group["lr"] / group.get("lr_multiplier", 1.0))

    def eval_module(self) -> nn.Module:
        return self.module

    def eval_forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with autocast(self.device, self.training.precision):
            return self.module(batch)

    def after_eval(self) -> None:
        pass

    def save_shards(self, folder: Path) -> None:
        """DDP keeps no per-rank state: rank 0's training.pt holds everything."""

    def full_state_dict(self, folder: Path | None = None) -> dict[str, torch.Tensor] | None:
        """The fp32 weights of the bare model (rank 0; None elsewhere)."""
        return self.module.state_dict() if rank() == 0 else None

    def train_state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
        }

    def load(self, folder: Path) -> None:
        self.module.load_state_dict(torch.load(folder / "model.pt", map_location=self.device, weights_only=True))
        state = torch.load(folder / "training.pt", map_location=self.device, weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def rewrap(self) -> None:
        """After requires_grad changed (a new phase): a fresh DDP wrapper registers the new set of parameters."""
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            self.model = wrap_ddp(self.module, self.parallel, self.device)
        if self.pcgrad is not None:
            self.pcgrad = make_pcgrad(self.module, self.training, self.task_names)
