"""Losses of the OmniJet-alpha family, one function per stage (spec.model.stage).

- tokenizer: masked reconstruction MSE + vq_alpha x quantiser loss (the model's `aux_vq_loss`). Unlike the reference,
  which averages the squared error over padded positions too, both terms average over real constituents only, so the
  loss does not shrink with the amount of padding in a batch.
- backbone: next-token cross-entropy over real targets only. The reference also scores the padded targets (token 0
  after the stop token); those are trivially predictable, dilute the loss by the padding fraction and teach nothing.
  Our values are therefore higher than the reference's at equal quality; compare perplexities over real tokens.
- classifier: the task losses shared by all families (`hepml_dist.models.losses.task_losses`).
"""

import torch
import torch.nn.functional as F

from hepml_dist.models.losses import task_losses
from hepml_dist.spec import JobSpec

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


STAGE_LOSSES = {"tokenizer": tokenizer_loss, "backbone": next_token_loss, "classifier": task_losses}


def omnijet_losses(outputs: Batch, batch: Batch, spec: JobSpec) -> dict[str, torch.Tensor]:
    return STAGE_LOSSES[spec.model.stage](outputs, batch, spec)


def omnijet_metrics(outputs: Batch, batch: Batch, spec: JobSpec) -> dict[str, tuple[float, float]] | None:
    """Validation metrics of the tokenizer and backbone stages as {name: (sum, count)} to accumulate over batches and
    ranks (metric = total sum / total count); None for the classifier stage, whose tasks get the generic metrics.

    The generic per-task collector cannot score these stages: the tokenizer's truth is its input, and the backbone's
    per-token scores over 8194 classes are far too many to keep. Names follow `<task>_<metric>`.
    """
    task = spec.tasks[0]
    if spec.model.stage == "tokenizer":
        real = (batch["mask"][:, 0] > 0).float()
        count = float(real.sum())
        error = outputs[task.name].detach().float() - batch["features"].transpose(1, 2).float()
        squared = (error**2 * real[..., None]).sum((0, 1))
        per_feature = {f"{task.name}_mse_{name}": (float(v), count) for name, v in zip(task.targets or [], squared)}
        size = float(len(real))
        names = ("vq_loss", "codebook_usage", "codebook_perplexity")
        aux = {name: (float(outputs[f"aux_{name}"].detach()) * size, size) for name in names}
        return {**per_feature, **aux}
    if spec.model.stage == "backbone":
        real = batch["mask"][:, 0, 1:] > 0
        correct = (outputs[task.name].detach().argmax(-1) == batch["tokens"][:, 1:]) & real
        return {f"{task.name}_accuracy": (float(correct.sum()), float(real.sum()))}
    return None


def summed_metrics(spec: JobSpec):
    """`omnijet_metrics` for the stages the per-task Collector cannot score (tokenizer, backbone); None otherwise."""
    return omnijet_metrics if spec.model.stage in ("tokenizer", "backbone") else None
