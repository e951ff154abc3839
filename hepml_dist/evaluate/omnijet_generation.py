"""Evaluation of an OmniJet-alpha backbone run (`model.stage: backbone`): how real the jets it generates are.

The backbone samples jets (`hepml_dist.omnijet.generate.sample_constituents`: start token, multinomial next
tokens, decoded by the tokenizer recorded in the token dataset's manifest). The real jets are those the tokens were
made from: the token dataset's manifest names its source dataset (`source_files`), whose split of the same name is
read and preprocessed exactly as `hepml data tokenize` did (same cuts, at most `max_length - 2` constituents).

Observables (`hepml_dist.omnijet.observables`): constituent multiplicity, jet pT and jet mass, and the pT, Delta eta,
Delta phi of all constituents. For each, the 1-Wasserstein distance W1 (scipy.stats.wasserstein_distance):
- `w1_<obs>`: generated jets against half B of the real jets;
- `w1_floor_<obs>`: half A against half B, the truth-vs-truth noise floor of samples of this size (a perfect
  generator scores about this);
- `w1_tokenized_<obs>`: half A after the tokenizer round trip against half B: what a generator that reproduces the
  token sequences exactly would score (the tokenizer's ceiling on generation).
The halves: the first `2m` real jets read, permuted by `numpy.random.default_rng(seed).permutation(2m)`, A = the
first m, B = the next m, where m = min(n_jets, real jets // 2) jets are generated.
`generation_evaluation` returns what `hepml evaluate` stores as metrics.json's `omnijet_generation`;
`generation_sections` draws the report's section from it.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy.stats import wasserstein_distance

from hepml_dist import runs
from hepml_dist.data.expressions import evaluate, inputs_of
from hepml_dist.data.reader import iter_shard_chunks
from hepml_dist.errors import UserError
from hepml_dist.evaluate import omnijet_figures as of
from hepml_dist.evaluate.omnijet_tokenizer import stored_result
from hepml_dist.evaluate.report_html import Section
from hepml_dist.omnijet.generate import find_tokenizer, load_chain, sample_constituents, token_manifest
from hepml_dist.omnijet.observables import LABELS, OBSERVABLES, TEXT_LABELS, observables, select
from hepml_dist.omnijet.preprocess import constituent_features, physical_constituents
from hepml_dist.omnijet.tokenize import CONSTITUENTS, open_source

KEY = "omnijet_generation"
MIN_JETS = 10
STYLES = {"real": {"label": "real", "color": "black"},
          "generated": {"label": "generated", "color": "#3f90da"},
          "tokenized": {"label": "real, tokenizer round trip", "color": "#f89c20", "ls": "--"}}


def source_of(patterns, split: str) -> tuple[Path, int, str | None]:
    """(source dataset of a token dataset's split, token sequence length, the `--where` selection of the jets)
    from the token dataset's manifest."""
    manifest = token_manifest(patterns)
    if manifest is None or not manifest.source_files:
        raise UserError(f"family omnijet (generation evaluation): data.{split} = {patterns} has no token dataset "
                        "manifest naming its source jets (written by `hepml data tokenize`); the evaluation compares "
                        "generated jets with the jets the tokens came from")
    source = Path(manifest.source_files[0])
    if not source.exists():
        raise UserError(f"family omnijet (generation evaluation): the tokens of {manifest.root} were made from "
                        f"{source}, which no longer exists; restore the jet dataset there")
    return source, int(manifest.meta.get("max_length", 0)), manifest.meta.get("where")


def source_manifest(source: Path, split: str):
    """The manifest of the jets the tokens came from, checked to hold `split` and the constituent columns."""
    manifest, splits = open_source(source)
    if split not in splits:
        raise UserError(f"family omnijet (generation evaluation): the jets the tokens came from, {source}, have no "
                        f"{split!r} split (they have {splits})")
    missing = [c for c in CONSTITUENTS if c not in manifest.columns]
    if missing:
        raise UserError(f"family omnijet (generation evaluation): the jets the tokens came from, {source}, lack "
                        f"column(s) {missing}")
    return manifest


def check_generation_inputs(spec, split: str) -> None:
    """Before any work: the backbone's token data of `split` name their source jets, which exist and hold the split
    and the constituent columns (spec with absolute paths)."""
    patterns = getattr(spec.data, split, None)
    if patterns is None:
        raise UserError(f"family omnijet (generation evaluation): data.{split} is not set in the job")
    source, _, _ = source_of(patterns, split)
    source_manifest(source, split)


def read_real_jets(source: Path, split: str, max_constituents: int, limit: int,
                   where: str | None = None) -> dict[str, np.ndarray]:
    """Up to `limit` jets of `split` of a jet dataset (those where `where` holds, as `hepml data tokenize --where`
    kept them), preprocessed as the tokenizer saw them: padded `part_pt`, `part_etarel`, `part_phirel`, `mask` and
    the tokenizer's input `features` [N, 3, P]."""
    manifest = source_manifest(source, split)
    shapes = {c: info.shape for c, info in manifest.columns.items()}
    wanted = [*CONSTITUENTS, *sorted(inputs_of(where) - set(CONSTITUENTS))] if where else list(CONSTITUENTS)
    parts, count = [], 0
    for shard in manifest.splits[split].shards:
        for _, columns in iter_shard_chunks(manifest.root / shard.path, columns=wanted, shapes=shapes,
                                            expected_chunks=len(shard.chunks)):
            if where:
                keep = np.broadcast_to(np.asarray(evaluate(where, columns)).astype(bool), (len(columns["part_n"]),))
                columns = {k: v[keep] for k, v in columns.items()}
            features, mask = constituent_features(columns, max_constituents)
            parts.append({**physical_constituents(features, mask), "mask": mask, "features": features})
            count += len(mask)
            if count >= limit:
                break
        if count >= limit:
            break
    if not parts:
        raise UserError(f"{source}: the {split} split holds no jets")
    width = max(p["mask"].shape[-1] for p in parts)
    padded = {k: np.concatenate([np.pad(p[k], [(0, 0)] * (p[k].ndim - 1) + [(0, width - p[k].shape[-1])])
                                 for p in parts])[:limit] for k in parts[0]}
    return padded


def round_trip(tok, jets: dict[str, np.ndarray], batch_size: int = 1024) -> dict[str, np.ndarray]:
    """The jets after the tokenizer's encode -> code -> decode, preprocessing undone."""
    out = []
    with torch.no_grad():
        for start in range(0, len(jets["mask"]), batch_size):
            features = torch.from_numpy(jets["features"][start:start + batch_size])
            mask = torch.from_numpy(jets["mask"][start:start + batch_size])
            decoded = tok.detokenize(tok.tokenize(features, mask), mask).numpy()
            out.append({**physical_constituents(decoded, mask.numpy()), "mask": mask.numpy()})
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


def halves(count: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the real halves A and B (module docstring)."""
    if count < 2 * size:
        raise ValueError(f"{count} real jets cannot give two halves of {size}")
    order = np.random.default_rng(seed).permutation(2 * size)
    return order[:size], order[size:2 * size]


def compare(generated: dict, half_a: dict, half_b: dict, tokenized: dict | None = None) -> dict:
    """W1 of every observable (generated vs B, floor A vs B, tokenized A vs B) and the histograms of the report."""
    samples = {"generated": observables(generated), "a": observables(half_a), "b": observables(half_b)}
    if tokenized is not None:
        samples["tokenized"] = observables(tokenized)
    numbers: dict[str, dict] = {}
    for name in OBSERVABLES:
        real = np.concatenate([samples["a"][name], samples["b"][name]])
        entry = {"w1": float(wasserstein_distance(samples["generated"][name], samples["b"][name])),
                 "w1_floor": float(wasserstein_distance(samples["a"][name], samples["b"][name]))}
        if tokenized is not None:
            entry["w1_tokenized"] = float(wasserstein_distance(samples["tokenized"][name], samples["b"][name]))
        shown = {"real": real, "generated": samples["generated"][name]}
        if tokenized is not None:
            shown["tokenized"] = samples["tokenized"][name]
        log = name == "part_pt"  # soft constituents span decades; jets do not
        edges = of.edges_for(np.concatenate([real, samples["generated"][name]]) if name == "multiplicity" else real,
                             log=log, integer=name == "multiplicity")
        entry["histogram"] = of.histogram(edges, shown, log=log)
        entry["mean"] = {k: float(np.mean(v)) if len(v) else float("nan") for k, v in shown.items()}
        numbers[name] = entry
    return numbers


def generation_evaluation(folder: Path, split: str, n_jets: int, seed: int, plots_dir: Path) -> dict:
    """Sample `n_jets` jets from a backbone checkpoint and compare them with real jets of `split` (W1 per observable
    with its truth-vs-truth floor); figures to `plots_dir`. JSON-ready {"metrics": {...}, "observables": {...}, ...}."""
    spec, generator, _, tok = load_chain(Path(folder))  # says first when the run is not a backbone run
    if n_jets < MIN_JETS:
        raise UserError(f"the generation evaluation needs at least {MIN_JETS} generated jets (asked for {n_jets})")
    spec = runs.absolute_paths(spec)
    patterns = getattr(spec.data, split, None)
    if patterns is None:
        raise UserError(f"data.{split} is not set in {folder}/spec.yaml; choose a split the job defines")
    source, length, where = source_of(patterns, split)
    length = length or generator.backbone.max_sequence_length
    real = read_real_jets(source, split, length - 2, 2 * n_jets, where)
    size = min(n_jets, len(real["mask"]) // 2)
    if size < MIN_JETS:
        raise UserError(f"{source}: the {split} split has {len(real['mask'])} jets; the generation evaluation needs "
                        f"at least {2 * MIN_JETS} (two halves for the truth-vs-truth floor)")
    started = time.perf_counter()
    generated = sample_constituents(generator, tok, size, seed=seed)
    seconds = time.perf_counter() - started
    index_a, index_b = halves(len(real["mask"]), size, seed)
    half_a, half_b = select(real, index_a), select(real, index_b)
    numbers = compare(generated, half_a, half_b, round_trip(tok, half_a))
    metrics = {}
    for name, entry in numbers.items():
        for kind in ("w1", "w1_floor", "w1_tokenized"):
            metrics[f"{split}_{kind}_{name}"] = entry[kind]
    result = {
        "split": split, "checkpoint": str(folder), "seed": seed, "requested_jets": n_jets, "generated_jets": size,
        "real_jets": 2 * size, "source": str(source), "where": where, "tokenizer": str(find_tokenizer(spec)),
        "sampling_seconds": seconds,
        "observables": numbers, "metrics": metrics,
    }
    of.save_figures({"distributions": distributions_figure(result)}, Path(plots_dir), KEY)
    return result


# ----------------------------------------------------------------------------------------------------------------------
# The report section


def distributions_figure(result: dict) -> Figure:
    hists = {name: entry["histogram"] for name, entry in result["observables"].items()}
    return of.comparison_figure(hists, LABELS, "real", STYLES, right=f"{result['split']} split")


def _number(value: float) -> str:
    return "&ndash;" if value is None or not np.isfinite(value) else f"{value:.4g}"


def _table(result: dict) -> str:
    rows = []
    for name, entry in result["observables"].items():
        floor = entry["w1_floor"]
        ratio = entry["w1"] / floor if floor > 0 else float("nan")
        rows.append(f"<tr><td>{TEXT_LABELS[name]}</td>"
                    f"<td class=\"num\">{_number(entry['w1'])}</td>"
                    f"<td class=\"num\">{_number(entry.get('w1_tokenized', float('nan')))}</td>"
                    f"<td class=\"num\">{_number(floor)}</td><td class=\"num\">{_number(ratio)}</td></tr>")
    return ("<table><tr><th>observable</th><th>W1 generated vs real</th><th>W1 tokenizer round trip vs real</th>"
            f"<th>W1 real vs real (floor)</th><th>generated / floor</th></tr>{''.join(rows)}</table>")


def generation_sections(run, figures) -> list[Section]:
    """The backbone's section of `hepml report`: generated vs real distributions with ratio panels, the W1 table."""
    result = stored_result(run, KEY, "generation evaluation")
    image = figures.png(distributions_figure(result), f"{KEY}_distributions")
    text = (f"{result['generated_jets']:,} jets sampled from the backbone (seed {result['seed']}, temperature 1, "
            f"{result['sampling_seconds']:.0f} s) and decoded by the tokenizer <code>{html.escape(result['tokenizer'])}"
            f"</code>, against {result['real_jets']:,} real jets of the {html.escape(result['split'])} split of "
            f"<code>{html.escape(result['source'])}</code>"
            + (f" (the jets where <code>{html.escape(result['where'])}</code>)" if result.get("where") else "")
            + ", preprocessed as the tokenizer saw them. W1: the "
            "1-Wasserstein distance of the observable's distributions (scipy), in the observable's units; lower is "
            "better. The generated jets and the tokenizer round trip are compared with one half of the real jets, "
            "the other half gives the floor: what a perfect generator of this many jets scores.")
    return [Section("OmniJet-alpha generation: generated vs real jets", "omnijet-generation", text,
                    [(image, "Generated and real jets, unit area; the tokenizer round trip of the real jets (dashed) "
                             "is the best the generator can do with these tokens. Lower panels: ratio to the real "
                             "jets; grey band: their Poisson uncertainty.")],
                    _table(result))]
