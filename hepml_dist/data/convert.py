"""Converters: ROOT TTrees (uproot) and parquet files (pyarrow/awkward) -> sharded datasets, from a schema.

A *schema* (YAML; shipped ones in hepml_dist/data/schemas/, or your own file) says which stored column comes
from which input branches, as safe expressions (hepml_dist.data.expressions):

    name: jetclass
    format: root                  # root | parquet
    tree: tree                    # ROOT only
    selection: jet_pt > 0         # optional: examples to keep
    jagged:                       # per-constituent groups, padded to max_length, with a count column
      - count: part_n
        max_length: 128
        sort_by: hypot(part_px, part_py)    # optional, descending
        columns: {part_px: part_px, part_pid: {expr: "pid_from_flags(...)", dtype: int32}}
    columns:                      # one value per example
      jet_pt: jet_pt
      label_jet_class: onehot_index(label_QCD, label_Hbb)

Column dtypes default to int64 for `label_*`, int32 for counts and float32 otherwise.
The input is cut into work units (entry ranges of ROOT trees, row-group ranges of parquet files) that worker
processes read in parallel; the main process feeds them, interleaved across files (so classes stored file by
file get mixed), in a fixed order into one DatasetWriter. The output therefore depends only on the inputs,
the schema and the options, and an interrupted conversion resumes from its last checkpoint.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import awkward as ak
import numpy as np
import pyarrow.parquet as pq
import uproot
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hepml_dist.data import expressions
from hepml_dist.data.manifest import Manifest
from hepml_dist.data.writer import DatasetWriter
from hepml_dist.errors import UserError

CHECKPOINT_EVERY_SHARDS = 4  # writer checkpoints (for resuming) after about this many new shards


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ColumnDef(_Model):
    """One stored column: an expression over the inputs, an optional dtype, and whether it may be absent."""

    expr: str
    dtype: str | None = None
    optional: bool = False


class JaggedGroup(_Model):
    """Per-constituent columns sharing one count column, padded to max_length."""

    count: str
    max_length: int = Field(ge=1)
    sort_by: str | None = None
    columns: dict[str, str | ColumnDef]


class Schema(_Model):
    """A declarative mapping from input files to stored columns."""

    name: str
    description: str = ""
    format: Literal["root", "parquet"]
    tree: str | None = None
    selection: str | None = None
    jagged: list[JaggedGroup] = Field(default_factory=list)
    columns: dict[str, str | ColumnDef] = Field(default_factory=dict)
    meta: dict[str, Any] = Field(default_factory=dict)

    def column_defs(self) -> Iterator[tuple[JaggedGroup | None, str, ColumnDef]]:
        for group in self.jagged:
            for name, spec in group.columns.items():
                yield group, name, spec if isinstance(spec, ColumnDef) else ColumnDef(expr=spec)
        for name, spec in self.columns.items():
            yield None, name, spec if isinstance(spec, ColumnDef) else ColumnDef(expr=spec)

    def inputs(self) -> set[str]:
        names = set()
        for expression in self._expressions():
            names |= expressions.inputs_of(expression)
        return names

    def _expressions(self) -> list[str]:
        out = [spec.expr for _, _, spec in self.column_defs()]
        out += [g.sort_by for g in self.jagged if g.sort_by]
        return out + ([self.selection] if self.selection else [])

    def check(self, source: str) -> None:
        for expression in self._expressions():
            expressions.parse(expression)
        names = [name for _, name, _ in self.column_defs()] + [g.count for g in self.jagged]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise UserError(f"{source}: column(s) {duplicates} defined more than once")
        if self.format == "root" and not self.tree:
            raise UserError(f"{source}: `tree` (the TTree name) is required for format: root")


def shipped_schemas() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("hepml_dist.data.schemas").iterdir()
                  if p.name.endswith(".yaml"))


def load_schema(name_or_path: str | os.PathLike) -> Schema:
    """A shipped schema by name (`jetclass`, `jetclass2`, `fcc-tau`, `clic-events`) or a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"--schema {path}: no such file")
        text, source = path.read_text(), str(path)
    else:
        shipped = resources.files("hepml_dist.data.schemas") / f"{name_or_path}.yaml"
        if not shipped.is_file():
            raise UserError(f"--schema {name_or_path}: neither a file nor a shipped schema "
                            f"({', '.join(shipped_schemas())})")
        text, source = shipped.read_text(), f"schema {name_or_path}"
    try:
        schema = Schema.model_validate(yaml.safe_load(text))
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise UserError(f"{source}: {problems}") from None
    except yaml.YAMLError as err:
        raise UserError(f"{source}: not valid YAML ({err})") from None
    schema.check(source)
    return schema


# ----------------------------------------------------------------------------------------------------------------------
# Work units


