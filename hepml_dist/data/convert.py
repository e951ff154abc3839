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
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import awkward as ak
import numpy as np
import pyarrow.parquet as pq
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hepml_dist.data import expressions, sources
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
                yield group, name, _as_def(spec)
        for name, spec in self.columns.items():
            yield None, name, _as_def(spec)

    def inputs(self) -> set[str]:
        names = set()
        for _, expression in self.located_expressions():
            names |= expressions.inputs_of(expression)
        return names

    def located_expressions(self) -> list[tuple[str, str]]:
        """(where in the schema, expression) of every expression: `columns.jet_pt`, `jagged[0].sort_by`, ..."""
        out = [(f"jagged[{i}].columns.{name}", _as_def(spec).expr)
               for i, group in enumerate(self.jagged) for name, spec in group.columns.items()]
        out += [(f"columns.{name}", _as_def(spec).expr) for name, spec in self.columns.items()]
        out += [(f"jagged[{i}].sort_by", g.sort_by) for i, g in enumerate(self.jagged) if g.sort_by]
        return out + ([("selection", self.selection)] if self.selection else [])

    def check(self, source: str) -> None:
        """UserError naming `source` and the schema field of the first forbidden expression or bad dtype."""
        for where, expression in self.located_expressions():
            try:
                expressions.parse(expression)
            except UserError as err:
                raise UserError(f"{source}: {where}: {err}") from None
        for group, name, spec in self.column_defs():
            if spec.dtype is not None and not _numeric_dtype(spec.dtype):
                where = f"jagged[{self.jagged.index(group)}].columns" if group else "columns"
                raise UserError(f"{source}: {where}.{name}: dtype {spec.dtype!r} is not a numeric numpy dtype; use "
                                "float32, float64, int32, int64 or bool")
        names = [name for _, name, _ in self.column_defs()] + [g.count for g in self.jagged]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise UserError(f"{source}: column(s) {duplicates} defined more than once")
        if self.format == "root" and not self.tree:
            raise UserError(f"{source}: `tree` (the TTree name) is required for format: root")


def _as_def(spec: str | ColumnDef) -> ColumnDef:
    return spec if isinstance(spec, ColumnDef) else ColumnDef(expr=spec)


def _numeric_dtype(name: str) -> bool:
    try:
        return np.dtype(name).kind in "biuf"
    except (TypeError, ValueError):
        return False


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
    sources.check_format(file, schema.format, schema.name)
    if schema.format == "root":
        tree = open_tree(file, schema)
        with sources.readable(file, "ROOT"):
            entries = tree.num_entries
        return [Task(file, a, min(a + step, entries)) for a in range(0, entries, step)]

    with sources.readable(file, "parquet"):
        meta = pq.ParquetFile(file).metadata
    tasks, start, rows = [], 0, 0
    for group in range(meta.num_row_groups):
        rows += meta.row_group(group).num_rows
        if rows >= step:
            tasks.append(Task(file, start, group + 1))
            start, rows = group + 1, 0
    if start < meta.num_row_groups:
        tasks.append(Task(file, start, meta.num_row_groups))
    return tasks


def open_tree(file: str, schema: Schema):
    """The schema's TTree in a ROOT file."""
    return sources.open_tree(file, schema.tree)


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
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(counts) - counts, counts)
    out[rows, cols] = flat
    return out, counts


def _as_numpy(value: Any, n: int, dtype: np.dtype, name: str, where: str) -> np.ndarray:
    if isinstance(value, ak.Array):
        try:
            value = ak.to_numpy(value)
        except ValueError:
            raise UserError(f"{where}: column {name} has a variable length per example; put it in a `jagged` "
                            "group") from None
    try:
        array = np.asarray(value)
        with np.errstate(over="ignore"):  # values beyond the dtype's range are reported by convert_task
            return np.full(n, array, dtype=dtype) if array.ndim == 0 else array.astype(dtype)
    except (OverflowError, ValueError, TypeError) as err:
        raise UserError(f"{where}: column {name}: cannot store its values as {dtype} ({err})") from None


def _evaluate(expression: str, inputs: dict[str, Any], where: str, what: str) -> Any:
    """The expression's value, with the file, the entries and the schema field in any error."""
    try:
        value = expressions.evaluate(expression, inputs)
    except UserError as err:
        raise UserError(f"{where}: {what}: {err}") from None
    if fields := (ak.fields(value) if isinstance(value, ak.Array) else []):
        raise UserError(f"{where}: {what}: {expression!r} gives records with fields {fields}; pick one field "
                        f"({expression}.{fields[0]}) or use a 4-vector function such as pt({expression})")
    return value


def _check_finite(value: Any, name: str, expression: str, where: str) -> None:
    """NaN/inf are errors (docs/converting-data.md): say where the first one is and how to replace them."""
    flat = ak.to_numpy(ak.flatten(value, axis=None)) if isinstance(value, ak.Array) else np.asarray(value)
    if flat.dtype.kind != "f" or np.isfinite(flat).all():
        return
    bad = ~np.isfinite(value)
    while getattr(bad, "ndim", 0) > 1:
        bad = ak.any(bad, axis=-1) if isinstance(bad, ak.Array) else bad.any(axis=-1)
    first = int(np.argmax(np.asarray(bad))) if np.ndim(bad) else 0
    fix = expression if len(expression) < 60 else "x"
    raise UserError(f"{where}: column {name}: {flat.size - np.count_nonzero(np.isfinite(flat))} NaN/inf value(s), "
                    f"the first in example {first} of these entries (after the selection); replace them in the "
                    f"schema, e.g. finite_or({fix}, 0), or drop those examples with a `selection`")


