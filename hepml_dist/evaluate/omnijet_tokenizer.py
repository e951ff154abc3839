"""Evaluation of an OmniJet-alpha tokenizer run (`model.stage: tokenizer`): how faithfully its codes describe jets.

On the jets of a split (the job's own loader, preprocessing and cuts), each jet goes through the path the backbone
and `hepml sample` use: encode -> nearest code (`tokenize`) -> decoder over the whole jet (`detokenize`); then
preprocessing is undone, so every number is in physical units:
- resolution per constituent feature: residual = pT_rec / pT - 1 (relative) for `part_pt`, reconstructed - input
  for `part_etarel` and `part_phirel`; `resolution_<feature>` is the residual's interquartile range (q75 - q25),
  `bias_<feature>` its median; the same for the jet pT and jet mass of the massless constituents (relative);
- codebook usage: the fraction of the K codes that at least one constituent of the split chose, and the perplexity
  exp(-sum p_k ln p_k) of the code frequencies p_k (K when every code is equally used, 1 when one code takes all).
`tokenizer_evaluation` returns what `hepml evaluate` stores as metrics.json's `omnijet_tokenizer`;
`tokenizer_sections` draws the report's section from it.
"""

from __future__ import annotations

import html
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from rich.progress import Progress

from hepml_dist import runs
from hepml_dist.data.loader import open_stream
from hepml_dist.data.shards import ShardResolver
from hepml_dist.errors import UserError
from hepml_dist.evaluate import omnijet_figures as of
from hepml_dist.evaluate import report_figures as rf
from hepml_dist.evaluate.report_html import Section
from hepml_dist.omnijet.observables import LABELS, TEXT_LABELS, jet_kinematics
from hepml_dist.omnijet.preprocess import physical_constituents
from hepml_dist.omnijet.tokenize import CONSTITUENTS, require_stage

KEY = "omnijet_tokenizer"
FEATURES = ("part_pt", "part_etarel", "part_phirel")
JET_QUANTITIES = ("jet_pt", "jet_mass")
RELATIVE = {"part_pt", "jet_pt", "jet_mass"}  # residuals as a fraction of the input; the angles' absolute
RESIDUAL_LABELS = {
    "part_pt": r"constituent $p_T^{rec} / p_T - 1$",
    "part_etarel": r"constituent $\Delta\eta^{rec} - \Delta\eta$",
    "part_phirel": r"constituent $\Delta\phi^{rec} - \Delta\phi$",
    "jet_pt": r"jet $p_T^{rec} / p_T - 1$",
    "jet_mass": r"jet $m^{rec} / m - 1$",
}
STYLES = {"input": {"label": "input", "color": "black"},
          "reconstructed": {"label": "reconstructed", "color": "#3f90da", "ls": "--"}}


def codebook_numbers(codes: np.ndarray, codebook_size: int) -> dict:
    """Usage (fraction of codes chosen at least once) and perplexity of the codes of all real constituents."""
    counts = np.bincount(np.asarray(codes, dtype=np.int64), minlength=codebook_size).astype(np.float64)
    probs = counts / max(counts.sum(), 1.0)
    used = probs > 0
    return {
        "size": int(codebook_size),
        "used": int(used.sum()),
        "constituents": int(counts.sum()),
        "usage": float(used.mean()),
        "perplexity": float(np.exp(-(probs[used] * np.log(probs[used])).sum())),
        "sorted_counts": sorted((int(c) for c in counts[used]), reverse=True),
    }


def residuals(name: str, inputs: np.ndarray, reconstructed: np.ndarray) -> np.ndarray:
    if name in RELATIVE:
        keep = inputs > 0
        return reconstructed[keep] / inputs[keep] - 1.0
    return reconstructed - inputs


def residual_summary(values: np.ndarray) -> dict:
    if not len(values):
        return {"median": float("nan"), "iqr": float("nan"), "std": float("nan"), "count": 0}
    q25, median, q75 = np.percentile(values, [25, 50, 75])
    return {"median": float(median), "iqr": float(q75 - q25), "std": float(np.std(values)), "count": int(len(values))}


def check_tokenizer_inputs(spec, split: str) -> None:
    """Before any work: every dataset of the split holds the constituent columns (spec with absolute paths)."""
    patterns = getattr(spec.data, split, None)
    if patterns is None:
        raise UserError(f"family omnijet (tokenizer evaluation): data.{split} is not set in the job")
    resolver = ShardResolver()
    for ref in resolver.resolve(patterns):
        missing = [c for c in CONSTITUENTS if c not in resolver.manifests[ref.dataset].columns]
        if missing:
            raise UserError(f"family omnijet (tokenizer evaluation): the {split} data {ref.source} lack column(s) "
                            f"{missing}; the tokenizer reads the constituents' four-momenta")


