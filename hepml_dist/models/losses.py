"""Task losses shared by all model families: one weighted scalar per task from the model outputs and the batch.

`task_losses(outputs, batch, spec)` returns {task name: task.weight x loss}. For each task:
  * classification truth is `batch[task.label_key]` (int, -1 = undefined: ignored); regression truth is
    `batch["target_<name>"]` per target, stacked in the order of `task.targets`;
  * `task.only_where` names a 0/1 batch key: only examples where it is 1 count (e.g. tau-only tasks);
  * `batch["weight"]` (per example), when present, weights examples: the loss is sum(w l) / sum(w) over the
    selected examples;
  * per-element tasks (truth [B, P], outputs [B, P, K]) also drop padded elements using `batch["mask"]`.
A batch in which no example is selected gives an exact zero that is still connected to the outputs, so every rank
runs the same backward and DDP does not hang.

Loss kinds (per example, before the reduction above):
  ce             cross-entropy over K logits, with `label_smoothing`;
  bce            binary cross-entropy on one logit, labels smoothed to y (1 - s) + s / 2;
  focal          softmax focal loss -(1 - p_t)^gamma ln p_t over K logits;
  huber, mse     per target, averaged with `target_weights`;
  huber_angular  Huber on the other targets plus, for each (sin_X, cos_X) target pair, the chord distance
                 sqrt((d sin)^2 + (d cos)^2 + 1e-8) with the mean weight of the pair; for MultiParTau's kinematics
                 (weights 1, 1, 1, 1, 0.2) this is (L_pT + L_eta + L_chord + 0.2 L_m) / 3.2.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from hepml_dist.errors import UserError
from hepml_dist.spec import JobSpec
from hepml_dist.spec.tasks import TaskSpec

Batch = dict[str, torch.Tensor]
# (prediction, truth, task) -> per-example loss with the truth's shape
ExampleLoss = Callable[[torch.Tensor, torch.Tensor, TaskSpec], torch.Tensor]
CHORD_EPS = 1e-8


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, task: TaskSpec) -> torch.Tensor:
    logits = logits.float().movedim(-1, 1) if logits.dim() > 2 else logits.float()  # per element: [B, P, K]
    return F.cross_entropy(logits, labels, label_smoothing=task.label_smoothing, reduction="none")


def binary_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, task: TaskSpec) -> torch.Tensor:
    target = labels.float() * (1 - task.label_smoothing) + 0.5 * task.label_smoothing
    return F.binary_cross_entropy_with_logits(logits.float().squeeze(-1), target, reduction="none")


def focal(logits: torch.Tensor, labels: torch.Tensor, task: TaskSpec) -> torch.Tensor:
    log_p = F.log_softmax(logits.float(), dim=-1).gather(-1, labels[..., None]).squeeze(-1)
    return -((1 - log_p.exp()) ** task.focal_gamma) * log_p


def _target_weights(task: TaskSpec, device: torch.device) -> torch.Tensor:
    n = len(task.targets or [])
    return torch.tensor(task.target_weights or [1.0] * n, dtype=torch.float32, device=device)


def _weighted_targets(per_target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return (per_target * weights).sum(-1) / weights.sum()


def huber(pred: torch.Tensor, target: torch.Tensor, task: TaskSpec) -> torch.Tensor:
    per_target = F.huber_loss(pred.float(), target, delta=task.huber_delta, reduction="none")
    return _weighted_targets(per_target, _target_weights(task, pred.device))


def mse(pred: torch.Tensor, target: torch.Tensor, task: TaskSpec) -> torch.Tensor:
    return _weighted_targets((pred.float() - target).square(), _target_weights(task, pred.device))


def angle_pairs(task: TaskSpec) -> list[tuple[int, int]]:
    """Indices (sin, cos) of the targets named sin_X and cos_X."""
    names = task.targets or []
    pairs = [
        (i, names.index("cos_" + n[4:])) for i, n in enumerate(names) if n.startswith("sin_") and "cos_" + n[4:] in names
    ]
    if not pairs:
        raise UserError(
            f"task {task.name!r}: loss huber_angular needs a pair of targets named sin_<angle> and cos_<angle> "
            f"(targets: {', '.join(names)}); use loss: huber otherwise"
        )
    return pairs


def huber_angular(pred: torch.Tensor, target: torch.Tensor, task: TaskSpec) -> torch.Tensor:
    pred = pred.float()
    weights = _target_weights(task, pred.device)
    pairs = angle_pairs(task)
    angular = {i for pair in pairs for i in pair}
    plain = [i for i in range(pred.shape[-1]) if i not in angular]
    per_target = F.huber_loss(pred[..., plain], target[..., plain], delta=task.huber_delta, reduction="none")
    total = per_target @ weights[plain]
    norm = weights[plain].sum()
    for s, c in pairs:
        d_sin, d_cos = pred[..., s] - target[..., s], pred[..., c] - target[..., c]
        chord = torch.sqrt(d_sin.square() + d_cos.square() + CHORD_EPS)
        pair_weight = 0.5 * (weights[s] + weights[c])
        total = total + pair_weight * chord
        norm = norm + pair_weight
    return total / norm


LOSSES: dict[str, ExampleLoss] = {
    "ce": cross_entropy,
    "bce": binary_cross_entropy,
    "focal": focal,
    "huber": huber,
    "huber_angular": huber_angular,
    "mse": mse,
}


def truth_of(task: TaskSpec, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(truth, valid): labels [B(, P)] or stacked targets [B(, P), T], and where the truth is defined."""
    if task.kind == "regression":
        keys = [f"target_{name}" for name in task.targets or []]
        missing = [k for k in keys if k not in batch]
        if missing:
            raise KeyError(f"task {task.name!r}: the batch has no {', '.join(missing)} (regression targets)")
        target = torch.stack([batch[k].float() for k in keys], dim=-1)
        return target, torch.isfinite(target).all(dim=-1)
    if task.label_key not in batch:
        raise KeyError(f"task {task.name!r}: the batch has no {task.label_key!r} (classification labels)")
    labels = batch[task.label_key].long()
    return labels, labels >= 0