def _select(inputs: dict[str, Any], selection: str, where: str) -> dict[str, Any]:
    keep = _evaluate(selection, inputs, where, "selection")
    if keep.ndim > 1 if isinstance(keep, ak.Array) else np.ndim(keep) > 1:
        raise UserError(f"{where}: selection {selection!r} gives a list per example; it needs one true/false per "
                        "example, e.g. num(part_px) > 0 or jet_pt > 200")
    n = len(next(iter(inputs.values())))
    keep = np.broadcast_to(np.asarray(ak.to_numpy(keep) if isinstance(keep, ak.Array) else keep, dtype=bool), (n,))
    return {k: v[keep] for k, v in inputs.items()}


def _jagged_column(value: Any, group: JaggedGroup, name: str, dtype: np.dtype, where: str, inputs: dict[str, Any],
                   state: dict[int, tuple[np.ndarray, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(clipped counts, padded values) of one column of a jagged group; every column of the group must have the
    lengths of the first, which fixes the group's order (`sort_by`). `state` keeps (lengths, order) per group."""
    what = f"column {name} (jagged group {group.count})"
    if not isinstance(value, ak.Array) or value.ndim < 2:
        raise UserError(f"{where}: {what} gives one value per example; columns of a jagged group need a list per "
                        "example (one value per constituent); move it to `columns`")
    lengths = ak.to_numpy(ak.num(value, axis=1))
    if id(group) not in state:
        order = None
        if group.sort_by:
            order = ak.argsort(_evaluate(group.sort_by, inputs, where, f"sort_by of {group.count}"), axis=1,
                               ascending=False)
            if not np.array_equal(ak.to_numpy(ak.num(order, axis=1)), lengths):
                raise UserError(f"{where}: sort_by of {group.count} has other lengths than column {name}; it needs "
                                "one value per constituent")
        state[id(group)] = (lengths, order)
    reference, order = state[id(group)]
    if not np.array_equal(lengths, reference):
        example = int(np.argmax(lengths != reference))
        raise UserError(f"{where}: column {name} has other lengths than the rest of its group ({group.count}), "
                        f"first in example {example} ({lengths[example]} vs {reference[example]}); all columns of "
                        "a jagged group need one entry per constituent")
    try:
        padded, clipped = pad_jagged(value if order is None else value[order], group.max_length, dtype)
    except (ValueError, TypeError) as err:
        reason = " ".join(str(err).split())[:200]
        raise UserError(f"{where}: {what}: cannot store it as {dtype} ({reason})") from None
    return clipped.astype(np.int32), padded


def convert_task(task: Task, schema: Schema) -> dict[str, np.ndarray]:
    """Read one work unit and evaluate the schema on it; a UserError names the file, the entries and the column
    of anything that cannot be stored (strings, nulls, NaN/inf, lists of the wrong length, ...)."""
    where = f"{task.file} ({'entries' if schema.format == 'root' else 'row groups'} {task.start}:{task.stop})"
    arrays, missing = sources.read_inputs(task.file, schema.format, schema.tree, task.start, task.stop,
                                          schema.inputs())
    required = set()
    for _, _, spec in schema.column_defs():
        if not spec.optional:
            required |= expressions.inputs_of(spec.expr)
    if lacking := sorted(missing & required):
        raise UserError(f"{task.file}: missing input branch/column(s) {lacking} required by schema "
                        f"{schema.name}; check the file or the schema")
    inputs = {name: arrays[name] for name in ak.fields(arrays)}
    for name, array in inputs.items():
        if problem := sources.input_problem(array):
            raise UserError(f"{task.file}: input branch/column {name!r} {problem}; schema {schema.name} needs "
                            "numbers there: fix the file, or leave the branch out of the schema")
    if schema.selection and inputs:
        inputs = _select(inputs, schema.selection, where)
    n = len(next(iter(inputs.values()))) if inputs else 0
    counts = {g.count for g in schema.jagged}
    out: dict[str, np.ndarray] = {}
    groups: dict[int, tuple[np.ndarray, Any]] = {}
    for group, name, spec in schema.column_defs():
        if spec.optional and expressions.inputs_of(spec.expr) & missing:
            continue
        dtype = np.dtype(spec.dtype) if spec.dtype else _default_dtype(name, counts)
        value = _evaluate(spec.expr, inputs, where, f"column {name}")
        _check_finite(value, name, spec.expr, where)
        if group is None:
            out[name] = _as_numpy(value, n, dtype, name, where)
        else:
            out[group.count], out[name] = _jagged_column(value, group, name, dtype, where, inputs, groups)
        if dtype.kind == "f" and not np.isfinite(out[name]).all():  # finite values, too large for the dtype
            raise UserError(f"{where}: column {name}: values beyond the range of {dtype}; scale them in the schema "
                            "or store the column as float64 (dtype: float64)")
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
    is called after every work unit. A conversion stopped by a UserError (bad input, a full disk) leaves nothing
    at `out_dir` unless it wrote a checkpoint that a rerun resumes from (DatasetWriter.abandon).
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
    try:
        return _write_all(writer, tasks, schema, workers, on_progress)
    except UserError:  # bad input or a full disk: keep only what a rerun can resume from
        writer.abandon()
        raise


def _write_all(writer: DatasetWriter, tasks: Sequence[Task], schema: Schema, workers: int,
               on_progress: Callable[[int, int, int], None] | None) -> Manifest:
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
    if writer.examples_added == 0:
        cut = f", or the selection `{schema.selection}` keeps none of their entries" if schema.selection else ""
        raise UserError(f"{', '.join(writer.source_files)}: no examples to convert (the files have no entries{cut})")
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
