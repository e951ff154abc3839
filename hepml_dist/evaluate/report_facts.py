"""What `hepml report` reads from a run directory (`Run`), its stored predictions, and the run's facts table.

Inputs, all written by the engine: RUN_DIR/spec.yaml, metrics.jsonl, metrics.json (`hepml evaluate`), the evaluated
checkpoint, params.json. Predictions are Collector payloads kept as RUN_DIR/predictions-<split>.npz.
"""

from __future__ import annotations

import hashlib
import html
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hepml_dist import files, runs
from hepml_dist.data.manifest import read_manifest
from hepml_dist.errors import UserError
from hepml_dist.track.records import read_metrics, training_records

PREDICTIONS = "predictions-{split}.npz"


def save_predictions(path: str | Path, payload: dict[str, Any], meta: dict[str, Any]) -> Path:
    """Write a Collector payload (`arrays[task][key]`, `count`, `loss_sum`) and `meta` to one .npz, atomically."""
    path = Path(path)
    flat = {f"{task}.{key}": np.asarray(value) for task, arrays in payload["arrays"].items() for key, value in arrays.items()}
    info = {**meta, "count": payload.get("count", {}), "loss_sum": payload.get("loss_sum", {})}
    with files.replacing(path) as tmp, tmp.open("wb") as f:
        np.savez_compressed(f, __meta__=np.array(json.dumps(info)), **flat)
    return path


def load_predictions(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(payload, meta) from `save_predictions`."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            info = json.loads(str(npz["__meta__"]))
            arrays: dict[str, dict[str, np.ndarray]] = {}
            for key in npz.files:
                if key != "__meta__":
                    task, name = key.split(".", 1)
                    arrays.setdefault(task, {})[name] = npz[key]
    except (OSError, ValueError, KeyError) as err:
        raise UserError(f"{path}: unreadable predictions ({err}); delete it and run `hepml report` again") from None
    payload = {"arrays": arrays, "count": info.pop("count", {}), "loss_sum": info.pop("loss_sum", {})}
    return payload, info



@dataclass
class Run:
    """What the report reads from a run directory."""

    path: Path
    spec: Any
    evaluation: dict[str, Any]
    records: list[dict[str, Any]]  # the training records of metrics.jsonl (those of `hepml evaluate` left out)
    params: dict[str, Any]
    state: dict[str, Any]
    checkpoint: Path
    split: str
    launched: float | None = None
    notes: list[str] = field(default_factory=list)


def load_run(run_dir: str | Path) -> Run:
    """Read a trained and evaluated run; clear errors for what is missing."""
    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"{path}: no such run directory (give the folder `hepml train` wrote, e.g. runs/<job name>)")
    spec_file = path / "spec.yaml"
    if not spec_file.is_file():
        raise UserError(f"{path}: no spec.yaml, so not a run directory written by `hepml train`")
    evaluation_file = path / "metrics.json"
    if not evaluation_file.is_file():
        raise UserError(f"{path}: no evaluation (metrics.json); run `hepml evaluate {path}` first, then `hepml report {path}`")
    spec = runs.read_run_spec(path)
    try:
        evaluation = json.loads(evaluation_file.read_text())
        checkpoint, split = Path(evaluation["checkpoint"]), str(evaluation["split"])
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise UserError(f"{evaluation_file}: unreadable ({err}); run `hepml evaluate {path}` again") from None
    # metrics.json names the checkpoint as `hepml evaluate` was given it (possibly relative to another directory):
    # the run's own checkpoints folder is the reliable place to look
    own = path / "checkpoints" / checkpoint.name
    if own.is_dir() or not checkpoint.is_dir():
        checkpoint = own
    state_file = checkpoint / "state.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    params_file = path / "params.json"
    params = json.loads(params_file.read_text()) if params_file.is_file() else {}
    return Run(path, spec, evaluation, training_records(read_metrics(path)), params, state, checkpoint, split,
               launched=spec_file.stat().st_mtime)




