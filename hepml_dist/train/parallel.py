"""Data-parallel engines applied to a single-device model from outside: DDP (optionally with PCGrad) or DeepSpeed.

Both expose the same small surface to the training loop: `forward`, `backward` (one micro-batch), `step` (one
optimizer step: PCGrad projection, unscale, clip, step, schedule), `eval_module`, `train_state`/`load_train_state`,
and checkpoint hooks. Mixed precision is torch.autocast (bf16, or fp16 with a GradScaler; gradients are unscaled
before clipping). DeepSpeed gets a config generated from the spec (`deepspeed_config`).
"""

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from hepml_dist.errors import UserError
from hepml_dist.spec import JobSpec
from hepml_dist.train.optim import build_optimizer, build_scheduler, param_groups
from hepml_dist.train.pcgrad import PCGrad, broadcast_buffers, broadcast_parameters

AUTOCAST_DTYPES = {"fp32": None, "bf16-mixed": torch.bfloat16, "fp16-mixed": torch.float16}


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def check_supported(spec: JobSpec) -> None:
    """Combinations the engines do not support, as clear errors before any worker starts."""
    p, t = spec.parallel, spec.training
    if p.strategy != "deepspeed":
        return
    if spec.optim.name not in ("adamw", "adam"):
        raise UserError(
            f"optim.name: {spec.optim.name} is not available with parallel.strategy deepspeed "
            "(DeepSpeed builds its own Adam/AdamW); use optim.name adamw or parallel.strategy ddp"
        )
    if t.multitask == "pcgrad":
        raise UserError(
            "training.multitask: PCGrad needs whole per-task gradients, which the DeepSpeed engine reduces itself; "
            "use parallel.strategy ddp for PCGrad (models that need ZeRO: multitask sum)"
        )
    if t.phases:
        raise UserError("training.phases: phased training re-wraps the model and is supported with parallel.strategy ddp only")


@dataclass
class Engine:
    """The DDP / single-process engine. `model` is what the loop calls; `module` is the bare model."""

    module: nn.Module
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    spec: JobSpec
    device: torch.device
    scaler: torch.amp.GradScaler | None = None
    pcgrad: PCGrad | None = None
    grad_norm: float = float("nan")
    task_weights: dict[str, float] = field(default_factory=dict)

    kind = "ddp"

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.pcgrad is not None:
            broadcast_buffers(self.module)  # no DDP wrapper here to keep BatchNorm statistics in step
        with autocast(self.device, self.spec.training.precision):
            return self.model(batch)

    def sync_context(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        """DDP all-reduces gradients only on the last micro-batch of an accumulation."""
        if not last_micro_batch and isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, losses: dict[str, torch.Tensor], last_micro_batch: bool) -> None:
        scale = 1.0 / self.spec.training.grad_accum
        if self.pcgrad is not None:
            scaled = {k: (self.scaler.scale(v) if self.scaler else v) for k, v in losses.items()}
            self.pcgrad.accumulate(scaled, scale=scale)
            return
        total = sum(losses.values()) * scale
        with self.sync_context(last_micro_batch):
            (self.scaler.scale(total) if self.scaler else total).backward()

    def skip_micro_batch(self, last_micro_batch: bool) -> None:
        """A micro-batch dropped by nan_policy=skip adds nothing; on the last micro-batch DDP still has to reduce
        the gradients accumulated so far, so a zero loss touching every parameter goes through backward."""
        if self.pcgrad is None and last_micro_batch and isinstance(self.model, nn.parallel.DistributedDataParallel):
            zero_loss(self.module).backward()

    def step(self, step: int) -> None:
        if self.pcgrad is not None:
            weights = self.pcgrad.apply(step)
            self.task_weights = dict(zip(self.pcgrad.task_names, weights.tolist()))
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        clip = self.spec.optim.clip_grad_norm
        params = [p for p in self.module.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, clip if clip else math.inf)
        self.grad_norm = float(norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"] / self.optimizer.param_groups[0].get("lr_multiplier", 1.0))

    def eval_module(self) -> nn.Module:
        return self.module

    def after_eval(self) -> None:
        pass

    def eval_forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with autocast(self.device, self.spec.training.precision):
            return self.module(batch)

    def full_state_dict(self, folder: Path | None = None) -> dict[str, torch.Tensor] | None:
        """The fp32 weights of the bare model (rank 0; None elsewhere)."""
        return self.module.state_dict() if not distributed() or dist.get_rank() == 0 else None

    def train_state(self) -> dict[str, Any]:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
        }

    def save_shards(self, folder: Path) -> None:
        """DDP keeps no per-rank state: rank 0's training.pt holds everything."""

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
            self.model = wrap_ddp(self.module, self.spec, self.device)
        if self.pcgrad is not None:
            self.pcgrad = make_pcgrad(self.module, self.spec)


