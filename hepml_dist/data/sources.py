"""Reading the converter's input files: ROOT TTrees (uproot) and parquet files (pyarrow), checked on the way.

Every problem with an input file becomes a UserError naming the file: the wrong format for the schema, a file
that is truncated or damaged (uproot and pyarrow raise many error types for those), and branches or columns
that cannot be read as numbers (strings, missing values, mixed types).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from functools import lru_cache

import awkward as ak
import pyarrow.parquet as pq
import uproot

from hepml_dist.errors import UserError

_MAGIC = {b"root": "root", b"PAR1": "parquet"}  # the first bytes of a file of each format


def check_format(file: str, expected: str, schema: str) -> None:
    """UserError if `file` is recognisably a file of another format than the schema reads."""
    with open(file, "rb") as handle:
        found = _MAGIC.get(handle.read(4))
    if found is not None and found != expected:
        raise UserError(f"{file}: a {found} file, but schema {schema} reads {expected} files (format: {expected}); "
                        f"use a schema for {found} input")


@contextlib.contextmanager
def readable(file: str, kind: str) -> Iterator[None]:
    """Turns what uproot and pyarrow raise for a damaged `kind` file into one UserError naming the file."""
    try:
        yield
    except UserError:
        raise
    except Exception as err:  # noqa: BLE001 - OSError, ValueError, KeyError, uproot's DeserializationError, ...
        reason = " ".join(str(err).split())[:300]
        raise UserError(f"{file}: not a readable {kind} file ({reason}); check that it is a complete {kind} file "
                        "(not truncated, not still being written) and copy or write it again") from None


@lru_cache(maxsize=16)
def _open_root(file: str, size: int, mtime: float):  # size and mtime: a rewritten file is opened again
    with readable(file, "ROOT"):
        return uproot.open(file)


def open_tree(file: str, tree: str):
    """The TTree `tree` of a ROOT file (the file handle is cached)."""
    stat = os.stat(file)
    handle = _open_root(file, stat.st_size, stat.st_mtime)
    with readable(file, "ROOT"):
        if tree not in handle:
            trees = [k.split(";")[0] for k, v in handle.classnames().items() if v == "TTree"]
            raise UserError(f"{file}: no tree {tree!r} (trees: {trees}); set `tree` in the schema")
        return handle[tree]


def read_inputs(file: str, kind: str, tree: str | None, start: int, stop: int,
                names: set[str]) -> tuple[ak.Array, set[str]]:
    """(the `names` the file has, as one awkward record array; the names it lacks) for entries [start, stop) of a
    ROOT tree or row groups [start, stop) of a parquet file."""
    if kind == "root":
        handle = open_tree(file, tree)
        present = set(handle.keys())
        with readable(file, "ROOT"):
            arrays = handle.arrays(sorted(names & present), entry_start=start, entry_stop=stop, library="ak")
        return arrays, names - present
    with readable(file, "parquet"):
        parquet = pq.ParquetFile(file)
        present = set(parquet.schema_arrow.names)
        table = parquet.read_row_groups(list(range(start, stop)), columns=sorted(names & present))
        return ak.from_arrow(table), names - present


def input_problem(array: ak.Array) -> str | None:
    """What keeps an input branch/column from being read as numbers (strings, nulls, mixed types), or None."""
    stack = [array.layout]
    while stack:
        node = stack.pop()
        if node.parameter("__array__") in ("string", "bytestring", "char", "byte"):
            return "holds strings, not numbers"
        if node.is_union:
            return "mixes several types"
        if node.is_numpy and node.dtype.kind not in "biuf":
            return f"holds {node.dtype}, not numbers"
        if node.is_option and ak.any(ak.is_none(ak.Array(node), axis=0)):
            return "has missing (null) values"
        stack += node.contents if node.is_record else [node.content] if hasattr(node, "content") else []
    return None
