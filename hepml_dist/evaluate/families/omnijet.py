"""Evaluation of OmniJet-alpha, by stage of the chain:

- tokenizer: how well the VQ-VAE reconstructs each constituent feature (residuals in physical units), and how the
  codebook is used (fraction of codes used, perplexity) — `evaluate/omnijet_tokenizer.py`;
- backbone (generative pretraining): jets sampled from the backbone against real jets (constituent multiplicity,
  jet mass and pT, constituent pT / Delta eta / Delta phi) with 1-Wasserstein distances and their truth-vs-truth
  floor, as arXiv:2403.05618 judges generation — `evaluate/omnijet_generation.py`;
- classifier (the fine-tuned tau heads): jet taggers, so the jet family's evaluation, the same tau report and
  baseline as MultiParTau (`families/jets.py`).
"""

from __future__ import annotations

from hepml_dist.evaluate import omnijet_generation, omnijet_tokenizer
from hepml_dist.evaluate.summed_metrics import summed_metrics
from hepml_dist.evaluate.families import jets
from hepml_dist.evaluate.families.base import EvaluateContext, Evaluation, ReportContext

GENERATED_JETS = 2000
"""Jets `hepml evaluate` samples from a backbone (fewer when the split holds fewer than twice as many real jets)."""


def declare(spec) -> list[Evaluation]:
    return STAGES[spec.model.stage](spec)


def _tokenizer(spec) -> list[Evaluation]:
    return [Evaluation("tokenizer reconstruction and codebook usage", check_inputs=omnijet_tokenizer.check_tokenizer_inputs,
                       results=_tokenizer_results, sections=_tokenizer_sections)]


def _backbone(spec) -> list[Evaluation]:
    return [Evaluation("generated vs real jets", check_inputs=omnijet_generation.check_generation_inputs,
                       results=_generation_results, sections=_generation_sections)]


STAGES = {"tokenizer": _tokenizer, "backbone": _backbone, "classifier": jets.declare}


def _losses(context: EvaluateContext) -> dict:
    """The split's losses and summed metrics (reconstruction MSE, next-token accuracy; `evaluate/summed_metrics.py`)
    and the examples they were computed on: the per-task Collector keeps none for these stages."""
    payload = context.payload
    return {"metrics": summed_metrics(payload, context.split),
            "examples": {task: int(pair[1]) for task, pair in payload.get("loss_sums", {}).items()}}


def _tokenizer_results(context: EvaluateContext) -> dict:
    result = omnijet_tokenizer.tokenizer_evaluation(context.folder, context.split, context.max_batches,
                                                    context.plots_dir)
    found = _losses(context)
    return {**found, "metrics": {**found["metrics"], **result.get("metrics", {})}, omnijet_tokenizer.KEY: result}


def _generation_results(context: EvaluateContext) -> dict:
    result = omnijet_generation.generation_evaluation(context.folder, context.split, GENERATED_JETS,
                                                      context.spec.training.seed, context.plots_dir)
    found = _losses(context)
    return {**found, "metrics": {**found["metrics"], **result.get("metrics", {})}, omnijet_generation.KEY: result}


def _tokenizer_sections(context: ReportContext) -> list:
    return omnijet_tokenizer.tokenizer_sections(context.run, context.figures)


def _generation_sections(context: ReportContext) -> list:
    return omnijet_generation.generation_sections(context.run, context.figures)