def zero_loss(module: nn.Module) -> torch.Tensor:
    """Exactly zero, but connected to every trainable parameter (so every gradient hook fires)."""
    params = [p for p in module.parameters() if p.requires_grad]
    return sum((p.sum() * 0.0 for p in params[1:]), params[0].sum() * 0.0)


def wrap_ddp(module: nn.Module, spec: JobSpec, device: torch.device) -> nn.Module:
    if not distributed():
        return module
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(
        module, device_ids=ids, find_unused_parameters=spec.parallel.find_unused_parameters
    )


def make_pcgrad(module: nn.Module, spec: JobSpec) -> PCGrad:
    pc = spec.training.pcgrad
    return PCGrad(
        list(module.named_parameters()),
        [t.name for t in spec.tasks],
        mode=pc.mode,
        order=pc.order,
        protect=pc.protect,
        seed=spec.training.seed,
    )


COMPILE_BACKEND = "inductor"
# Static shapes: one graph per shape (ParT's static-shape code keeps them few). Dynamic-shape graphs are not used:
# torch 2.13 reuses a backward kernel with the strides of an earlier length in ParT's class-attention blocks
# (an assert_size_stride failure in backward, seen with tests/test_compile.py's two class blocks).
COMPILE_OPTIONS = {"dynamic": False}
COMPILE_RECOMPILE_LIMIT = 32


def compile_model(module: nn.Module) -> nn.Module:
    """torch.compile the bare model in place (`nn.Module.compile`), before any DDP wrapper: parameter names and
    state_dict keys stay as they are (no `_orig_mod.` prefix), so checkpoints, freezing regexes and `eval_module`
    are unchanged, and evaluation runs compiled too. Data-dependent parts (ParT's packing and trimming) become
    graph breaks, not errors. Compiled once per module (a new phase's engine reuses it)."""
    if getattr(module, "_compiled_call_impl", None) is None:
        prepare_for_compile(module)
        module.compile(backend=COMPILE_BACKEND, **COMPILE_OPTIONS)
    return module


def prepare_for_compile(module: nn.Module) -> None:
    """Switch a model with data-dependent shapes to its static-shape code (`static_shapes`, ParT and its
    descendants: sequence lengths rounded up to a multiple of 16 instead of one graph per batch length), and give
    torch room for the few graphs that remain (train and eval, each bucket of lengths, the last short batch)."""
    import torch._dynamo

    if hasattr(module, "static_shapes"):
        module.static_shapes = True
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILE_RECOMPILE_LIMIT)


def make_ddp_engine(module: nn.Module, spec: JobSpec, device: torch.device, total_steps: int, lr: float | None = None,
                    schedule_start: int = 0) -> Engine:
    """DDP (or a single process); with PCGrad the model stays unwrapped and PCGrad does the one all-reduce."""
    module = module.to(device)
    if spec.training.compile:
        compile_model(module)
    optimizer = build_optimizer(module, spec.optim, lr=lr)
    schedule = spec.schedule if lr is None else spec.schedule.model_copy(update={"name": "cosine", "warmup_steps": 0})
    scheduler = build_scheduler(optimizer, schedule, total_steps - schedule_start)
    scaler = torch.amp.GradScaler(device.type) if spec.training.precision == "fp16-mixed" else None
    if spec.training.multitask == "pcgrad":
        broadcast_parameters(module)
        return Engine(module, module, optimizer, scheduler, spec, device, scaler, make_pcgrad(module, spec))
    return Engine(module, wrap_ddp(module, spec, device), optimizer, scheduler, spec, device, scaler)


# ----------------------------------------------------------------------------------------------------------------
# DeepSpeed


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
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000}
    return config


def import_deepspeed():
    """DeepSpeed, with its CPU shared-memory all-reduce disabled (it compiles C++ for ~45 s on first use;
    plain gloo is used instead)."""
    import deepspeed

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return deepspeed


def _to_half(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.half() if v.is_floating_point() else v for k, v in batch.items()}


