"""Writers of `hepml predict`: ROOT TTree (or RNTuple) via uproot, parquet via awkward/pyarrow; streamed, atomic.

Tables are dicts of per-example numpy columns and, for per-element models (MLPF), lists of per-element arrays with
the counter `n_elements`. Output goes to a temporary file next to the target, renamed when complete.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pyarrow.parquet as pq
import uproot

from hepml_dist.errors import UserError

ELEMENTS = "n_elements"  # counter of the jagged per-element columns


def rows(table: dict[str, Any]) -> int:
    return len(next(iter(table.values()))) if table else 0


def _awkward_columns(table: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(per-example numpy columns, per-element jagged awkward columns)."""
    flat = {k: v for k, v in table.items() if not isinstance(v, list)}
    jagged = {k: ak.Array(v) for k, v in table.items() if isinstance(v, list)}
    if jagged:
        counts = flat.pop(ELEMENTS)
        # model outputs are written as float32; integer truth (labels) keeps its type
        jagged = {k: v if _is_integer(v) else ak.values_astype(v, np.float32) for k, v in jagged.items()}
        flat[ELEMENTS] = counts
    return flat, jagged


def _is_integer(array) -> bool:
    return np.issubdtype(ak.to_numpy(ak.flatten(array[:0], axis=None)).dtype, np.integer)


class OutputWriter:
    """Appends tables to FILE.root (TTree, or RNTuple if asked) or FILE.parquet; renamed into place on close."""

    def __init__(self, path: Path, tree: str = "Events", rntuple: bool = False):
        self.path = Path(path)
        suffix = self.path.suffix.lower()
        if suffix not in (".root", ".parquet", ".parq"):
            raise UserError(f"--out {path}: use a .root or .parquet file name")
        if not self.path.parent.is_dir():
            raise UserError(f"--out {path}: the folder {self.path.parent} does not exist")
        self.format = "root" if suffix == ".root" else "parquet"
        if rntuple and self.format != "root":
            raise UserError("--rntuple applies to .root output only")
        self.tree_name, self.rntuple = tree, rntuple
        self.tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self.file = self.tree = self.parquet = None
        self.rows = 0

    def write(self, table: dict[str, Any]) -> None:
        if not table:
            return
        flat, jagged = _awkward_columns(table)
        if self.format == "root":
            self._write_root(flat, jagged)
        else:
            self._write_parquet(flat, jagged)
        self.rows += rows(table)

    def _write_root(self, flat: dict[str, np.ndarray], jagged: dict[str, Any]) -> None:
        data: dict[str, Any] = {k: v for k, v in flat.items() if not (jagged and k == ELEMENTS)}
        if jagged:
            data["elements"] = ak.zip(jagged)
        if self.file is None:
            self.file = uproot.recreate(self.tmp)
            if self.rntuple:
                self.tree = self.file.mkrntuple(self.tree_name, data)
                return
            types = {k: (v.dtype if isinstance(v, np.ndarray) else v.type) for k, v in data.items()}
            self.tree = self.file.mktree(self.tree_name, types, counter_name=lambda name: ELEMENTS,
                                         field_name=lambda outer, inner: inner)
        self.tree.extend(data)

    def _write_parquet(self, flat: dict[str, np.ndarray], jagged: dict[str, Any]) -> None:
        array = ak.zip({**{k: ak.Array(v) for k, v in flat.items()}, **jagged}, depth_limit=1)
        table = ak.to_arrow_table(array, extensionarray=False)
        if self.parquet is None:
            self.parquet = pq.ParquetWriter(self.tmp, table.schema)
        self.parquet.write_table(table)

    def close(self) -> None:
        if self.format == "root":
            if self.file is None:
                raise UserError("no rows to write: the input (after the schema's selection) is empty")
            self.file.close()
        else:
            if self.parquet is None:
                raise UserError("no rows to write: the input (after the schema's selection) is empty")
            self.parquet.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        for handle in (self.file, self.parquet):
            if handle is not None:
                try:
                    handle.close()
                except Exception:  # noqa: BLE001 - the temporary file is removed anyway
                    pass
        self.tmp.unlink(missing_ok=True)
