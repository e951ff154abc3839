"""Each model family's evaluation, declared in the family's own module and assembled by `hepml evaluate` and
`hepml report`.

A family says what it needs from the data (checked before any work), what `hepml evaluate` adds to metrics.json
beyond the per-task metrics, which baseline stands next to the model in the report, and the report sections of its
own (`base.Evaluation`). No family gets another family's: the tau baseline never meets an MLPF run, the rule-based
particle flow never meets a jet tagger. `FAMILY_EVALUATIONS` maps the spec's `model.family` to its module's
`declare(spec)`, which may pick by the job (an OmniJet tokenizer is judged differently from its fine-tuned tagger).
"""

from __future__ import annotations

from collections.abc import Callable

from hepml_dist.errors import UserError
from hepml_dist.evaluate.families import events, jets, mlpf, omnijet
from hepml_dist.evaluate.families.base import Evaluation, EvaluateContext, ReportContext

FAMILY_EVALUATIONS: dict[str, Callable[..., list[Evaluation]]] = {
    "part": jets.declare,
    "aot": events.declare,
    "mlpf": mlpf.declare,
    "omnijet": omnijet.declare,
}

__all__ = ["FAMILY_EVALUATIONS", "EvaluateContext", "Evaluation", "ReportContext", "evaluations"]


def evaluations(spec) -> list[Evaluation]:
    """The evaluations the job's family declares for this job (in report order)."""
    declare = FAMILY_EVALUATIONS.get(spec.model.family)
    if declare is None:
        raise UserError(f"model.family={spec.model.family!r} declares no evaluation; known: {sorted(FAMILY_EVALUATIONS)}")
    return declare(spec)
