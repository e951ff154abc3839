"""`hepml predict`: a trained model over shards or raw ROOT/parquet files -> one ROOT TTree or parquet file.

What physicists do after training (weaver's `--predict`): one output row per jet/event with the model's outputs,
named per task, next to columns copied from the input, ready for an analysis in ROOT, uproot or pandas.

    score_<task>_<class>     classification probabilities (softmax; binary bce: sigmoid, both classes written)
    <task>_<target>_pred     regression outputs, in the units the model was trained on
    label_* / target_*       the truth of the model's tasks, when the input has it
    observers                per-example columns named by --observers (jet_pt, jet_sdmass, event, ...)

Per-element tasks (MLPF) give one row per event with jagged columns and the counter `n_elements`.

The input is cut into *units* (one shard, or a range of entries / row groups of one raw file), each turned into
an output table on its own, in this process or on `workers` Ray actors (each loads the model once); the tables
are written in unit order, so rows come out in input order: stored order for shards, file then entry order for
raw files (after the schema's `selection`). Raw files go through a converter schema (`--schema`, default: the
schema the training dataset was converted with), so the model sees exactly the columns it was trained on.
The output is written to a temporary file next to the target and renamed when complete.
"""

from __future__ import annotations

import glob as globlib
import os
import re
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import torch

from hepml_dist import runs
from hepml_dist.data import features as feats
from hepml_dist.data.convert import ColumnDef, Schema, Task, convert_task, file_tasks, load_schema, open_tree
from hepml_dist.data.reader import iter_shard_chunks
from hepml_dist.data.shards import ShardResolver
from hepml_dist.errors import UserError
from hepml_dist.evaluate.loop import run_model
from hepml_dist.evaluate.metrics import class_probabilities
from hepml_dist.inference.writers import ELEMENTS, OutputWriter
from hepml_dist.spec import load_job

RAW_SUFFIXES = (".root", ".parquet", ".parq")


@dataclass(frozen=True)
class Unit:
    """One independent piece of input: a whole shard, or entries/row groups [start, stop) of one raw file."""

    source: str
    start: int = 0
    stop: int = 0
    chunks: int = 0  # shards: chunks the manifest lists (a completeness check)
    bytes: int | None = None  # shards: the manifest's size and chunk-key prefix (a truncated or swapped file)
    key: str | None = None


@dataclass
class Plan:
    """Everything a predictor needs besides the model: picklable, sent once to every Ray actor."""

    checkpoint: str
    kind: str  # "shards" | "raw"
    units: list[Unit]
    columns: list[str]  # stored columns to read
    shapes: dict[str, list[int]]  # shards: per-example shapes (narrower chunks are zero-padded to these)
    observers: list[str]
    truth: list[str]
    batch_size: int
    schema: dict[str, Any] | None = None  # raw: the converter schema, observers added as columns
    device: str = "cpu"
    threads: int = 1
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# Output names


def safe_name(text: str) -> str:
    """Class and target names as column-name fragments ROOT and pandas accept."""
    return re.sub(r"[^A-Za-z0-9_]", "_", str(text))


def output_names(spec) -> dict[str, list[str]]:
    """Task name -> its output column names, in output order."""
    names = {}
    for task in spec.tasks:
        if task.kind == "regression":
            names[task.name] = [f"{task.name}_{safe_name(t)}_pred" for t in task.targets or []]
        else:
            classes = task.classes or [str(i) for i in range(task.output_dim if task.kind != "binary" else 2)]
            names[task.name] = [f"score_{task.name}_{safe_name(c)}" for c in classes]
    return names


def output_columns(spec, outputs: dict, mask) -> dict[str, Any]:
    """Model outputs of one batch -> numpy columns (per-example) or lists of per-element arrays (per-element)."""
    names = output_names(spec)
    out: dict[str, Any] = {}
    real = mask[:, 0].bool().cpu() if mask is not None else None
    for task in spec.tasks:
        value = outputs[task.name].detach().float()
        per_element = value.ndim == 3
        if per_element and real is not None and value.shape[1] != real.shape[1]:
            value = value.transpose(1, 2)  # channel-first [B, K, P] -> [B, P, K]
        if task.kind != "regression":
            value = class_probabilities(task, value.reshape(-1, value.shape[-1])).reshape(*value.shape[:-1], -1)
        value = value.cpu()
        if per_element:
            counts = real.sum(1).tolist()
            rows = value[real]  # [sum of counts, K], event after event
            for k, name in enumerate(names[task.name]):
                out[name] = [t.numpy() for t in torch.split(rows[:, k], counts)]
            out[ELEMENTS] = np.asarray(counts, dtype=np.int32)
        else:
            for k, name in enumerate(names[task.name]):
                out[name] = value[:, k].numpy()
    return out


