"""Evaluation of MLPF (particle-flow reconstruction), as particleflow judges it: reco jets clustered from the
predicted particles against gen jets (response median and IQR / median in bins of gen-jet pT), MET response, per
process, next to a rule-based particle flow built from the same elements (`evaluate/mlpf.py`,
`evaluate/mlpf_baseline.py`, report section in `evaluate/mlpf_report.py`). The baseline is part of that evaluation,
not a separate model's predictions, so the report's per-task sections stand alone."""

from __future__ import annotations

from hepml_dist.evaluate import mlpf, mlpf_report
from hepml_dist.evaluate.families.base import EvaluateContext, Evaluation, ReportContext


def declare(spec) -> list[Evaluation]:
    return [Evaluation("MLPF jet and MET response", check_inputs=_check, results=_results, sections=_sections)]


def _check(spec, split: str) -> None:
    mlpf.require_columns(getattr(spec.data, split), split)


def _results(context: EvaluateContext) -> dict:
    results = mlpf.evaluate_mlpf_run(context.folder, context.split, context.max_batches, context.plots_dir)
    return {"mlpf": results, "metrics": mlpf.summary_metrics(results, context.split)}


def _sections(context: ReportContext) -> list:
    return mlpf_report.mlpf_sections(context.run, context.figures)
