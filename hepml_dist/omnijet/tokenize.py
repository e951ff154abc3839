"""`hepml data tokenize`: turn a jet dataset into token shards with a trained OmniJet-alpha tokenizer.

Reads the shard layout of docs/architecture.md (split folders of webdataset tars, each tar sample a chunk of jets,
one `.npy` member per column) and writes the same layout: per chunk `tokens` int32 [N, L] and `tokens_n` int32 [N],
plus every per-jet column of the source (labels, targets, jet kinematics, weights). Per-constituent columns are
dropped. Each output shard is written to a temporary name and renamed, so an interrupted run leaves only complete
shards, and shards already present are skipped (re-running resumes). The output folder gets `manifest.json`
recording the tokenizer checkpoint, which `hepml generate` uses to decode generated tokens.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from hepml_dist.errors import UserError
from hepml_dist.omnijet.preprocess import codes_to_tokens, constituent_features

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
REQUIRED = ("part_px", "part_py", "part_pz", "part_energy", "part_n")


def source_splits(source: Path) -> dict[str, list[Path]]:
    """{split name: tar files} of a dataset folder (train/val/test) or of one split folder."""
    if not source.exists():
        raise UserError(f"--data {source}: no such dataset folder")
    splits = {name: sorted((source / name).glob("*.tar")) for name in SPLITS if (source / name).is_dir()}
    if not splits and sorted(source.glob("*.tar")):
        splits = {source.name: sorted(source.glob("*.tar"))}
    if not any(splits.values()):
        raise UserError(f"--data {source}: no shards (*.tar) in {source} or in its train/, val/, test/ folders")
    return splits


def read_chunks(shard: Path):
    """The chunks of one shard as {column: array}."""
    import webdataset as wds

    try:
        for sample in wds.WebDataset(str(shard), shardshuffle=False).decode():
            yield {key[: -len(".npy")]: value for key, value in sample.items() if key.endswith(".npy")}
    except Exception as err:  # a truncated tar or a corrupt member: name the shard
        raise UserError(f"{shard}: cannot read this shard ({err}); check it with `hepml data verify`") from err


def tokenize_chunk(model, columns: dict[str, np.ndarray], length: int, batch_size: int, device: str) -> dict[str, np.ndarray]:
    """Token columns of one chunk of jets, plus its per-jet columns."""
    import torch

    missing = [c for c in REQUIRED if c not in columns]
    if missing:
        raise UserError(f"the jet dataset lacks the columns {missing}; tokenize needs {list(REQUIRED)}")
    features, mask = constituent_features(columns, length - 2)
    codes = np.zeros(mask.shape, dtype=np.int64)
    for start in range(0, len(features), batch_size):
        part = slice(start, start + batch_size)
        with torch.no_grad():
            codes[part] = model.tokenize(torch.from_numpy(features[part]).to(device), torch.from_numpy(mask[part]).to(device)).cpu().numpy()
    tokens, tokens_n = codes_to_tokens(codes, mask, model.quantizer.codebook.shape[0], length)
    passed = {k: v for k, v in columns.items() if v.ndim == 1 and not k.startswith("part_")}
    return {"tokens": tokens, "tokens_n": tokens_n, **passed}


def _write_shard(path: Path, chunks: list[dict[str, np.ndarray]]) -> str:
    import webdataset as wds

    tmp = path.with_name(f".{path.name}.tmp")
    with wds.TarWriter(str(tmp)) as writer:
        for i, chunk in enumerate(chunks):
            writer.write({"__key__": f"chunk-{i:06d}", **{f"{k}.npy": v for k, v in chunk.items()}})
    digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
    os.replace(tmp, path)
    return digest


def tokenize_dataset(run_dir: Path, source: Path, out: Path, length: int | None = None, batch_size: int = 2048, device: str = "cpu") -> dict:
    """Tokenize every split of `source` into `out` with the tokenizer of `run_dir`; returns the manifest."""
    from rich.progress import Progress

    from hepml_dist.train.checkpoint import load_trained, resolve_checkpoint

    checkpoint = resolve_checkpoint(run_dir)
    spec, model = load_trained(checkpoint)
    if spec.model.family != "omnijet" or spec.model.stage != "tokenizer":
        raise UserError(f"{run_dir}: not an OmniJet tokenizer run (model.family={spec.model.family}, stage={getattr(spec.model, 'stage', None)})")
    model.to(device).eval()
    length = length or spec.data.inputs.max_length
    if length < 3:
        raise UserError(f"--max-length {length}: a token sequence needs room for start, one constituent and stop")
    splits = source_splits(source)
    manifest = {
        "kind": "omnijet-tokens",
        "created_by": "hepml data tokenize",
        "source": str(source.resolve()),
        "tokenizer": {"checkpoint": str(checkpoint.resolve()), "codebook_size": spec.model.tokenizer.codebook_size},
        "vocab_size": spec.model.tokenizer.codebook_size + 2,
        "max_length": length,
        "splits": {},
    }
    with Progress() as progress:
        bar = progress.add_task("tokenizing shards", total=sum(len(s) for s in splits.values()))
        for split, shards in splits.items():
            (out / split).mkdir(parents=True, exist_ok=True)
            entries = []
            for shard in shards:
                target = out / split / shard.name
                if target.exists():  # written by an earlier, interrupted run
                    chunks = list(read_chunks(target))
                    digest = hashlib.sha256(target.read_bytes()).hexdigest()
                else:
                    chunks = [tokenize_chunk(model, c, length, batch_size, device) for c in read_chunks(shard)]
                    digest = _write_shard(target, chunks)
                entries.append({"name": shard.name, "examples": int(sum(len(c["tokens"]) for c in chunks)), "sha256": digest})
                if chunks:
                    manifest["columns"] = {k: {"dtype": str(v.dtype), "shape": list(v.shape[1:])} for k, v in chunks[0].items()}
                progress.advance(bar)
            manifest["splits"][split] = {"examples": sum(e["examples"] for e in entries), "shards": entries}
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)
    return manifest
