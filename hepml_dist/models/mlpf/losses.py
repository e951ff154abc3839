"""MLPF losses as in particleflow v2.2.0 (`mlpf/model/losses.py`), normalised the same way.

With n_elem = real elements in the batch and n_part = elements that carry a true particle:
- existence: cross-entropy (particle / no particle) summed over real elements / n_elem (the job weights it x10);
- particle class: focal loss (gamma from the task, no alpha) where a particle exists, summed / n_elem;
- kinematics: squared error per target where a particle exists, summed / n_part, weighted per target by
  `task.target_weights` (reference: 1 for the pT and energy log-ratios, 0.01 for eta, sin phi, cos phi), with the
  pT and energy terms multiplied by sqrt(true pT / GeV) when `model.pt_weighted_regression` is on.
Every task's result is multiplied by `task.weight`, per-event `weight` (when the batch has one) multiplies each element.

Targets: `target_<name>` for each regression target. The stored CLIC columns hold the absolute `target_pt` and
`target_energy`; when the batch has no `target_log_pt_ratio` / `target_log_energy_ratio`, they are derived here as
log(target / element value) (0 where undefined), the transformation the reference applies in its dataset.
"""

import torch
import torch.nn.functional as F

from hepml_dist.models.mlpf.model import ENERGY, PT, task_roles
from hepml_dist.spec import JobSpec
from hepml_dist.spec.tasks import TaskSpec

Batch = dict[str, torch.Tensor]
RATIO_OF = {"log_pt_ratio": ("target_pt", PT), "log_energy_ratio": ("target_energy", ENERGY)}


def _finite(x: torch.Tensor) -> torch.Tensor:
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)


def regression_target(batch: Batch, name: str) -> torch.Tensor:
    """Per-element truth [B, E] of one regression target, deriving the log-ratios from absolute values if needed."""
    key = f"target_{name}"
    if key in batch:
        return _finite(batch[key].float())
    if name in RATIO_OF:
        absolute, channel = RATIO_OF[name]
        if absolute in batch:
            return _finite(torch.log(batch[absolute].float() / batch["features"][:, channel].float()))
    raise KeyError(f"batch has no {key!r} (nor the absolute value it can be derived from)")


def true_pt(batch: Batch) -> torch.Tensor:
    if "target_pt" in batch:
        return _finite(batch["target_pt"].float())
    return _finite(torch.exp(regression_target(batch, "log_pt_ratio")) * batch["features"][:, PT].float())


def _selection(task: TaskSpec, batch: Batch, real: torch.Tensor) -> torch.Tensor:
    return real & (batch[task.only_where] == 1) if task.only_where else real


def _event_weights(batch: Batch, like: torch.Tensor) -> torch.Tensor:
    weight = batch.get("weight")
    return torch.ones_like(like) if weight is None else weight.to(like.dtype)[:, None].expand_as(like)


def mlpf_losses(outputs: Batch, batch: Batch, spec: JobSpec) -> dict[str, torch.Tensor]:
    roles = task_roles(spec)
    real = batch["mask"][:, 0] > 0
    n_elem = real.sum().clamp(min=1)
    losses = {}

    task = roles["existence"]
    logits, label = outputs[task.name], batch[task.label_key].long().clamp(0, 1)
    if task.output_dim == 1:
        per_element = F.binary_cross_entropy_with_logits(logits[..., 0], label.float(), reduction="none")
    else:
        per_element = F.cross_entropy(logits.transpose(1, 2), label, reduction="none", label_smoothing=task.label_smoothing)
    selected = _selection(task, batch, real)
    losses[task.name] = torch.where(selected, per_element * _event_weights(batch, per_element), 0.0).sum() / n_elem

    task = roles["particle_class"]
    logits, label = outputs[task.name], batch[task.label_key].long().clamp(min=0)
    log_pt = torch.log_softmax(logits, dim=-1).gather(-1, label[..., None])[..., 0]
    per_element = -((1 - log_pt.exp()) ** task.focal_gamma) * log_pt if task.loss == "focal" else -log_pt
    selected = _selection(task, batch, real)
    losses[task.name] = torch.where(selected, per_element * _event_weights(batch, per_element), 0.0).sum() / n_elem

    task = roles["kinematics"]
    names = task.targets or []
    pred = outputs[task.name]
    target = torch.stack([regression_target(batch, n) for n in names], dim=-1)
    if task.loss == "mse":
        squared = (pred - target) ** 2
    else:
        squared = F.huber_loss(pred, target, reduction="none", delta=task.huber_delta)
    weights = squared.new_tensor(task.target_weights or [1.0] * len(names))
    if spec.model.pt_weighted_regression:
        sqrt_pt = true_pt(batch).clamp(min=1e-6).sqrt()
        scale = torch.stack([sqrt_pt if n in RATIO_OF else torch.ones_like(sqrt_pt) for n in names], dim=-1)
        squared = squared * scale
    per_element = (squared * weights).sum(-1)
    selected = _selection(task, batch, real)
    n_part = selected.sum().clamp(min=1)
    losses[task.name] = torch.where(selected, per_element * _event_weights(batch, per_element), 0.0).sum() / n_part

    return {t.name: t.weight * losses[t.name] for t in roles.values()}