def selection(task: TaskSpec, batch: Batch, valid: torch.Tensor) -> torch.Tensor:
    """Float [B(, P)] example weights: 0 for excluded examples, else batch["weight"] (or 1)."""
    keep = valid
    if task.only_where:
        if task.only_where not in batch:
            raise KeyError(f"task {task.name!r}: only_where names {task.only_where!r}, which the batch does not have")
        keep = keep & (batch[task.only_where] == 1)
    if keep.dim() == 2 and "mask" in batch and batch["mask"].shape[-1] == keep.shape[-1]:
        keep = keep & (batch["mask"][:, 0] > 0.5)
    weights = keep.float()
    if "weight" in batch:
        w = batch["weight"].float()
        weights = weights * (w if w.dim() == weights.dim() else w[:, None])
    return weights


def task_loss(task: TaskSpec, output: torch.Tensor, batch: Batch) -> torch.Tensor:
    """The (unweighted by task.weight) loss of one task: a scalar."""
    truth, valid = truth_of(task, batch)
    weights = selection(task, batch, valid)
    keep = weights > 0
    # Undefined truth (label -1, NaN target) is replaced by a harmless value; those entries have weight 0.
    if task.kind == "regression":
        truth = torch.where(keep[..., None], truth, torch.zeros_like(truth))
    else:
        truth = torch.where(keep, truth, torch.zeros_like(truth))
    per_example = LOSSES[task.loss](output, truth, task)
    # Clamp keeps an empty selection at 0 * loss = 0, still connected to the graph.
    return (per_example * weights).sum() / weights.sum().clamp(min=1e-12)


def task_losses(outputs: dict[str, torch.Tensor], batch: Batch, spec: JobSpec) -> dict[str, torch.Tensor]:
    """{task name: task.weight x loss} for every task of the spec."""
    return {task.name: task.weight * task_loss(task, outputs[task.name], batch) for task in spec.tasks}