# ----------------------------------------------------------------------------------------------------------------
# Planning: which units, which columns


def checkpoint_spec(checkpoint: str | Path):
    folder = runs.resolve_checkpoint(checkpoint)
    return folder, load_job(folder / "spec.yaml")


def expand_patterns(patterns: Sequence[str]) -> list[str]:
    """Raw input files: each pattern's matches sorted, patterns in the order given, no duplicates."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(globlib.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        if not matches:
            raise UserError(f"--data {pattern}: matches no file")
        for path in matches:
            if not Path(path).is_file():
                raise UserError(f"--data {path}: no such file")
            path = str(Path(path).resolve())  # Ray actors run in other directories
            if path in files:
                raise UserError(f"--data: {path} is given twice")
            files.append(path)
    return files


def is_raw(patterns: Sequence[str], schema: str | None) -> bool:
    return schema is not None or any(p.lower().endswith(RAW_SUFFIXES) for p in patterns)


def training_schema(spec) -> dict[str, Any] | None:
    """The converter schema the training dataset was written with (recorded in its manifest), if known."""
    patterns = spec.data.train or [p for g in getattr(spec.data, "groups", None) or [] for p in _listed(g.train)]
    try:
        resolver = ShardResolver()
        resolver.resolve(patterns)
    except UserError:
        return None
    return resolver.manifests[0].meta.get("schema") if resolver.manifests else None


def _listed(value) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def plan_shards(spec, patterns: Sequence[str], observers: list[str]) -> tuple[list[Unit], list[str], dict, list[str]]:
    resolver = ShardResolver()
    refs = resolver.resolve([p if "://" in p or p.startswith("pipe:") else str(Path(p).resolve()) for p in patterns])
    shapes: dict[str, list[int]] = {}
    available: set[str] | None = None
    for manifest in resolver.manifests:
        for name, column in manifest.columns.items():
            old = shapes.get(name)
            shapes[name] = list(column.shape) if old is None else [max(a, b) for a, b in zip(old, column.shape)]
        available = set(manifest.columns) if available is None else available & set(manifest.columns)
    available = available or set()
    missing = [o for o in observers if o not in available]
    if missing:
        raise UserError(f"--observers {','.join(missing)}: not stored in these shards (they have "
                        f"{', '.join(sorted(available))})")
    for name in observers:
        if len(shapes.get(name, [])) > 0:
            raise UserError(f"--observers {name}: has {shapes[name]} values per example; observers are "
                            "per-example columns (jet_pt, event_ht, ...)")
    truth = truth_columns(spec, available)
    builder = feats.get_builder(spec.data.inputs.features)
    columns = feats.stored_columns(builder, sorted(available), [*observers, *truth, *spec.data.inputs.event_features])
    units = [Unit(ref.source, chunks=len(ref.info.chunks), bytes=ref.info.bytes, key=ref.info.key) for ref in refs]
    return units, columns, shapes, truth


def truth_columns(spec, available) -> list[str]:
    """The labels and targets of the model's tasks that the input holds or the feature builder derives from it
    (MLPF's log pT and energy ratios), written next to the outputs."""
    available = {*available, *feats.get_builder(spec.data.inputs.features).derived}
    wanted: list[str] = []
    for task in spec.tasks:
        keys = [f"target_{t}" for t in task.targets or []] if task.kind == "regression" else [task.label_key]
        if task.only_where:
            keys.append(task.only_where)
        wanted += [k for k in keys if k in available and k not in wanted]
    return wanted


def plan_raw(spec, files: Sequence[str], schema_name: str | None, observers: list[str],
             step_size: int) -> tuple[list[Unit], list[str], dict, list[str]]:
    if schema_name is not None:
        schema = load_schema(schema_name)
    else:
        recorded = training_schema(spec)
        if recorded is None:
            raise UserError("--data names raw files but the training dataset records no converter schema; "
                            "give --schema (a shipped name such as jetclass, or a schema YAML)")
        schema = Schema.model_validate(recorded)
    produced = {name for _, name, _ in schema.column_defs()} | {g.count for g in schema.jagged}
    extra: dict[str, ColumnDef] = {}
    for name in observers:
        if name not in produced:  # an input branch (or expression) the schema does not store: read it as it is
            extra[name] = ColumnDef(expr=name, dtype=input_dtype(files[0], schema, name))
    if extra:
        schema = schema.model_copy(update={"columns": {**schema.columns, **extra}})
        schema.check("--observers")
    available = produced | set(extra)
    truth = truth_columns(spec, available)
    builder = feats.get_builder(spec.data.inputs.features)
    columns = feats.stored_columns(builder, sorted(available), [*observers, *truth, *spec.data.inputs.event_features])
    units = [Unit(t.file, t.start, t.stop) for f in files for t in file_tasks(f, schema, step_size)]
    return units, columns, {"schema": schema.model_dump(mode="json")}, truth


def input_dtype(file: str, schema, name: str) -> str:
    """The numpy dtype of an input branch/column (event numbers stay int64); float64 for an expression."""
    try:
        if schema.format == "root":
            tree = open_tree(str(Path(file).resolve()) if Path(file).exists() else file, schema)
            if name in tree.keys():  # one entry read: works for TTrees and RNTuples alike
                return np.asarray(tree.arrays([name], entry_stop=1, library="np")[name]).dtype.newbyteorder("=").name
        else:
            arrow = pq.ParquetFile(file).schema_arrow
            if name in arrow.names:
                return np.dtype(arrow.field(name).type.to_pandas_dtype()).name
    except (AttributeError, TypeError, NotImplementedError):
        pass
    return "float64"


def make_plan(checkpoint, patterns: Sequence[str], *, schema: str | None = None, observers: Sequence[str] = (),
              batch_size: int | None = None, step_size: int = 20000, device: str = "cpu", threads: int = 1) -> Plan:
    folder, spec = checkpoint_spec(checkpoint)
    observers = [o for o in observers if o]
    if len(set(observers)) != len(observers):
        raise UserError("--observers: a column is listed twice")
    reserved = {n for names in output_names(spec).values() for n in names} | {ELEMENTS}
    if clash := sorted(set(observers) & reserved):
        raise UserError(f"--observers {','.join(clash)}: same name as a model output column")
    if is_raw(patterns, schema):
        units, columns, extra, truth = plan_raw(spec, expand_patterns(patterns), schema, observers, step_size)
        kind, shapes, schema_dump = "raw", {}, extra["schema"]
    else:
        units, columns, shapes, truth = plan_shards(spec, patterns, observers)
        kind, schema_dump = "shards", None
    if not units:
        raise UserError(f"--data {' '.join(patterns)}: no input")
    return Plan(str(Path(folder).resolve()), kind, units, columns, shapes, list(observers), truth,
                batch_size or spec.data.batch_size, schema_dump, device, threads)


# ----------------------------------------------------------------------------------------------------------------
# One unit -> one output table


class Predictor:
    """Loads the model once; turns units into output tables (the same code in-process and in Ray actors)."""

    def __init__(self, plan: Plan):
        torch.set_num_threads(max(1, plan.threads))
        self.plan = plan
        self.spec, model = runs.load_trained(plan.checkpoint)
        self.device = torch.device(plan.device if plan.device != "cuda" or torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.builder = feats.get_builder(self.spec.data.inputs.features)
        self.schema = Schema.model_validate(plan.schema) if plan.schema is not None else None

    def blocks(self, unit: Unit) -> Iterator[dict[str, np.ndarray]]:
        """The stored columns of a unit, in input order."""
        if self.schema is not None:
            columns = convert_task(Task(unit.source, unit.start, unit.stop), self.schema)
            yield {k: columns[k] for k in self.plan.columns}
            return
        got = dict(iter_shard_chunks(unit.source, columns=self.plan.columns, shapes=self.plan.shapes,
                                     expected_chunks=unit.chunks, expected_bytes=unit.bytes, shard_key=unit.key))
        for index in sorted(got):
            yield got[index]

    def run(self, unit: Unit) -> dict[str, Any]:
        inputs = self.spec.data.inputs
        precision = self.spec.training.precision if self.device.type == "cuda" else "fp32"
        pending: deque[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = deque()  # (raw, built) per batch

        def batches() -> Iterator[dict[str, torch.Tensor]]:
            for block in self.blocks(unit):
                n = len(next(iter(block.values())))
                for start in range(0, n, self.plan.batch_size):
                    raw = {k: v[start:start + self.plan.batch_size] for k, v in block.items()}
                    built = feats.build_batch(raw, self.builder, max_length=inputs.max_length,
                                              pad_to_multiple=inputs.pad_to_multiple,
                                              event_features=inputs.event_features)
                    pending.append((raw, built))
                    yield feats.to_torch(built)

        parts: list[dict[str, Any]] = []
        for batch, outputs in run_model(self.model, batches(), device=self.device, precision=precision):
            raw, built = pending.popleft()
            part = output_columns(self.spec, outputs, batch.get("mask"))
            part.update(truth_of(self.plan.truth, raw, built, batch.get("mask"), per_element=ELEMENTS in part))
            part.update({k: np.asarray(raw[k]) for k in self.plan.observers})
            parts.append(part)
        return concatenate(parts)


def truth_of(names: Sequence[str], raw: dict[str, np.ndarray], built: dict[str, np.ndarray], mask,
             per_element: bool) -> dict[str, Any]:
    """Truth columns of one batch, as the loader gives them to the loss (derived targets included); per-element
    ones (MLPF) are cut to the real elements, as the outputs are."""
    out: dict[str, Any] = {}
    real = mask[:, 0].bool().cpu().numpy() if mask is not None else None
    for name in names:
        value = built[name] if name in built else raw[name]
        if per_element and value.ndim >= 2 and real is not None:
            value = value[:, :real.shape[1]]
            out[name] = [row[keep] for row, keep in zip(value, real)]
        else:
            out[name] = np.asarray(value)
    return out


def concatenate(parts: list[dict[str, Any]]) -> dict[str, Any]:
    if not parts:
        return {}
    out = {}
    for key, first in parts[0].items():
        values = [p[key] for p in parts]
        out[key] = [x for v in values for x in v] if isinstance(first, list) else np.concatenate(values)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Running a plan: in this process, or on Ray actors


def run_local(plan: Plan) -> Iterator[dict[str, Any]]:
    predictor = Predictor(plan)
    for unit in plan.units:
        yield predictor.run(unit)


def run_ray(plan: Plan, workers: int, gpus_per_worker: float = 0.0, address: str | None = None) -> Iterator[dict]:
    """Units over `workers` Ray actors, results in unit order (at most 2 units in flight per actor)."""
    started = False
    if not ray.is_initialized():
        if address:
            ray.init(address=address, logging_level="WARNING")
        else:
            ray.init(num_cpus=max(workers * plan.threads, 1), include_dashboard=False, _node_ip_address="127.0.0.1",
                     logging_level="WARNING", log_to_driver=True)
            started = True
    try:
        actor = ray.remote(num_cpus=plan.threads, num_gpus=gpus_per_worker)(Predictor)
        env = {"OMP_NUM_THREADS": str(plan.threads)}
        actors = [actor.options(runtime_env={"env_vars": env}).remote(plan) for _ in range(workers)]
        pending: deque = deque()
        for index, unit in enumerate(plan.units):
            pending.append(actors[index % workers].run.remote(unit))
            if len(pending) >= 2 * workers:
                yield _ray_get(pending.popleft())
        while pending:
            yield _ray_get(pending.popleft())
        for a in actors:
            ray.kill(a)
    finally:
        if started:
            ray.shutdown()


def _ray_get(ref):
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        raise


def predict(checkpoint, patterns: Sequence[str], out: Path, *, schema: str | None = None,
            observers: Sequence[str] = (), workers: int = 0, batch_size: int | None = None, step_size: int = 20000,
            tree: str = "Events", rntuple: bool = False, device: str = "cpu", gpus_per_worker: float = 0.0,
            address: str | None = None, on_unit: Callable[[int, int, int], None] | None = None) -> dict[str, Any]:
    """Run the model of `checkpoint` (run dir or checkpoint folder) over `patterns`, write `out`; returns a summary."""
    plan = make_plan(checkpoint, patterns, schema=schema, observers=observers, batch_size=batch_size,
                     step_size=step_size, device=device, threads=1 if workers else (os.cpu_count() or 1))
    writer = OutputWriter(Path(out), tree=tree, rntuple=rntuple)
    tables = run_ray(plan, workers, gpus_per_worker, address) if workers > 0 else run_local(plan)
    try:
        for done, table in enumerate(tables, start=1):
            writer.write(table)
            if on_unit:
                on_unit(done, len(plan.units), writer.rows)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    return {"out": str(out), "rows": writer.rows, "units": len(plan.units), "checkpoint": plan.checkpoint,
            "kind": plan.kind, "observers": plan.observers, "truth": plan.truth}
