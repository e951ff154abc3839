"""Evaluation of event classifiers for searches (AnalysisObjectTransformer): what an analyst judges a selection by.

`hepml evaluate` adds the expected significance at the best cut with its uncertainty and the rejection of each
background process (`evaluate/significance.py`); the report adds the significance scan and the per-process table
(`evaluate/report_search.py`), next to gradient-boosted trees on the event features and the flattened leading
objects with the same weights (`evaluate/baseline_events.py`).
"""

from __future__ import annotations

from hepml_dist.evaluate import report_search
from hepml_dist.evaluate.families.base import EvaluateContext, Evaluation, ReportContext
from hepml_dist.evaluate.significance import applies, check_columns, search_metrics


def declare(spec) -> list[Evaluation]:
    if not applies(spec):
        return []
    return [Evaluation(
        "expected significance",
        check_inputs=lambda spec, split: check_columns(spec, split),
        results=_results,
        baseline=report_search.event_baseline_predictions if spec.data.train is not None else None,
        baseline_description="gradient-boosted trees on event features and leading objects",
        sections=_sections,
    )]


def _results(context: EvaluateContext) -> dict:
    return {"metrics": search_metrics(context.spec, context.payload, context.split)}


def _sections(context: ReportContext) -> list:
    return report_search.search_sections(context.run, context.models, context.headline, context.figures,
                                         context.sample, context.baseline_meta)
