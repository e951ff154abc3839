"""Spec of the parallel execution: workers, strategy and accelerators."""

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from hepml_dist.spec.base import Section


@dataclass(frozen=True)
class AcceleratorInfo:
    vendor: str
    """cpu, nvidia (NCCL) or amd (RCCL): one job uses one vendor."""
    ray_type: str | None
    """Ray's accelerator_type label (ray/python/ray/util/accelerators); None places workers anywhere."""


# The accelerators a job may name: the one table the spec, the rules and the Ray launcher read.
ACCELERATORS: dict[str, AcceleratorInfo] = {
    "cpu": AcceleratorInfo("cpu", None),
    "A100": AcceleratorInfo("nvidia", "A100"),
    "H100": AcceleratorInfo("nvidia", "H100"),
    "MI250X": AcceleratorInfo("amd", "AMD-Instinct-MI250X"),
    "MI300X": AcceleratorInfo("amd", "AMD-Instinct-MI300X-OAM"),
}
Accelerator = Literal[tuple(ACCELERATORS)]  # type: ignore[valid-type]


class ParallelSpec(Section):
    """Data-parallel training with PyTorch DDP or DeepSpeed ZeRO on Ray Train workers."""

    strategy: Literal["ddp", "deepspeed"] = "ddp"
    """ddp: DistributedDataParallel; deepspeed: DeepSpeed engine with ZeRO."""
    zero_stage: int = Field(0, ge=0, le=3)
    """DeepSpeed ZeRO stage: 1 shards optimizer state, 2 adds gradients, 3 adds parameters."""
    offload: Literal["none", "cpu"] = "none"
    """DeepSpeed: keep optimizer state in host memory (ZeRO >= 1)."""
    num_workers: int = Field(1, ge=1)
    """Training workers (one per GPU, or CPU processes)."""
    accelerator: Accelerator | list[Accelerator] = "cpu"
    """Accelerator type the workers run on; a list allows several types of one vendor."""
    gpus_per_worker: float = Field(0.0, ge=0.0)
    """GPUs per worker (1 for GPU training, 0 on CPU)."""
    cpus_per_worker: float = Field(1.0, gt=0.0)
    """CPU cores reserved per worker (its loader processes run within them)."""
    find_unused_parameters: bool = False
    """DDP: allow parameters without gradient in a step (needed by some phased or frozen setups)."""
    collective_timeout_s: int = Field(600, ge=1)
    """Seconds a rank waits in a collective (all-reduce, barrier, broadcast) for the others before the run fails,
    naming the rank(s) that stopped answering; the gloo and NCCL/RCCL process-group timeout. It must exceed the
    longest time one rank works alone while the others wait: rank 0 writing a checkpoint (consolidating ZeRO-3
    weights) or computing validation metrics, and the first steps under torch.compile."""

    @property
    def accelerators(self) -> list[str]:
        return [self.accelerator] if isinstance(self.accelerator, str) else list(self.accelerator)
