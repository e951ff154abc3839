"""`hepml sample`: sample jets from a trained OmniJet-alpha backbone and decode them to constituents.

Sampling follows the reference: start from the start token, draw each next token from the softmax over all tokens
but the start token, stop at the stop token or at the maximum length. The codes are decoded by the tokenizer that
made the training tokens (its decoder sees the whole jet), then preprocessing is undone. The output is a parquet
file with one row per jet: `part_pt` (GeV), `part_etarel`, `part_phirel` lists and the raw `tokens`.
`sample_constituents` gives the same jets as padded arrays (the generation evaluation uses it).
"""

import os
from pathlib import Path

import awkward as ak
import numpy as np
import torch
from rich.progress import Progress

from hepml_dist.data.manifest import MANIFEST_NAME, Manifest, read_manifest
from hepml_dist.errors import UserError
from hepml_dist.omnijet.preprocess import physical_constituents, tokens_to_codes
from hepml_dist.omnijet.tokenize import require_stage
from hepml_dist.runs import absolute_paths, load_trained


def token_manifest(patterns) -> Manifest | None:
    """The manifest of the token dataset that a data path (a split folder or the dataset folder) points into."""
    folder = Path(patterns if isinstance(patterns, str) else patterns[0])
    for candidate in (folder, folder.parent):
        if (candidate / MANIFEST_NAME).is_file():
            return read_manifest(candidate)
    return None


def find_tokenizer(spec) -> Path:
    """The tokenizer checkpoint recorded by `hepml data tokenize` in the manifest of the backbone's training data."""
    manifest = token_manifest(spec.data.train)
    recorded = manifest.meta.get("tokenizer", {}).get("checkpoint") if manifest else None
    if recorded:
        return Path(recorded)
    raise UserError(
        f"cannot tell which tokenizer made the training tokens (no tokenizer in the manifest of {spec.data.train}); "
        "pass --tokenizer TOKENIZER_RUN_DIR"
    )


def load_chain(run_dir: Path, tokenizer: Path | None = None):
    """(backbone spec, generator, tokenizer spec, tokenizer) of a backbone run, checked to belong together."""
    spec, generator = load_trained(run_dir)
    require_stage(spec, "backbone", run_dir)
    tokenizer = tokenizer or find_tokenizer(absolute_paths(spec))
    tok_spec, tok = load_trained(tokenizer)
    require_stage(tok_spec, "tokenizer", tokenizer)
    codebook_size = spec.model.tokenizer.codebook_size
    if tok_spec.model.tokenizer.codebook_size != codebook_size:
        codes = tok_spec.model.tokenizer.codebook_size
        raise UserError(f"{tokenizer}: the tokenizer has {codes} codes but the backbone was trained on {codebook_size}")
    return spec, generator, tok_spec, tok


def sample_constituents(
    generator, tok, n_jets: int, batch_size: int = 512, temperature: float = 1.0, seed: int = 0, device: str = "cpu"
) -> dict[str, np.ndarray]:
    """`n_jets` sampled jets as padded arrays: `part_pt` (GeV), `part_etarel`, `part_phirel` and `mask` [N, L - 1],
    `tokens` [N, L] (L = the backbone's max_sequence_length; after the stop token 0). Same seed, same jets."""
    codebook_size = generator.codebook_size
    length = generator.backbone.max_sequence_length
    generator.to(device).eval()
    tok.to(device).eval()
    rng = torch.Generator(device=device).manual_seed(seed)
    parts: list[dict[str, np.ndarray]] = []
    with Progress() as progress:
        bar = progress.add_task("generating jets", total=n_jets)
        for start in range(0, n_jets, batch_size):
            tokens = generator.sample(min(batch_size, n_jets - start), temperature=temperature, generator=rng).cpu().numpy()
            tokens = np.pad(tokens, ((0, 0), (0, length - tokens.shape[1])))
            codes, mask = tokens_to_codes(tokens, codebook_size)
            features = tok.detokenize(torch.from_numpy(codes).to(device), torch.from_numpy(mask).to(device)).cpu().numpy()
            parts.append({**physical_constituents(features, mask), "mask": mask, "tokens": tokens})
            progress.advance(bar, len(tokens))
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def generate_jets(
    run_dir: Path,
    n_jets: int,
    out: Path | None = None,
    tokenizer: Path | None = None,
    batch_size: int = 512,
    temperature: float = 1.0,
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    if n_jets < 1:
        raise UserError("--jets must be at least 1")
    _, generator, _, tok = load_chain(run_dir, tokenizer)
    jets = sample_constituents(generator, tok, n_jets, batch_size, temperature, seed, device)
    mask, tokens = jets.pop("mask"), jets.pop("tokens")
    columns = {k: ak.unflatten(v[mask], mask.sum(1)) for k, v in jets.items()}
    real = tokens_real(tokens, generator.codebook_size)
    columns["tokens"] = ak.unflatten(tokens[real], real.sum(1))
    out = Path(out) if out else Path(run_dir) / "generated" / f"jets-{n_jets}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    ak.to_parquet(ak.zip(columns, depth_limit=1), tmp)
    os.replace(tmp, out)
    return out


def tokens_real(tokens: np.ndarray, codebook_size: int) -> np.ndarray:
    """Mask of the real tokens of each sequence: start, codes and the stop token if one was drawn."""
    after_stop = np.cumsum(tokens == codebook_size + 1, axis=1) - (tokens == codebook_size + 1)
    return after_stop == 0
