"""Evaluation of OmniJet-alpha, by stage: the fine-tuned tau heads are jet taggers and get the jet family's
evaluation (the same tau report and baseline as MultiParTau)."""

from __future__ import annotations

from hepml_dist.evaluate.families import jets
from hepml_dist.evaluate.families.base import Evaluation


def declare(spec) -> list[Evaluation]:
    if spec.model.stage == "classifier":
        return jets.declare(spec)
    return []