def spec_hash(spec) -> str:
    """sha256 of the resolved spec (canonical JSON), first 12 hex digits: equal hashes, equal jobs."""
    text = json.dumps(spec.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def dataset_facts(patterns) -> str:
    """'DIR (process, N events, seed S): train a, val b, test c jets' from the manifest of a split folder."""
    if not isinstance(patterns, str) or "*" in patterns or patterns.endswith(".tar"):
        return html.escape(str(patterns))
    root = Path(patterns).parent
    try:
        manifest = read_manifest(root)
    except Exception:  # noqa: BLE001 - facts are best effort; the data may live elsewhere now
        return html.escape(str(root))
    generator = (manifest.meta or {}).get("generator") or {}
    origin = f"{generator.get('process')}, {generator.get('events'):,} events, seed {generator.get('seed')}" \
        if generator else manifest.schema
    counts = ", ".join(f"{k} {v.examples:,}" for k, v in manifest.splits.items())
    return f"<code>{html.escape(str(root))}</code> ({html.escape(str(origin))}): {counts}"


def _duration(seconds: float | None) -> str:
    if seconds is None or not np.isfinite(seconds) or seconds < 0:
        return "n/a"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def run_facts(run: Run, parameters: int | None) -> list[tuple[str, str]]:
    spec, state, records = run.spec, run.state, run.records
    train_records = [r for r in records if "jets_per_s" in r]
    rates = [r["jets_per_s"] for r in train_records[1:] or train_records]  # the first window holds start-up
    workers = state.get("world_size", spec.parallel.num_workers)
    step = int(state.get("step", 0))
    global_batch = spec.data.batch_size * workers * spec.training.grad_accum
    times = [r["time"] for r in records if r.get("time")]
    finished = max(times + [state.get("time", 0)])
    wall = finished - run.launched if run.launched and finished else None
    if times and run.launched and run.launched > min(times):
        wall_note = " (since the last launch of this run directory; earlier launches not counted)"
    elif any("resumed_from" in r for r in records):
        wall_note = " (launch to last log, including Ray start-up and a restart from a checkpoint)"
    else:
        wall_note = " (launch to last log, including Ray start-up)"
    engine = f"{spec.parallel.strategy}" + (f" ZeRO-{spec.parallel.zero_stage}" if spec.parallel.strategy == "deepspeed" else "")
    engine += f", {spec.training.multitask}, {spec.training.precision}"
    info = run.params
    facts = [
        ("job", f"<b>{html.escape(spec.name)}</b>: {html.escape(spec.description or '')}"),
        ("spec hash", f"<code>{spec_hash(spec)}</code> (sha256 of the resolved spec)"),
        ("model", f"{spec.model.family}" + (f", {parameters:,} parameters" if parameters else "")),
        ("tasks", ", ".join(html.escape(t.name) for t in spec.tasks)),
        ("training data", dataset_facts(spec.data.train)),
        ("evaluated on", f"{run.split} split, {int(max(run.evaluation.get('examples', {}).values() or [0])):,} jets; "
                         f"checkpoint <code>{html.escape(run.checkpoint.name)}</code>"),
        ("workers", f"{workers} x {', '.join(spec.parallel.accelerators)} ({html.escape(engine)})"),
        ("steps", f"{step:,} optimizer steps x {global_batch:,} jets = {step * global_batch:,} jets seen "
                  f"({step * global_batch / max(_train_examples(spec), 1):.1f} epochs of the train split)"),
        ("wall time", _duration(wall) + wall_note),
        ("throughput", f"{np.median(rates):,.0f} jets/s training (median over log windows; excludes validation "
                       "and checkpoints)" if rates else "n/a"),
        ("software", html.escape(", ".join(f"{k} {info[k]}" for k in ("torch", "ray", "python") if k in info)
                                 + (f"; commit {info['git_commit'][:10]}" if info.get("git_commit") else ""))),
        ("host", html.escape(str(info.get("driver_host", "n/a")))),
    ]
    return facts


def _train_examples(spec) -> int:
    try:
        return read_manifest(Path(spec.data.train).parent).splits["train"].examples
    except Exception:  # noqa: BLE001
        return 0


def parameter_count(run: Run) -> int | None:
    try:
        state = torch.load(run.checkpoint / "model.pt", map_location="cpu", weights_only=True)
        return int(sum(v.numel() for v in state.values()))
    except Exception:  # noqa: BLE001 - a fact, not a requirement
        return None