@dataclass
class DeepSpeedEngine:
    """`deepspeed.initialize` around the bare model; DeepSpeed owns reduction, ZeRO sharding, clipping and the
    schedule stepping; every rank writes its shard files into the checkpoint folder."""

    module: nn.Module
    engine: Any
    spec: JobSpec
    device: torch.device
    grad_norm: float = float("nan")
    task_weights: dict[str, float] = field(default_factory=dict)

    kind = "deepspeed"

    @property
    def model(self) -> Any:
        return self.engine

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.spec.training.precision == "fp16-mixed":
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

    def step(self, step: int) -> None:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        self.grad_norm = float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        group = self.engine.optimizer.param_groups[0]
        return float(group["lr"] / group.get("lr_multiplier", 1.0))

    def eval_module(self) -> nn.Module:
        return self.engine.module

    def eval_forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Through the engine: under ZeRO-3 every rank must take part in gathering the parameters.
        return self.forward(batch)

    def after_eval(self) -> None:
        if self.spec.parallel.zero_stage == 3:
            self.engine.empty_partition_cache()  # release gathered parameters and the eval-mode fetch trace

    def full_state_dict(self, folder: Path | None = None) -> dict[str, torch.Tensor] | None:
        """fp32 weights on rank 0. ZeRO-3: consolidated from the shard files just written to `folder` (reading
        files, not gathering live parameters, which would disturb ZeRO-3's fetch trace of the next steps)."""
        rank = dist.get_rank() if distributed() else 0
        if rank != 0:
            return None
        if self.spec.parallel.zero_stage == 3:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            from hepml_dist.train.checkpoint import DEEPSPEED_TAG

            state = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DEEPSPEED_TAG)
            buffers = {k: v.detach().cpu() for k, v in self.engine.module.named_buffers()}
            return {**buffers, **{k: v.float() for k, v in state.items()}}
        return {k: v.detach().float().cpu() if v.is_floating_point() else v.detach().cpu()
                for k, v in self.engine.module.state_dict().items()}

    def train_state(self) -> None:
        return None  # DeepSpeed writes optimizer/scheduler/scaler state into its shard files

    def save_shards(self, folder: Path) -> None:
        from hepml_dist.train.checkpoint import DEEPSPEED_TAG

        self.engine.save_checkpoint(str(folder), tag=DEEPSPEED_TAG, save_latest=False)

    def load(self, folder: Path) -> None:
        from hepml_dist.train.checkpoint import DEEPSPEED_TAG

        if not (folder / DEEPSPEED_TAG).is_dir():
            raise UserError(f"{folder}: no DeepSpeed shards ({DEEPSPEED_TAG}/); was it written by a DDP run? Start a new run directory")
        path, _ = self.engine.load_checkpoint(str(folder), tag=DEEPSPEED_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
        if path is None:
            raise UserError(f"{folder}/{DEEPSPEED_TAG}: DeepSpeed could not load these shards (same number of workers and ZeRO stage needed)")

    def rewrap(self) -> None:
        raise UserError("training.phases are supported with parallel.strategy ddp only")


def zero3_leaf_classes(module: nn.Module) -> list[type]:
    """Module classes ZeRO-3 must gather whole: a model may name them (`zero3_leaf_classes`); otherwise attention
    modules that own a packed `in_proj` Linear, which they may slice instead of calling (ParT's class attention),
    so ZeRO-3 would never see those weights being used."""
    declared = getattr(module, "zero3_leaf_classes", None)
    if declared is not None:
        return list(declared)
    return sorted({type(m) for m in module.modules() if isinstance(getattr(m, "in_proj", None), nn.Linear)}, key=str)


def make_deepspeed_engine(module: nn.Module, spec: JobSpec, device: torch.device, total_steps: int) -> DeepSpeedEngine:
    deepspeed = import_deepspeed()
    if spec.parallel.zero_stage == 3 and zero3_leaf_classes(module):
        from deepspeed.utils import set_z3_leaf_modules

        set_z3_leaf_modules(module, zero3_leaf_classes(module))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    world = dist.get_world_size() if distributed() else 1
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(module.named_parameters(), spec.optim)]
    engine, _, _, _ = deepspeed.initialize(
        model=module.to(device),
        model_parameters=groups,
        config=deepspeed_config(spec, world),
        lr_scheduler=lambda optimizer: build_scheduler(optimizer, spec.schedule, total_steps),
    )
    if spec.training.compile:
        prepare_for_compile(engine.module)
        # DeepSpeed's own entry point: module.compile, its hooks kept eager
        engine.compile(backend=COMPILE_BACKEND, compile_kwargs=dict(COMPILE_OPTIONS))
    return DeepSpeedEngine(engine.module, engine, spec, device)


def make_engine(module: nn.Module, spec: JobSpec, device: torch.device, total_steps: int, lr: float | None = None,
                schedule_start: int = 0) -> Engine | DeepSpeedEngine:
    if spec.parallel.strategy == "deepspeed":
        return make_deepspeed_engine(module, spec, device, total_steps)
    return make_ddp_engine(module, spec, device, total_steps, lr=lr, schedule_start=schedule_start)


def iterate_micro_batches(batches: Iterator[dict], grad_accum: int) -> Iterator[list[dict]]:
    """Group a batch stream into optimizer steps of `grad_accum` micro-batches (a short tail is dropped)."""
    group: list[dict] = []
    for batch in batches:
        group.append(batch)
        if len(group) == grad_accum:
            yield group
            group = []