@dataclass(frozen=True)
class Task:
    """A slice of one input file: entries [start, stop) of a TTree, or row groups [start, stop) of parquet."""

    file: str
    start: int
    stop: int


def plan_tasks(files: Sequence[str], schema: Schema, step: int) -> list[Task]:
    """Work units of about `step` examples, interleaved across files (file 0 part 0, file 1 part 0, ...)."""
    per_file = [file_tasks(f, schema, step) for f in files]
    out = []
    for k in range(max((len(t) for t in per_file), default=0)):
        out += [tasks[k] for tasks in per_file if k < len(tasks)]
    return out


def file_tasks(file: str, schema: Schema, step: int) -> list[Task]:
    if not Path(file).is_file():
        raise UserError(f"{file}: input file not found")
    if schema.format == "root":
        entries = open_tree(file, schema).num_entries
        return [Task(file, a, min(a + step, entries)) for a in range(0, entries, step)]

    try:
        meta = pq.ParquetFile(file).metadata
    except Exception as err:  # noqa: BLE001 - pyarrow raises several types for unreadable files
        raise UserError(f"{file}: not a readable parquet file ({err})") from None
    tasks, start, rows = [], 0, 0
    for group in range(meta.num_row_groups):
        rows += meta.row_group(group).num_rows
        if rows >= step:
            tasks.append(Task(file, start, group + 1))
            start, rows = group + 1, 0
    if start < meta.num_row_groups:
        tasks.append(Task(file, start, meta.num_row_groups))
    return tasks


@lru_cache(maxsize=16)
def _open_root(file: str, size: int, mtime: float):  # size and mtime: a rewritten file is opened again

    try:
        return uproot.open(file)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{file}: not a readable ROOT file ({err})") from None


def open_tree(file: str, schema: Schema):
    stat = os.stat(file)
    handle = _open_root(file, stat.st_size, stat.st_mtime)
    if schema.tree not in handle:
        trees = [k.split(";")[0] for k, v in handle.classnames().items() if v == "TTree"]
        raise UserError(f"{file}: no tree {schema.tree!r} (trees: {trees}); set `tree` in the schema")
    return handle[schema.tree]


def _read_inputs(task: Task, schema: Schema, names: set[str]):
    if schema.format == "root":
        tree = open_tree(task.file, schema)
        present = set(tree.keys())
        columns = sorted(names & present)
        missing = names - present
        return tree.arrays(columns, entry_start=task.start, entry_stop=task.stop, library="ak"), missing

    parquet = pq.ParquetFile(task.file)
    present = set(parquet.schema_arrow.names)
    columns = sorted(names & present)
    table = parquet.read_row_groups(list(range(task.start, task.stop)), columns=columns)
    return ak.from_arrow(table), names - present


# ----------------------------------------------------------------------------------------------------------------------
# One work unit -> numpy columns


def _default_dtype(name: str, counts: set[str]) -> np.dtype:
    if name.startswith("label_"):
        return np.dtype(np.int64)
    if name in counts:
        return np.dtype(np.int32)
    return np.dtype(np.float32)


