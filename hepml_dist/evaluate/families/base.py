"""The shape of a family's evaluation (`Evaluation`) and what `hepml evaluate` / `hepml report` hand it; the
families declare theirs in their own modules (`families/__init__.py` maps names to them).

A family says what it needs from the data (checked before any work), what `hepml evaluate` adds to metrics.json
beyond the per-task metrics, which baseline stands next to the model in the report, and the report sections of its
own. No family gets another family's: the tau baseline never meets an MLPF run, the rule-based particle flow never
meets a jet tagger. `FAMILY_EVALUATIONS` maps the spec's `model.family` to the module's `declare(spec)`, which may
pick by the job (an OmniJet tokenizer is judged differently from its fine-tuned tau tagger).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hepml_dist.data.shards import ShardResolver
from hepml_dist.errors import UserError


@dataclass(frozen=True)
class EvaluateContext:
    """What `hepml evaluate` hands a family: the evaluated checkpoint and the model's predictions on the split."""

    folder: Path  # the evaluated checkpoint folder
    run_dir: Path
    spec: Any  # JobSpec with absolute data paths
    split: str
    payload: dict[str, Any]  # the Collector payload of the model on the split (evaluate/metrics.py)
    max_batches: int | None
    plots_dir: Path


@dataclass
class ReportContext:
    """What `hepml report` hands a family's sections: the run, every model's predictions, the page's headline table
    (rows appended by sections), the figure sink and the sample label of the plots."""

    run: Any  # evaluate.report_facts.Run
    models: dict[str, dict[str, Any]]  # "transformer" (and "baseline" when the family has one) -> payload
    headline: list[tuple[str, dict[str, str]]]
    figures: Any  # evaluate.report.Figures: .png(figure, name) -> base64 PNG, logged to the run's tracker
    sample: str
    baseline_meta: dict[str, Any]


def _nothing(_context) -> Any:
    return None


@dataclass(frozen=True)
class Evaluation:
    """One part of a family's evaluation. Every callable is optional."""

    name: str
    """What it is, as errors and the report's log say it (e.g. "MLPF jet and MET response")."""
    check_inputs: Callable[[Any, str], None] = lambda spec, split: None
    """(spec with absolute paths, split) -> raises UserError naming the family and the missing columns."""
    results: Callable[[EvaluateContext], dict[str, Any] | None] = _nothing
    """`hepml evaluate`: {metrics.json key: JSON value}; a "metrics" key holds flat numbers merged into the run's
    metrics (and sent to the trackers)."""
    baseline: Callable[[Any, int | None], tuple[dict[str, Any], dict[str, Any]]] | None = None
    """`hepml report`: (run, max training examples) -> (Collector-style payload on the evaluated split, facts), fitted
    on the run's own train split and cached in RUN_DIR/baseline/."""
    baseline_description: str = ""
    """One line for the log, e.g. "gradient-boosted trees on jet-level quantities"."""
    check_baseline_inputs: Callable[[Any, str], None] = lambda spec, split: None
    """Like `check_inputs`, for the baseline only (skipped with `hepml report --no-baseline`)."""
    baseline_html: Callable[[dict[str, Any]], str] = lambda meta: ""
    """The report's "The baseline" paragraph from the baseline's facts ("" when a section describes it)."""
    sections: Callable[[ReportContext], list] = lambda context: []
    """`hepml report`: the family's own sections (evaluate.report_html.Section), after the per-task ones."""


def require_columns(patterns: str | Sequence[str] | None, columns: Sequence[str], *, family: str, what: str,
                    split: str, fix: str) -> None:
    """UserError naming the family, the evaluation, the split's dataset and the missing columns, if any shard of the
    split lacks one of `columns`."""
    if patterns is None:
        return
    resolver = ShardResolver()
    for ref in resolver.resolve(patterns):
        missing = [c for c in columns if c not in resolver.manifests[ref.dataset].columns]
        if missing:
            raise UserError(f"family {family}: {what} needs the stored column(s) {missing}, which the {split} data "
                            f"{ref.source} lack; {fix}")
