"""The DeepSpeed engine: `deepspeed.initialize` around the bare model, ZeRO stage 0-3 with optional CPU offload.

DeepSpeed owns gradient reduction, ZeRO sharding, clipping, loss scaling (fp16) and the schedule stepping; every rank
writes its shard files into the checkpoint folder, and the fp32 weights of a ZeRO-3 run are consolidated from those
files into the plain model.pt that `hepml predict`/`export` read. The config is generated from the spec
(`deepspeed_config`): on CPU it uses torch's Adam (nothing to compile) and plain gloo collectives.
"""

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hepml_dist.errors import UserError
from hepml_dist.extras import require
from hepml_dist.runs import DEEPSPEED_TAG
from hepml_dist.spec import JobSpec
from hepml_dist.spec.parallel import ParallelSpec
from hepml_dist.spec.training import TrainingSpec
from hepml_dist.train.ddp import zero_loss
from hepml_dist.train.distributed import is_distributed, rank
from hepml_dist.train.optim import build_scheduler, param_groups


def deepspeed_config(spec: JobSpec, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config of a job: batch sizes from data and grad_accum, ZeRO stage and offload, precision,
    clipping, and AdamW (torch's implementation, so nothing is compiled; offload uses DeepSpeed's CPU Adam)."""
    p, t, o = spec.parallel, spec.training, spec.optim
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.offload == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": spec.data.batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": spec.data.batch_size * t.grad_accum * world_size,
        "gradient_clipping": o.clip_grad_norm or 0.0,
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW" if o.name == "adamw" else "Adam",
            "params": {
                "lr": o.lr,
                "betas": list(o.betas),
                "eps": o.eps,
                "weight_decay": o.weight_decay,
                **({} if p.offload == "cpu" else {"torch_adam": True}),
                **({"adam_w_mode": False} if o.name == "adam" else {}),
            },
        },
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if t.precision == "bf16-mixed":
        # torch.autocast inside the engine: fp32 weights (so model.pt is exact), bf16 matmuls, as in the DDP path.
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif t.precision == "fp16-mixed":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": t.fp16_initial_scale_power,
                          "loss_scale_window": 1000}
    return config


def import_deepspeed():
    """DeepSpeed, with its CPU shared-memory all-reduce disabled (it compiles C++ for ~45 s on first use;
    plain gloo is used instead)."""
    deepspeed = require("deepspeed")  # the `deepspeed` extra; ~1-2 s to import, and most jobs train with DDP
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def zero3_leaf_classes(module: nn.Module) -> list[type]:
    """Module classes ZeRO-3 must gather whole: attention modules that own a packed `in_proj` Linear, which they may
    slice instead of calling (ParT's class attention), so ZeRO-3 would never see those weights being used."""
    return sorted({type(m) for m in module.modules() if isinstance(getattr(m, "in_proj", None), nn.Linear)}, key=str)


def _to_half(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.half() if v.is_floating_point() else v for k, v in batch.items()}


@dataclass
class DeepSpeedEngine:
    """The loop's engine interface over a DeepSpeed engine (`engine`); `module` is the bare model."""

    module: nn.Module
    engine: Any
    device: torch.device
    training: TrainingSpec
    parallel: ParallelSpec
    grad_norm: float = float("nan")
    task_weights: dict[str, float] = field(default_factory=dict)

    kind = "deepspeed"

    @property
    def model(self) -> Any:
        return self.engine

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.training.precision == "fp16-mixed":
            batch = _to_half(batch)
        return self.engine(batch)

    def backward(self, losses: dict[str, torch.Tensor], last_micro_batch: bool) -> None:
        # DeepSpeed divides by gradient_accumulation_steps itself and reduces at the accumulation boundary.
        self.engine.backward(sum(losses.values()))
        if not last_micro_batch:
            self.engine.step()  # only advances DeepSpeed's micro-step counter

    def skip_micro_batch(self, last_micro_batch: bool) -> None:
        self.engine.backward(zero_loss(self.engine.module))
        if not last_micro_batch:
            self.engine.step()

    def step(self, step: int, measure_grad_norm: bool = True) -> bool:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        self.grad_norm = float(norm) if norm is not None else float("nan")
        return bool(self.engine.was_step_applied())  # False: DeepSpeed's fp16 loss scaler skipped an overflow

    def lr(self) -> float:
        group = self.engine.optimizer.param_groups[0]
        return float(group["lr"] / group.get("lr_multiplier", 1.0))

    def eval_module(self) -> nn.Module:
        return self.engine.module

    def eval_forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Through the engine: under ZeRO-3 every rank must take part in gathering the parameters.
        return self.forward(batch)

    def after_eval(self) -> None:
        if self.parallel.zero_stage == 3:
            self.engine.empty_partition_cache()  # release gathered parameters and the eval-mode fetch trace

    def save_shards(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, save_latest=False)

    def full_state_dict(self, folder: Path | None = None) -> dict[str, torch.Tensor] | None:
        """fp32 weights on rank 0. ZeRO-3: consolidated from the shard files just written to `folder` (reading
        files, not gathering live parameters, which would disturb ZeRO-3's fetch trace of the next steps)."""
        if rank() != 0:
            return None
        if self.parallel.zero_stage == 3:
            zero_to_fp32 = import_deepspeed().utils.zero_to_fp32
            state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DEEPSPEED_TAG)
            buffers = {k: v.detach().cpu() for k, v in self.engine.module.named_buffers()}
            return {**buffers, **{k: v.float() for k, v in state.items()}}
        return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                for k, v in self.engine.module.state_dict().items()}

    def train_state(self) -> None:
        return None  # DeepSpeed writes optimizer/scheduler/scaler state into its shard files

    def load(self, folder: Path) -> None:
        if not (folder / DEEPSPEED_TAG).is_dir():
            raise UserError(f"{folder}: no DeepSpeed shards ({DEEPSPEED_TAG}/); was it written by a DDP run? "
                            "Start a new run directory")
        path, _ = self.engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise UserError(f"{folder}/{DEEPSPEED_TAG}: DeepSpeed could not load these shards (same number of "
                            "workers and ZeRO stage needed)")

    def rewrap(self) -> None:
        raise UserError("training.phases are supported with parallel.strategy ddp only")


def make_deepspeed_engine(module: nn.Module, spec: JobSpec, device: torch.device, total_steps: int,
                          compile_options: dict[str, Any] | None = None) -> DeepSpeedEngine:
    """The DeepSpeed engine of a job; `compile_options` (torch.compile arguments) compiles the model in it."""
    deepspeed = import_deepspeed()
    if spec.parallel.zero_stage == 3 and zero3_leaf_classes(module):
        deepspeed.utils.set_z3_leaf_modules(module, zero3_leaf_classes(module))
    # Sets a process group up only where none exists yet (under Ray Train, TorchConfig made it with this timeout).
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo",
                               timeout=timedelta(seconds=spec.parallel.collective_timeout_s))
    world = torch.distributed.get_world_size() if is_distributed() else 1
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(module.named_parameters(), spec.optim)]
    engine, _, _, _ = deepspeed.initialize(
        model=module.to(device),
        model_parameters=groups,
        config=deepspeed_config(spec, world),
        lr_scheduler=lambda optimizer: build_scheduler(optimizer, spec.schedule, total_steps),
    )
    if compile_options is not None:
        # DeepSpeed's own entry point: module.compile, its hooks kept eager
        engine.compile(backend=compile_options["backend"], compile_kwargs={"dynamic": compile_options["dynamic"]})
    return DeepSpeedEngine(engine.module, engine, device, spec.training, spec.parallel)