def pad_jagged(values, length: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Jagged [N, var, ...] -> zero-padded numpy [N, length, ...] and the clipped counts (vectorised)."""
    clipped = values[:, :length]
    counts = ak.to_numpy(ak.num(clipped, axis=1)).astype(np.int64)
    flat = ak.flatten(clipped, axis=1)
    while flat.ndim > 1 and not isinstance(flat.type.content, ak.types.RegularType):
        flat = ak.to_regular(flat, axis=1)
    flat = np.asarray(ak.to_numpy(flat), dtype=dtype)
    out = np.zeros((len(counts), length, *flat.shape[1:]), dtype=dtype)
    rows = np.repeat(np.arange(len(counts)), counts)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    cols = np.arange(len(flat)) - np.repeat(starts, counts)
    out[rows, cols] = flat
    return out, counts


def _as_numpy(value: Any, n: int, dtype: np.dtype, name: str, where: str) -> np.ndarray:
    if np.isscalar(value):
        return np.full(n, value, dtype=dtype)
    if isinstance(value, ak.Array):
        try:
            value = ak.to_numpy(value)
        except ValueError:
            raise UserError(f"{where}: column {name} has a variable length per example; put it in a `jagged` "
                            "group") from None
    array = np.asarray(value)
    if array.ndim == 0:
        return np.full(n, array, dtype=dtype)
    if array.dtype.kind == "f" and np.dtype(dtype).kind in "iu" and not np.isfinite(array).all():
        raise UserError(f"{where}: column {name} has NaN/inf but is stored as {dtype}")
    return array.astype(dtype)


def convert_task(task: Task, schema: Schema) -> dict[str, np.ndarray]:
    """Read one work unit and evaluate the schema on it."""
    where = f"{task.file} [{task.start}:{task.stop}]"
    arrays, missing = _read_inputs(task, schema, schema.inputs())
    required = set()
    for _, _, spec in schema.column_defs():
        if not spec.optional:
            required |= expressions.inputs_of(spec.expr)
    if lacking := sorted(missing & required):
        raise UserError(f"{task.file}: missing input branch/column(s) {lacking} required by schema "
                        f"{schema.name}; check the file or the schema")
    inputs = {name: arrays[name] for name in ak.fields(arrays)}
    if schema.selection:
        keep = np.asarray(ak.to_numpy(expressions.evaluate(schema.selection, inputs)), dtype=bool)
        inputs = {k: v[keep] for k, v in inputs.items()}
    n = len(next(iter(inputs.values()))) if inputs else 0
    counts = {g.count for g in schema.jagged}
    out: dict[str, np.ndarray] = {}
    order_by_group: dict[int, Any] = {}
    for group, name, spec in schema.column_defs():
        if spec.optional and expressions.inputs_of(spec.expr) & missing:
            continue
        dtype = np.dtype(spec.dtype) if spec.dtype else _default_dtype(name, counts)
        value = expressions.evaluate(spec.expr, inputs)
        if group is None:
            out[name] = _as_numpy(value, n, dtype, name, where)
            continue
        key = id(group)
        if group.sort_by and key not in order_by_group:
            order_by_group[key] = ak.argsort(expressions.evaluate(group.sort_by, inputs), axis=1, ascending=False)
        if key in order_by_group:
            value = value[order_by_group[key]]
        padded, lengths = pad_jagged(value, group.max_length, dtype)
        if group.count in out and not np.array_equal(out[group.count], lengths):
            raise UserError(f"{where}: column {name} has other lengths than the rest of its group "
                            f"({group.count}); all columns of a jagged group need one entry per constituent")
        out[group.count] = lengths.astype(np.int32)
        out[name] = padded
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The whole conversion


def _worker_init() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def convert(
    inputs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    schema: Schema,
    *,
    splits: Sequence[float] = (0.7, 0.1, 0.2),
    shard_size: int = 16384,
    chunk_size: int = 1024,
    seed: int = 0,
    step_size: int = 20000,
    workers: int = 0,
    overwrite: bool = False,
    on_progress: Callable[[int, int, int], None] | None = None,
) -> Manifest:
    """Convert input files into a dataset at `out_dir`; resumes an interrupted run with the same arguments.

    `workers` reader processes (0 = read in this process); `on_progress(done_units, total_units, examples)`
    is called after every work unit.
    """
    files = [str(Path(f).resolve()) for f in inputs]
    if not files:
        raise UserError("no input files given")
    if len(set(files)) != len(files):
        raise UserError("an input file is given twice")
    chunk_size = min(chunk_size, shard_size)
    tasks = plan_tasks(files, schema, step_size)
    meta = {
        "schema": schema.model_dump(mode="json", exclude_none=True),
        "inputs": [{"path": f, "bytes": Path(f).stat().st_size} for f in files],
        "step_size": step_size,
    }
    writer = DatasetWriter(out_dir, schema=schema.name, splits=splits, seed=seed, chunk_size=chunk_size,
                           chunks_per_shard=max(1, -(-shard_size // chunk_size)), source_files=files, meta=meta,
                           overwrite=overwrite, resume=True)
    done = int((writer.resumed_progress or {}).get("tasks_done", 0))
    shards_at_checkpoint = writer.shards_written
    examples = writer.examples_added
    for index, columns in enumerate(_results(tasks[done:], schema, workers), start=done):
        writer.add(columns)
        examples = writer.examples_added
        if writer.shards_written - shards_at_checkpoint >= CHECKPOINT_EVERY_SHARDS:
            writer.checkpoint({"tasks_done": index + 1})
            shards_at_checkpoint = writer.shards_written
        if on_progress:
            on_progress(index + 1, len(tasks), examples)
    if on_progress and done == len(tasks):
        on_progress(len(tasks), len(tasks), examples)
    return writer.close()


def _results(tasks: Sequence[Task], schema: Schema, workers: int) -> Iterator[dict[str, np.ndarray]]:
    """convert_task over `tasks`, in order, with at most 2 x workers units in flight (bounded memory)."""
    if workers <= 0:
        for task in tasks:
            yield convert_task(task, schema)
        return
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_worker_init) as pool:
        pending: deque[cf.Future] = deque()
        queue = iter(tasks)
        for task in queue:
            pending.append(pool.submit(convert_task, task, schema))
            if len(pending) >= 2 * workers:
                break
        while pending:
            result = pending.popleft().result()
            task = next(queue, None)
            if task is not None:
                pending.append(pool.submit(convert_task, task, schema))
            yield result