def reconstruct_split(folder: Path, split: str, max_batches: int | None):
    """(spec, {quantity: (input values, reconstructed values)}, codes of the real constituents, jets) of `split`:
    one value per real constituent for the features, one per jet for jet pT and mass. Only these flat arrays are
    kept (about 30 bytes per constituent), so memory grows with the jets evaluated: bound them with max_batches."""
    spec, model = runs.load_trained(folder)
    require_stage(spec, "tokenizer", folder)
    spec = runs.absolute_paths(spec)
    check_tokenizer_inputs(spec, split)
    stream = open_stream(spec.data, split, rank=0, world_size=1, seed=spec.training.seed, training=False)
    total = min(stream.steps_per_epoch, max_batches or stream.steps_per_epoch)
    parts: dict[str, tuple[list, list]] = {name: ([], []) for name in (*FEATURES, *JET_QUANTITIES)}
    codes, jets = [], 0
    with Progress() as progress, torch.no_grad():
        bar = progress.add_task(f"reconstructing {split} jets with the tokenizer", total=total)
        for index, batch in enumerate(stream.batches(0)):
            if index >= total:
                break
            features, mask = batch["features"].float(), batch["mask"][:, 0] > 0
            chosen = model.tokenize(features, mask)
            real = mask.numpy()
            pair = (physical_constituents(features.numpy(), real),
                    physical_constituents(model.detokenize(chosen, mask).numpy(), real))
            for side, constituents in enumerate(pair):
                jet = jet_kinematics(*(constituents[name] for name in FEATURES), real)
                for name in FEATURES:
                    parts[name][side].append(constituents[name][real])
                for name in JET_QUANTITIES:
                    parts[name][side].append(jet[name])
            codes.append(chosen.numpy()[real].astype(np.int32))
            jets += len(real)
            progress.advance(bar)
    if not codes or not sum(len(c) for c in codes):
        raise UserError(f"the {split} split of {folder} gave no constituents to reconstruct")
    values = {name: (np.concatenate(given), np.concatenate(rebuilt)) for name, (given, rebuilt) in parts.items()}
    return spec, values, np.concatenate(codes), jets


def tokenizer_evaluation(folder: Path, split: str, max_batches: int | None, plots_dir: Path) -> dict:
    """Resolution per feature, jet pT and mass, codebook usage and perplexity of a tokenizer checkpoint on `split`;
    figures to `plots_dir`. JSON-ready: {"metrics": {...}, "features": {...}, "jet": {...}, "codebook": {...}}."""
    spec, values, codes, jets = reconstruct_split(Path(folder), split, max_batches)
    result: dict = {"split": split, "checkpoint": str(folder), "jets": jets, "features": {}, "jet": {}}
    metrics: dict[str, float] = {}
    for name, (given, rebuilt) in values.items():
        group = "features" if name in FEATURES else "jet"
        residual = residuals(name, given, rebuilt)
        summary = residual_summary(residual)
        log = name == "part_pt"  # soft constituents span decades; jets do not
        summary["distribution"] = of.histogram(of.edges_for(given, log=log),
                                               {"input": given, "reconstructed": rebuilt}, log=log)
        spread = max(summary["iqr"], 1e-6) if np.isfinite(summary["iqr"]) else 1.0
        centre = summary["median"] if np.isfinite(summary["median"]) else 0.0
        summary["residual"] = of.histogram(np.linspace(centre - 3 * spread, centre + 3 * spread, of.BINS + 1),
                                           {"residual": residual})
        summary["relative"] = name in RELATIVE
        result[group][name] = summary
        metrics[f"{split}_resolution_{name}"] = summary["iqr"]
        metrics[f"{split}_bias_{name}"] = summary["median"]
    codebook = codebook_numbers(codes, spec.model.tokenizer.codebook_size)
    result["codebook"] = codebook
    metrics[f"{split}_codebook_usage"] = codebook["usage"]
    metrics[f"{split}_codebook_perplexity"] = codebook["perplexity"]
    result["metrics"] = metrics
    of.save_figures(tokenizer_figures(result), Path(plots_dir), KEY)
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Figures and the report section


def distributions_figure(result: dict) -> Figure:
    hists = {name: q["distribution"] for name, q in {**result["features"], **result["jet"]}.items()}
    return of.comparison_figure(hists, LABELS, "input", STYLES, right=f"{result['split']} split")


