"""`hepml data tokenize`: turn a jet dataset into token shards with a trained OmniJet-alpha tokenizer.

Input and output are datasets in the shard format of docs/data-format.md. Every source shard becomes one output
shard with the same split, path and chunking, holding per chunk `tokens` int32 [N, L] (start 0, code c -> c + 1,
stop K + 1, padding 0) and `tokens_n` int32 [N], plus every per-jet column of the source (labels, targets, jet
kinematics, weights); per-constituent columns are dropped. Shards are written under a temporary name and renamed,
so an interrupted run leaves only complete shards, and a re-run keeps those (it resumes). The manifest's `meta`
records the tokenizer checkpoint, which `hepml sample` uses to decode generated tokens.

`--where EXPR` keeps only the jets where a safe expression of per-jet columns holds (hepml_dist.data.expressions,
e.g. `label_is_tau == 1` for the tau-only token set); a source shard with no such jet writes no shard. The
expression is recorded in the manifest's `meta.where`, and a re-run into the same folder must give the same one.
"""

import os
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from rich.progress import Progress

from hepml_dist.data.expressions import evaluate, inputs_of
from hepml_dist.data.manifest import (
    MANIFEST_NAME,
    ColumnInfo,
    Manifest,
    ShardInfo,
    SplitInfo,
    file_sha256,
    read_manifest,
)
from hepml_dist.data.reader import iter_shard_chunks
from hepml_dist.errors import UserError
from hepml_dist.files import write_json
from hepml_dist.omnijet.preprocess import codes_to_tokens, constituent_features
from hepml_dist.runs import load_trained, resolve_checkpoint

SCHEMA = "omnijet-tokens"
CONSTITUENTS = ("part_px", "part_py", "part_pz", "part_energy", "part_n")


def open_source(source: Path) -> tuple[Manifest, list[str]]:
    """The source manifest and the splits to tokenize: all of a dataset folder, or the one split folder given."""
    if not (source / MANIFEST_NAME).is_file() and (source.parent / MANIFEST_NAME).is_file():
        manifest = read_manifest(source.parent)
        if source.name not in manifest.splits:
            raise UserError(f"--data {source}: {source.parent}/{MANIFEST_NAME} has no split {source.name!r}")
        return manifest, [source.name]
    manifest = read_manifest(source)
    return manifest, [name for name, split in manifest.splits.items() if split.shards]


def require_stage(spec, stage: str, path: Path) -> None:
    """A clear error when a run directory holds another model than the command needs."""
    if spec.model.family != "omnijet" or spec.model.stage != stage:
        found = f"model.family={spec.model.family}, stage={getattr(spec.model, 'stage', None)}"
        raise UserError(f"{path}: not an OmniJet {stage} run ({found})")


def tokenize_chunk(model, columns: dict[str, np.ndarray], length: int, batch_size: int, device: str) -> dict[str, np.ndarray]:
    """Token columns of one chunk of jets, plus its per-jet columns."""
    features, mask = constituent_features(columns, length - 2)
    codes = np.zeros(mask.shape, dtype=np.int64)
    for start in range(0, len(features), batch_size):
        part = slice(start, start + batch_size)
        with torch.no_grad():
            jets, real = torch.from_numpy(features[part]).to(device), torch.from_numpy(mask[part]).to(device)
            codes[part] = model.tokenize(jets, real).cpu().numpy()
    tokens, tokens_n = codes_to_tokens(codes, mask, model.quantizer.codebook.shape[0], length)
    per_jet = {k: v for k, v in columns.items() if v.ndim == 1 and not k.startswith("part_")}
    return {"tokens": tokens, "tokens_n": tokens_n, **per_jet}


