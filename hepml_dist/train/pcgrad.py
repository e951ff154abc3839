"""PCGrad (Yu et al., arXiv:2001.06782), exact under data parallelism.

The paper's update, for task gradients g_t on the shared parameters:

    for each task i:  g_i' = g_i;  for each other task j (in a shuffled order): if g_i'.g_j < 0: g_i' -= (g_i'.g_j / |g_j|^2) g_j
    update = sum_i g_i'

Every g_i' is a combination of the original g_k, so the update is sum_k w_k g_k with weights that follow from the
T x T Gram matrix G = g g^T alone (`pcgrad_weights`). Under data parallelism, the exact ("global") algorithm needs
the task gradients of the whole global batch: each rank computes its per-task gradients with `torch.autograd.grad`
(which bypasses DDP's reducer), packs them into one [T, P] buffer, and a single all-reduce gives every rank the
global task gradients; each rank then computes the same weights (the task order is seeded by the step, identical on
all ranks) and writes the same merged gradient. The "local" variant projects each rank's own gradients and
all-reduces only the merged [P] gradient (cheaper, noisier).

Parameters whose names contain a task name as a dotted component (`heads.kinematics.*`) are that task's own; only
the others (the shared ones) are projected, as in the paper. Task-specific parameters get their own task's gradient.
"""

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from hepml_dist.train.distributed import is_distributed

GRAM_EPS = 1e-20


def pcgrad_weights(
    gram: torch.Tensor,
    orders: Sequence[Sequence[int]],
    protected: Sequence[bool] | None = None,
) -> torch.Tensor:
    """The weights w with sum_i g_i' = sum_k w_k g_k, from the Gram matrix G_ij = g_i . g_j.

    `orders[i]` lists the other tasks in the order they are projected out of task i. Protected tasks are never
    projected (other tasks are still projected against them); tasks with a zero gradient are skipped.
    """
    gram = gram.to(torch.float64)
    t = gram.shape[0]
    protected = protected or [False] * t
    rows = torch.eye(t, dtype=torch.float64, device=gram.device)  # row i: coefficients of g_i' in the g_k basis
    for i in range(t):
        if protected[i]:
            continue
        for j in orders[i]:
            if j == i or gram[j, j] <= GRAM_EPS:
                continue
            dot = rows[i] @ gram[:, j]  # g_i' . g_j
            if dot < 0:
                rows[i, j] -= dot / gram[j, j]
    return rows.sum(dim=0)


def task_orders(num_tasks: int, order: str, seed: int, step: int) -> list[list[int]]:
    """Projection order for each task: task order (`fixed`), or shuffled with a generator seeded by (seed, step),
    which every rank seeds identically (`seeded`)."""
    if order == "fixed":
        return [[j for j in range(num_tasks) if j != i] for i in range(num_tasks)]
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return [[j for j in torch.randperm(num_tasks, generator=generator).tolist() if j != i] for i in range(num_tasks)]


def task_owner(param_name: str, task_names: Sequence[str]) -> int | None:
    """Index of the task a parameter belongs to (a dotted name component equals the task name), else None."""
    parts = set(param_name.split("."))
    owners = [i for i, name in enumerate(task_names) if name in parts]
    return owners[0] if len(owners) == 1 else None


class PCGrad:
    """Accumulates per-task gradients over micro-batches and writes the PCGrad update into `.grad` at step time.

    Usage per optimizer step: `accumulate(losses)` for each micro-batch (instead of `loss.backward()`), then
    `apply(step)` before clipping and the optimizer step. The model must not be wrapped in DDP (this class does
    the one all-reduce itself); hepml_dist.train.distributed.broadcast_parameters makes the replicas start equal.
    """

    def __init__(
        self,
        named_params: Sequence[tuple[str, nn.Parameter]],
        task_names: Sequence[str],
        *,
        mode: str = "global",
        order: str = "seeded",
        protect: Sequence[str] = (),
        seed: int = 0,
    ):
        self.task_names = list(task_names)
        self.names = [name for name, p in named_params if p.requires_grad]
        self.params = [p for _, p in named_params if p.requires_grad]
        self.mode, self.order, self.seed = mode, order, seed
        self.protected = [name in protect for name in self.task_names]
        owners = [task_owner(name, self.task_names) for name in self.names]
        sizes = [p.numel() for p in self.params]
        offsets = torch.tensor([0, *sizes]).cumsum(0).tolist()
        self.slices = [slice(a, b) for a, b in zip(offsets[:-1], offsets[1:])]
        shared = torch.zeros(offsets[-1], dtype=torch.bool)
        for owner, sl in zip(owners, self.slices):
            if owner is None:
                shared[sl] = True
        self.shared = shared
        self.buffer: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None

    def accumulate(self, losses: dict[str, torch.Tensor], scale: float | torch.Tensor = 1.0) -> None:
        """Add this micro-batch's per-task gradients (of `scale * loss_t`) to the [T, P] buffer."""
        device = self.params[0].device
        if self.buffer is None:
            self.buffer = torch.zeros(len(self.task_names), self.shared.numel(), device=device, dtype=torch.float32)
        for t, name in enumerate(self.task_names):
            loss = losses[name]
            if not loss.requires_grad:
                continue  # e.g. a tau-only task on a batch without taus: zero gradient
            grads = torch.autograd.grad(loss * scale, self.params, retain_graph=True, allow_unused=True)
            row = self.buffer[t]
            for grad, sl in zip(grads, self.slices):
                if grad is not None:
                    row[sl] += grad.reshape(-1).float()

    def apply(self, step: int) -> torch.Tensor:
        """All-reduce and project the accumulated task gradients, write the merged gradient into `.grad`,
        clear the buffer, and return the task weights used on the shared parameters."""
        if self.buffer is None:
            raise RuntimeError("PCGrad.apply() called before any accumulate()")
        buffer, self.buffer = self.buffer, None
        distributed = is_distributed()
        if distributed and self.mode == "global":
            dist.all_reduce(buffer)
            buffer /= dist.get_world_size()
        shared = self.shared.to(buffer.device)
        g_shared = buffer[:, shared].double()
        weights = pcgrad_weights(
            g_shared @ g_shared.T, task_orders(len(self.task_names), self.order, self.seed, step), self.protected
        )
        merged = buffer.sum(dim=0)
        merged[shared] = (weights @ g_shared).float()
        if distributed and self.mode == "local":
            dist.all_reduce(merged)
            merged /= dist.get_world_size()
        for param, sl in zip(self.params, self.slices):
            grad = merged[sl].view_as(param).to(param.dtype)
            if param.grad is None:
                param.grad = grad.clone()
            else:
                param.grad.copy_(grad)
        self.last_weights = weights.float()
        return self.last_weights