def residuals_figure(result: dict) -> Figure:
    quantities = {**result["features"], **result["jet"]}
    with plt.style.context(rf.STYLE):
        fig, axes = plt.subplots(1, len(quantities), figsize=(5.5 * len(quantities), 5.5), squeeze=False)
        for ax, (name, q) in zip(axes[0], quantities.items()):
            hist = q["residual"]
            ax.stairs(hist["counts"]["residual"], hist["edges"], color="#3f90da", lw=2, fill=True, alpha=0.5)
            ax.axvline(q["median"], color="black", lw=1)
            ax.set_xlabel(RESIDUAL_LABELS[name], fontsize=14)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
            ax.text(0.03, 0.95, f"median {q['median']:.3g}\nIQR {q['iqr']:.3g}", transform=ax.transAxes,
                    va="top", fontsize=12)
        axes[0][0].set_ylabel("constituents / jets per bin", fontsize=14)
        rf.label_axes(axes[0][0], right="")
        fig.tight_layout()
    return fig


def codebook_figure(result: dict) -> Figure:
    book = result["codebook"]
    counts = np.asarray(book["sorted_counts"], dtype=float)
    with plt.style.context(rf.STYLE):
        fig, ax = plt.subplots(figsize=(9, 6))
        ax.step(np.arange(1, len(counts) + 1), counts / max(counts.sum(), 1), where="mid", color="#3f90da", lw=2)
        ax.axhline(1 / book["size"], color="grey", ls="--", lw=1, label=f"uniform over {book['size']:,} codes")
        ax.set_yscale("log")
        ax.set_xlabel("code, by frequency rank")
        ax.set_ylabel("fraction of constituents")
        ax.text(0.97, 0.95, f"{book['used']:,} of {book['size']:,} codes used ({100 * book['usage']:.1f} %)\n"
                f"perplexity {book['perplexity']:,.1f}", transform=ax.transAxes, ha="right", va="top", fontsize=13)
        ax.legend(loc="lower left", fontsize=12)
        rf.label_axes(ax, right=f"{result['split']} split")
    return fig


def tokenizer_figures(result: dict) -> dict[str, Figure]:
    return {"distributions": distributions_figure(result), "residuals": residuals_figure(result),
            "codebook": codebook_figure(result)}


def stored_result(run, key: str, what: str) -> dict:
    """metrics.json's `key` of a run, or a UserError saying how to get it."""
    result = run.evaluation.get(key)
    if not isinstance(result, dict):
        raise UserError(f"{run.path}/metrics.json has no {what} (`{key}`): it was written by an older `hepml evaluate` "
                        f"or for another kind of run; run `hepml evaluate {run.path}` again, then `hepml report`")
    return result


def _table(result: dict) -> str:
    rows = []
    for name, q in {**result["features"], **result["jet"]}.items():
        kind = "relative" if q["relative"] else "absolute"
        rows.append(f"<tr><td>{TEXT_LABELS[name]}</td><td>{kind}</td><td class=\"num\">{q['median']:.4g}</td>"
                    f"<td class=\"num\">{q['iqr']:.4g}</td><td class=\"num\">{q['std']:.4g}</td>"
                    f"<td class=\"num\">{q['count']:,}</td></tr>")
    book = result["codebook"]
    rows.append(f"<tr><td>codebook</td><td colspan=\"5\">{book['used']:,} of {book['size']:,} codes used "
                f"({100 * book['usage']:.2f} %), perplexity {book['perplexity']:,.1f} over "
                f"{book['constituents']:,} constituents</td></tr>")
    return ("<table><tr><th>quantity</th><th>residual</th><th>median (bias)</th><th>IQR (resolution)</th>"
            f"<th>std</th><th>entries</th></tr>{''.join(rows)}</table>")


def tokenizer_sections(run, figures) -> list[Section]:
    """The tokenizer's section of `hepml report`: resolution table, input vs reconstructed, residuals, code usage."""
    result = stored_result(run, KEY, "tokenizer evaluation")
    drawn = tokenizer_figures(result)
    images = [
        (figures.png(drawn["distributions"], f"{KEY}_distributions"),
         "Input and reconstructed constituents (pT, Delta eta, Delta phi to the jet axis) and the jet pT and mass of "
         "the massless constituents, unit area; lower panels: reconstructed / input, grey band: the input's Poisson "
         "uncertainty."),
        (figures.png(drawn["residuals"], f"{KEY}_residuals"),
         "Residuals: relative for pT and mass (reconstructed / input - 1), absolute for the angles; the edge bins "
         "hold what falls outside 3 interquartile ranges of the median."),
        (figures.png(drawn["codebook"], f"{KEY}_codebook"),
         "Share of the constituents that took each code, codes ordered by frequency; dashed: a uniformly used "
         "codebook."),
    ]
    text = (f"{result['jets']:,} jets of the {html.escape(result['split'])} split, each encoded, quantised to the "
            "nearest code and decoded (the decoder sees the whole jet), preprocessing undone. Resolution = "
            "interquartile range of the residual; lower is better. Usage = share of codes chosen at least once; "
            "perplexity = exp(entropy of the code frequencies).")
    return [Section("OmniJet-alpha tokenizer: reconstruction and codebook", "omnijet-tokenizer", text, images,
                    _table(result))]
