"""Losses of the OmniJet-alpha family, one function per stage (spec.model.stage).

- tokenizer: masked reconstruction MSE + vq_alpha x quantiser loss (the model's `aux_vq_loss`). Unlike the reference,
  which averages the squared error over padded positions too, both terms average over real constituents only, so the
  loss does not shrink with the amount of padding in a batch.
- backbone: next-token cross-entropy over real targets only. The reference also scores the padded targets (token 0
  after the stop token); those are trivially predictable, dilute the loss by the padding fraction and teach nothing.
  Our values are therefore higher than the reference's at equal quality; compare perplexities over real tokens.
- classifier: the generic task losses (CE with label smoothing, BCE, focal, Huber, MSE; `only_where`, per-example
  weights).
"""

import torch
import torch.nn.functional as F

from hepml_dist.spec import JobSpec
from hepml_dist.spec.tasks import TaskSpec

Batch = dict[str, torch.Tensor]


def _example_weights(batch: Batch, like: torch.Tensor) -> torch.Tensor:
    weight = batch.get("weight")
    return torch.ones_like(like) if weight is None else weight.to(like.dtype)


def tokenizer_loss(outputs: Batch, batch: Batch, spec: JobSpec) -> dict[str, torch.Tensor]:
    task = spec.tasks[0]
    real = (batch["mask"][:, 0] > 0).to(outputs[task.name].dtype)
    squared = (outputs[task.name] - batch["features"].transpose(1, 2)) ** 2
    if task.target_weights:
        weights = squared.new_tensor(task.target_weights)
        per_constituent = (squared * weights).sum(-1) / weights.sum()
    else:
        per_constituent = squared.mean(-1)
    per_constituent = per_constituent * _example_weights(batch, real[:, 0])[:, None]
    mse = (per_constituent * real).sum() / real.sum().clamp(min=1)
    return {task.name: task.weight * (mse + spec.model.tokenizer.vq_alpha * outputs["aux_vq_loss"])}


def next_token_loss(outputs: Batch, batch: Batch, spec: JobSpec) -> dict[str, torch.Tensor]:
    task = spec.tasks[0]
    logits = outputs[task.name]
    targets = batch["tokens"][:, 1:]
    real = (batch["mask"][:, 0, 1:] > 0).to(logits.dtype)
    ce = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none", label_smoothing=task.label_smoothing)
    ce = ce * _example_weights(batch, real[:, 0])[:, None]
    return {task.name: task.weight * (ce * real).sum() / real.sum().clamp(min=1)}


# --- generic per-task losses (the classifier stage) -------------------------------------------------------------


def _focal(logits: torch.Tensor, label: torch.Tensor, gamma: float) -> torch.Tensor:
    log_pt = torch.log_softmax(logits, dim=-1).gather(-1, label[..., None])[..., 0]
    return -((1 - log_pt.exp()) ** gamma) * log_pt


def _regression_terms(task: TaskSpec, output: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Per-example, per-target loss [B, T]."""
    names = task.targets or []
    target = torch.stack([batch[f"target_{n}"] for n in names], dim=-1).to(output.dtype)
    if task.loss == "mse":
        return (output - target) ** 2
    terms = F.huber_loss(output, target, reduction="none", delta=task.huber_delta)
    if task.loss == "huber_angular":  # chord distance for each (sin_X, cos_X) pair instead of two Hubers
        for i, name in enumerate(names):
            if name.startswith("sin_") and f"cos_{name[4:]}" in names:
                j = names.index(f"cos_{name[4:]}")
                chord = ((output[:, i] - target[:, i]) ** 2 + (output[:, j] - target[:, j]) ** 2 + 1e-8).sqrt()
                terms = terms.clone()
                terms[:, i], terms[:, j] = chord / 2, chord / 2
    return terms


def task_loss(task: TaskSpec, output: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Weighted mean loss of one task over its selected examples (a zero that keeps the graph if none is selected)."""
    selected = torch.ones(len(output), dtype=torch.bool, device=output.device)
    if task.only_where:
        selected &= batch[task.only_where] == 1
    if task.kind == "regression":
        terms = _regression_terms(task, output, batch)
        weights = terms.new_tensor(task.target_weights) if task.target_weights else terms.new_ones(terms.shape[-1])
        per_example = (terms * weights).sum(-1) / weights.sum()
    else:
        label = batch[task.label_key].long()
        selected &= label >= 0
        label = label.clamp(min=0)
        if task.loss == "bce":
            per_example = F.binary_cross_entropy_with_logits(output[:, 0], label.to(output.dtype), reduction="none")
        elif task.loss == "focal":
            per_example = _focal(output, label, task.focal_gamma)
        else:
            per_example = F.cross_entropy(output, label, reduction="none", label_smoothing=task.label_smoothing)
    # where, not a product: unselected entries (e.g. quark jets in a tau-only task) may hold NaN targets
    per_example = torch.where(selected, per_example * _example_weights(batch, per_example), 0.0)
    return task.weight * per_example.sum() / selected.sum().clamp(min=1)


def classifier_losses(outputs: Batch, batch: Batch, spec: JobSpec) -> dict[str, torch.Tensor]:
    return {task.name: task_loss(task, outputs[task.name], batch) for task in spec.tasks}


STAGE_LOSSES = {"tokenizer": tokenizer_loss, "backbone": next_token_loss, "classifier": classifier_losses}


def omnijet_losses(outputs: Batch, batch: Batch, spec: JobSpec) -> dict[str, torch.Tensor]:
    return STAGE_LOSSES[spec.model.stage](outputs, batch, spec)
