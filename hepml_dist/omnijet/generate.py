"""`hepml generate`: sample jets from a trained OmniJet-alpha backbone and decode them to constituents.

Sampling follows the reference: start from the start token, draw each next token from the softmax over all tokens
but the start token, stop at the stop token or at the maximum length. The codes are decoded by the tokenizer that
made the training tokens (its decoder sees the whole jet), then preprocessing is undone. The output is a parquet
file with one row per jet: `part_pt` (GeV), `part_etarel`, `part_phirel` lists and the raw `tokens`.
"""

import os
from pathlib import Path

import awkward as ak
import numpy as np
import torch
from rich.progress import Progress

from hepml_dist.data.manifest import MANIFEST_NAME, read_manifest
from hepml_dist.errors import UserError
from hepml_dist.omnijet.preprocess import physical_constituents, tokens_to_codes
from hepml_dist.omnijet.tokenize import require_stage
from hepml_dist.runs import load_trained


def find_tokenizer(spec) -> Path:
    """The tokenizer checkpoint recorded by `hepml data tokenize` in the manifest of the backbone's training data."""
    train = Path(spec.data.train if isinstance(spec.data.train, str) else spec.data.train[0])
    for folder in (train, train.parent):
        if (folder / MANIFEST_NAME).is_file():
            recorded = read_manifest(folder).meta.get("tokenizer", {}).get("checkpoint")
            if recorded:
                return Path(recorded)
    raise UserError(
        f"cannot tell which tokenizer made the training tokens (no tokenizer in the manifest of {train}); "
        "pass --tokenizer TOKENIZER_RUN_DIR"
    )


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
    spec, generator = load_trained(run_dir)
    require_stage(spec, "backbone", run_dir)
    if n_jets < 1:
        raise UserError("--jets must be at least 1")
    tokenizer = tokenizer or find_tokenizer(spec)
    tok_spec, tok = load_trained(tokenizer)
    require_stage(tok_spec, "tokenizer", tokenizer)
    codebook_size = spec.model.tokenizer.codebook_size
    if tok_spec.model.tokenizer.codebook_size != codebook_size:
        codes = tok_spec.model.tokenizer.codebook_size
        raise UserError(f"{tokenizer}: the tokenizer has {codes} codes but the backbone was trained on {codebook_size}")
    generator.to(device).eval()
    tok.to(device).eval()
    rng = torch.Generator(device=device).manual_seed(seed)
    jets = []
    with Progress() as progress:
        bar = progress.add_task("generating jets", total=n_jets)
        for start in range(0, n_jets, batch_size):
            tokens = generator.sample(min(batch_size, n_jets - start), temperature=temperature, generator=rng).cpu().numpy()
            codes, mask = tokens_to_codes(tokens, codebook_size)
            features = tok.detokenize(torch.from_numpy(codes).to(device), torch.from_numpy(mask).to(device)).cpu().numpy()
            counts = mask.sum(1)
            columns = {k: ak.unflatten(v[mask], counts) for k, v in physical_constituents(features, mask).items()}
            real = tokens_real(tokens, codebook_size)
            columns["tokens"] = ak.unflatten(tokens[real], real.sum(1))
            jets.append(ak.zip(columns, depth_limit=1))
            progress.advance(bar, len(tokens))
    out = Path(out) if out else Path(run_dir) / "generated" / f"jets-{n_jets}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    ak.to_parquet(ak.concatenate(jets), tmp)
    os.replace(tmp, out)
    return out


def tokens_real(tokens: np.ndarray, codebook_size: int) -> np.ndarray:
    """Mask of the real tokens of each sequence: start, codes and the stop token if one was drawn."""
    after_stop = np.cumsum(tokens == codebook_size + 1, axis=1) - (tokens == codebook_size + 1)
    return after_stop == 0