def _write_shard(path: Path, split: str, index: int, chunks: list[dict[str, np.ndarray]]) -> None:
    """One tar of chunks with the member names of the shard format (`<split>_<shard>_<chunk>.<column>.npy`)."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with wds.TarWriter(str(tmp), mtime=0, user="hepml", group="hepml", mode=0o444) as writer:
        for c, chunk in enumerate(chunks):
            members = {f"{k}.npy": np.ascontiguousarray(v) for k, v in chunk.items()}
            writer.write({"__key__": f"{split}_{index:06d}_{c:04d}", **members})
    os.replace(tmp, path)


def _count_classes(counts: dict[str, dict[str, int]], chunk: dict[str, np.ndarray]) -> None:
    for name, values in chunk.items():
        if name.startswith("label_"):
            merged = counts.setdefault(name, {})
            for label, n in zip(*np.unique(values, return_counts=True)):
                merged[str(label)] = merged.get(str(label), 0) + int(n)


def check_where(where: str | None, per_jet: list[str], out: Path) -> None:
    """The selection reads only per-jet columns of the source, and agrees with the one of shards already in `out`."""
    if where is None:
        return
    unknown = sorted(inputs_of(where) - set(per_jet))
    if unknown:
        raise UserError(f"--where {where!r}: no per-jet column {', '.join(unknown)} in the dataset; per-jet columns: "
                        f"{', '.join(per_jet)}")
    if (out / MANIFEST_NAME).is_file():
        earlier = read_manifest(out).meta.get("where")
        if earlier != where:
            raise UserError(f"--out {out}: holds tokens selected with --where {earlier!r}; choose another --out")


def select(columns: dict[str, np.ndarray], where: str | None) -> dict[str, np.ndarray]:
    """The jets of a chunk where `where` holds (all without one)."""
    if where is None:
        return columns
    n = len(columns["part_n"])
    keep = np.broadcast_to(np.asarray(evaluate(where, columns)).astype(bool), (n,))
    return {k: v[keep] for k, v in columns.items()}


def tokenize_dataset(
    run_dir: Path, source: Path, out: Path, length: int | None = None, batch_size: int = 2048, device: str = "cpu",
    where: str | None = None,
) -> Manifest:
    """Tokenize the splits of `source` into `out` with the tokenizer of `run_dir` (only the jets where `where` holds);
    returns the written manifest."""
    checkpoint = resolve_checkpoint(run_dir)
    spec, model = load_trained(checkpoint)
    require_stage(spec, "tokenizer", run_dir)
    model.to(device).eval()
    length = length or spec.data.inputs.max_length
    if length < 3:
        raise UserError(f"--max-length {length}: a token sequence needs room for start, one constituent and stop")
    src, split_names = open_source(Path(source))
    missing = [c for c in CONSTITUENTS if c not in src.columns]
    if missing:
        raise UserError(f"--data {source}: the dataset lacks the columns {missing}; tokenize needs {list(CONSTITUENTS)}")
    per_jet = [c for c, info in src.columns.items() if not info.shape and not c.startswith("part_")]
    wanted = [*CONSTITUENTS, *per_jet]
    check_where(where, per_jet, Path(out))
    shapes = {c: info.shape for c, info in src.columns.items()}
    splits, columns = {}, {}
    with Progress() as progress:
        bar = progress.add_task("tokenizing shards", total=sum(len(src.splits[s].shards) for s in split_names))
        for split in split_names:
            (out / split).mkdir(parents=True, exist_ok=True)
            info = splits[split] = SplitInfo()
            for index, shard in enumerate(src.splits[split].shards):
                target = out / shard.path
                if not target.exists():  # shards of an interrupted earlier run are complete (atomic rename)
                    jets = iter_shard_chunks(src.root / shard.path, columns=wanted, shapes=shapes, expected_chunks=len(shard.chunks))
                    kept = [c for c in (select(c, where) for _, c in jets) if len(c["part_n"])]
                    if not kept:  # no selected jet in this shard
                        progress.advance(bar)
                        continue
                    _write_shard(target, split, index, [tokenize_chunk(model, c, length, batch_size, device) for c in kept])
                chunks = [chunk for _, chunk in iter_shard_chunks(target)]
                for chunk in chunks:
                    _count_classes(info.class_counts, chunk)
                    columns.update({k: ColumnInfo(str(v.dtype), list(v.shape[1:])) for k, v in chunk.items()})
                sizes = [len(c["tokens"]) for c in chunks]
                info.shards.append(ShardInfo(shard.path, sizes, file_sha256(target), target.stat().st_size))
                progress.advance(bar)
    manifest = Manifest(
        schema=SCHEMA,
        columns=columns,
        splits=splits,
        split_fractions=src.split_fractions,
        seed=src.seed,
        chunk_size=src.chunk_size,
        chunks_per_shard=src.chunks_per_shard,
        source_files=[str(Path(source).resolve())],
        meta={
            "tokenizer": {"checkpoint": str(checkpoint.resolve()), "codebook_size": spec.model.tokenizer.codebook_size},
            "vocab_size": spec.model.tokenizer.codebook_size + 2,
            "max_length": length,
            "source_schema": src.schema,
            "where": where,
        },
        root=out,
    )
    write_json(out / MANIFEST_NAME, manifest.to_dict())
    return manifest
