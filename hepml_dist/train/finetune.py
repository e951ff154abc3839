"""Fine-tuning and phased training: load selected pretrained weights, freeze modules, restrict training to a phase.

The three OmniJet modes are spec settings: from scratch (no `init_from`), frozen backbone (`init_from` + `freeze`),
full fine-tune (`init_from`, optionally `optim.lr_multipliers` for the new head). Pretrained weights are loaded
after the model's own initialisation, so no initialiser can overwrite them.
"""

import re
from collections.abc import Sequence

import torch
from torch import nn

from hepml_dist.errors import UserError
from hepml_dist.runs import load_model_state, resolve_checkpoint
from hepml_dist.spec import JobSpec
from hepml_dist.spec.training import PhaseSpec


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def load_pretrained(model: nn.Module, source: str, modules: Sequence[str] = ()) -> list[str]:
    """Copy the tensors of checkpoint `source` whose names match `modules` (all if empty) into the model.
    Returns the loaded names; shape mismatches and an empty selection are errors."""
    folder = resolve_checkpoint(source)
    pretrained = load_model_state(folder)
    own = model.state_dict()
    selected = {k: v for k, v in pretrained.items() if not modules or _matches(k, modules)}
    loadable = {k: v for k, v in selected.items() if k in own}
    wrong_shape = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in loadable.items() if v.shape != own[k].shape]
    if wrong_shape:
        raise UserError(
            f"training.init_from {folder}: tensors with a different shape in this model: {'; '.join(wrong_shape[:5])}; "
            "restrict training.init_modules to the modules that agree"
        )
    if not loadable:
        raise UserError(
            f"training.init_from {folder}: nothing to load (init_modules {list(modules)} match none of the model's "
            f"parameters, e.g. {', '.join(list(own)[:3])})"
        )
    with torch.no_grad():
        for name, value in loadable.items():
            own[name].copy_(value)
    return sorted(loadable)


def freeze(model: nn.Module, patterns: Sequence[str]) -> list[str]:
    """Stop the parameters whose names match any pattern from training; returns their names."""
    frozen = []
    for name, param in model.named_parameters():
        if _matches(name, patterns):
            param.requires_grad_(False)
            frozen.append(name)
    if patterns and not frozen:
        raise UserError(f"training.freeze {list(patterns)} matches no parameter of the model")
    return frozen


def restrict_to(model: nn.Module, spec: JobSpec, phase: PhaseSpec) -> None:
    """Phase training: from the phase's start, exactly the parameters matching its `trainable` learn.

    The phase replaces the job's `freeze` list, so a phase can also unfreeze (OmniJet fine-tuning: backbone frozen
    for the first epochs, then everything trains)."""
    for name, param in model.named_parameters():
        param.requires_grad_(_matches(name, phase.trainable))
        if not param.requires_grad:
            param.grad = None
    if not any(p.requires_grad for p in model.parameters()):
        raise UserError(f"training.phases: trainable {phase.trainable} matches no trainable parameter")


def phase_at(spec: JobSpec, epoch: int) -> int | None:
    """Index of the phase in force in (0-based) `epoch`, or None before the first phase."""
    current = None
    for i, phase in sorted(enumerate(spec.training.phases), key=lambda item: item[1].start_epoch):
        if epoch + 1 >= phase.start_epoch:
            current = i
    return current
