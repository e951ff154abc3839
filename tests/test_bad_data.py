"""Malformed data, each rejected cleanly: `hepml data convert` and `hepml predict` exit 2 and the loader (the
training data stream) raises a UserError, with a message that names the file and the field or column and says
what to do, never a traceback, and nothing written (no output folder, no partial shard or prediction file; an
existing dataset stays byte for byte as it was).

Tables of cases, each built by corrupting a copy of one small valid input: raw ROOT/parquet files (truncated,
empty, not ROOT, missing branches, strings, nulls, records, jagged lengths, NaN/inf), converter schemas with
forbidden expressions, hand-edited manifests and damaged or swapped shards, and `hepml predict` on missing,
wrong or broken inputs and run directories. Two documented policies are tested as accepted inputs: jets without
constituents are kept (masked, finite model inputs), and NaN/inf are errors unless the schema replaces them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import torch
import uproot
from data_helpers import random_jets
from train_helpers import MAX_PARTICLES, tiny_job, write_jet_dataset
from typer.testing import CliRunner

from hepml_dist.cli import app
from hepml_dist.data import convert as convert_module
from hepml_dist.data.convert import convert, load_schema
from hepml_dist.data.loader import open_stream
from hepml_dist.data.manifest import read_manifest
from hepml_dist.data.reader import iter_shard_chunks
from hepml_dist.data.writer import DatasetWriter
from hepml_dist.errors import UserError
from hepml_dist.models import build_model
from hepml_dist.runs import write_model_checkpoint
from hepml_dist.spec import parse_spec
from hepml_dist.spec.data import DataSpec

runner = CliRunner()

# ----------------------------------------------------------------------------------------------------------------
# Raw input files and the converter


def schema_text(fmt: str, columns: str = "  jet_pt: jet_pt\n", extra: str = "") -> str:
    """A small converter schema: one jagged group of constituents, a jet column and a label."""
    tree = "tree: tree\n" if fmt == "root" else ""
    return (f"name: tiny\nformat: {fmt}\n{tree}{extra}"
            "jagged:\n  - count: part_n\n    max_length: 8\n"
            "    columns: {part_px: part_px, part_py: part_py, part_pid: {expr: part_pid, dtype: int32}}\n"
            f"columns:\n  label_is_signal: label\n{columns}")


def raw_columns(n: int = 60, seed: int = 0) -> dict:
    """Branches of `n` jets: jagged constituents (1 to 5 each), a jet pT and a 0/1 label."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 6, n)

    def jagged(values):
        return ak.unflatten(values, counts)

    total = int(counts.sum())
    return {"part_px": jagged(rng.normal(size=total).astype(np.float32)),
            "part_py": jagged(rng.normal(size=total).astype(np.float32)),
            "part_pid": jagged(rng.choice([22, 211], total).astype(np.int32)),
            "jet_pt": rng.uniform(10, 100, n).astype(np.float32), "label": rng.integers(0, 2, n).astype(np.int32)}


def write_parquet(path: Path, columns: dict) -> Path:
    ak.to_parquet(ak.Array(columns), path)
    return path


def write_root(path: Path, columns: dict) -> Path:
    """A TTree `tree`; each jagged branch gets its own counter, so their lengths may disagree."""
    with uproot.recreate(path) as f:
        f.mktree("tree", {k: v.type.content if isinstance(v, ak.Array) else v.dtype for k, v in columns.items()})
        f["tree"].extend(columns)
    return path


def replaced(**changes) -> dict:
    return {**raw_columns(), **changes}


def without(name: str) -> dict:
    return {k: v for k, v in raw_columns().items() if k != name}


def with_nan(name: str, index: int) -> dict:
    """NaN in entry `index` of a jet branch, or inf in constituent `index` (counted over all jets) of a jagged one."""
    columns = raw_columns()
    value = columns[name]
    if isinstance(value, ak.Array):
        flat = ak.to_numpy(ak.flatten(value)).copy()
        flat[index] = np.inf
        return {**columns, name: ak.unflatten(flat, ak.num(value))}
    value = value.astype(np.float32)
    value[index] = np.nan
    return {**columns, name: value}


def truncated(source: Path, keep: float) -> Callable[[Path], Path]:
    """A maker of a copy of `source` cut to the fraction `keep` of its bytes."""
    def make(path: Path) -> Path:
        data = source.read_bytes()
        path.write_bytes(data[:int(len(data) * keep)])
        return path
    return make


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """Valid inputs: a parquet file and a ROOT TTree of the same jets."""
    root = tmp_path_factory.mktemp("raw")
    return {"parquet": write_parquet(root / "good.parquet", raw_columns()),
            "root": write_root(root / "good.root", raw_columns())}


def empty_file(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def csv_file(path: Path) -> Path:
    path.write_text("run,pt\n1,20.5\n" * 50)
    return path


def copy_of(source: Path, path: Path) -> Path:
    shutil.copyfile(source, path)
    return path


def strings(values) -> np.ndarray:
    return np.array([str(v) for v in values])


# case id: (format, how the input file is made from its path, schema columns or None, text the error names)
CONVERT_CASES: dict[str, tuple[str, Callable, str | None, list[str]]] = {
    "parquet_truncated": ("parquet", lambda p, raw: truncated(raw["parquet"], 0.5)(p), None,
                          ["{input}", "not a readable parquet file", "copy or write it again"]),
    "parquet_empty_file": ("parquet", lambda p, raw: empty_file(p), None,
                           ["{input}", "not a readable parquet file", "0 bytes"]),
    "parquet_no_rows": ("parquet", lambda p, raw: write_parquet(p, {k: v[:0] for k, v in raw_columns().items()}),
                        None, ["{input}", "no examples to convert", "no entries"]),
    "root_truncated": ("root", lambda p, raw: truncated(raw["root"], 0.6)(p), None,
                       ["{input}", "not a readable ROOT file", "not truncated"]),
    "root_empty_file": ("root", lambda p, raw: empty_file(p), None,
                        ["{input}", "not a readable ROOT file"]),
    "root_suffix_on_text": ("root", lambda p, raw: csv_file(p), None,
                            ["{input}", "not a readable ROOT file", "not a ROOT file"]),
    "root_suffix_on_parquet": ("root", lambda p, raw: copy_of(raw["parquet"], p), None,
                               ["{input}", "a parquet file, but schema tiny reads root files", "use a schema for"]),
    "root_without_the_tree": ("root", lambda p, raw: _root_with_other_tree(p), None,
                              ["{input}", "no tree 'tree'", "set `tree` in the schema"]),
    "missing_file": ("parquet", lambda p, raw: p, None, ["{input}", "input file not found"]),
    "parquet_missing_column": ("parquet", lambda p, raw: write_parquet(p, without("jet_pt")), None,
                               ["{input}", "missing input branch/column(s) ['jet_pt']",
                                "check the file or the schema"]),
    "root_missing_branch": ("root", lambda p, raw: write_root(p, without("part_py")), None,
                            ["{input}", "missing input branch/column(s) ['part_py']"]),
    "strings_for_numbers": ("parquet", lambda p, raw: write_parquet(p, replaced(jet_pt=strings(range(60)))), None,
                            ["{input}", "'jet_pt' holds strings, not numbers", "fix the file"]),
    "strings_in_jagged_branch": ("parquet", lambda p, raw: write_parquet(p, replaced(
        part_px=ak.Array([[str(x) for x in row] for row in raw_columns()["part_px"].tolist()]))), None,
                                 ["{input}", "'part_px' holds strings"]),
    "string_labels": ("parquet", lambda p, raw: write_parquet(p, replaced(label=np.array(["sig", "bkg"] * 30))), None,
                      ["{input}", "'label' holds strings"]),
    "null_values": ("parquet", lambda p, raw: write_parquet(p, replaced(jet_pt=[None] + [1.0] * 59)), None,
                    ["{input}", "'jet_pt' has missing (null) values"]),
    "record_for_a_number": ("parquet", lambda p, raw: write_parquet(p, replaced(jet_pt=[{"pt": 1.0}] * 60)), None,
                            ["{input}", "column jet_pt", "records with fields ['pt']", "jet_pt.pt"]),
    "jagged_for_a_number": ("parquet", lambda p, raw: write_parquet(p, replaced(jet_pt=raw_columns()["part_px"])),
                            None, ["{input}", "column jet_pt has a variable length per example", "`jagged` group"]),
    "number_in_a_jagged_group": ("parquet", lambda p, raw: write_parquet(p, replaced(part_px=raw_columns()["jet_pt"])),
                                 None, ["{input}", "column part_px (jagged group part_n) gives one value per example",
                                        "move it to `columns`"]),
    "jagged_lengths_disagree": ("parquet", lambda p, raw: write_parquet(p, replaced(
        part_py=ak.Array([row + [0.0] for row in raw_columns()["part_py"].tolist()]))), None,
                                ["{input}", "column part_py has other lengths than the rest of its group (part_n)",
                                 "one entry per constituent"]),
    "root_jagged_lengths_disagree": ("root", lambda p, raw: write_root(p, replaced(
        part_pid=ak.Array([row[:1] for row in raw_columns()["part_pid"].tolist()]))), None,
                                     ["{input}", "column part_pid has other lengths than the rest of its group"]),
    "nan_in_a_jet_column": ("parquet", lambda p, raw: write_parquet(p, with_nan("jet_pt", 5)), None,
                            ["{input}", "column jet_pt: 1 NaN/inf value(s)", "example 5", "finite_or(jet_pt, 0)"]),
    "inf_in_a_constituent": ("parquet", lambda p, raw: write_parquet(p, with_nan("part_px", 7)), None,
                             ["{input}", "column part_px: 1 NaN/inf value(s)", "finite_or(part_px, 0)"]),
    "nan_in_a_label": ("parquet", lambda p, raw: write_parquet(p, with_nan("label", 3)), None,
                       ["{input}", "column label_is_signal: 1 NaN/inf value(s)", "`selection`"]),
    "root_nan": ("root", lambda p, raw: write_root(p, with_nan("jet_pt", 0)), None,
                 ["{input}", "(entries 0:60)", "column jet_pt: 1 NaN/inf value(s)"]),
    "field_of_a_number": ("parquet", lambda p, raw: raw["parquet"], "  jet_pt: jet_pt.x\n",
                          ["{input}", "column jet_pt", "expression 'jet_pt.x': no field 'x'"]),
    "wrong_arguments": ("parquet", lambda p, raw: raw["parquet"], "  jet_pt: where(jet_pt)\n",
                        ["{input}", "column jet_pt", "expression 'where(jet_pt)': cannot evaluate it"]),
    "constant_beyond_float32": ("parquet", lambda p, raw: raw["parquet"], "  jet_pt: 10**60 * 10**60 * 10**60 * 10**60\n",
                           ["{input}", "column jet_pt: values beyond the range of float32", "dtype: float64"]),
    "constant_beyond_float64": ("parquet", lambda p, raw: raw["parquet"], f"  jet_pt: {'*'.join(['10**60'] * 6)}\n",
                                ["{input}", "column jet_pt: cannot store its values as float32"]),
    "jagged_selection": ("parquet", lambda p, raw: raw["parquet"], "  jet_pt: jet_pt\nselection: part_px > 0\n",
                         ["{input}", "selection 'part_px > 0' gives a list per example", "num(part_px) > 0"]),
}


def _root_with_other_tree(path: Path) -> Path:
    with uproot.recreate(path) as f:
        f.mktree("events", {"jet_pt": np.float32})
        f["events"].extend({"jet_pt": np.ones(3, np.float32)})
    return path


def run_convert(inputs: list[Path], schema: Path, out: Path, *extra: str):
    return runner.invoke(app, ["data", "convert", *map(str, inputs), "--out", str(out), "--schema", str(schema),
                               "--workers", "0", "--shard-size", "10", "--chunk-size", "5", *extra])


def assert_clean_failure(result, expected: list[str], code: int = 2) -> None:
    """Exit `code`, every expected text in the output, a plain message (no traceback)."""
    output = " ".join(result.output.split())  # the console wraps long lines
    assert result.exit_code == code, result.output
    assert result.exception is None if code == 0 else isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    for text in expected:
        assert text in output, f"{text!r} not in {result.output!r}"


@pytest.mark.parametrize("case", CONVERT_CASES)
def test_convert_rejects_bad_input_files(case, raw, tmp_path):
    fmt, make, columns, expected = CONVERT_CASES[case]
    schema = tmp_path / "tiny.yaml"
    schema.write_text(schema_text(fmt, columns) if columns else schema_text(fmt))
    source = make(tmp_path / f"input.{fmt}", raw)
    result = run_convert([source], schema, tmp_path / "out")
    assert_clean_failure(result, [t.replace("{input}", source.name) for t in expected])
    assert not (tmp_path / "out").exists()  # nothing written


# ----------------------------------------------------------------------------------------------------------------
# Schema files with forbidden expressions

LONG = "+".join(["jet_pt"] * 200)  # 1399 characters

# case id: (schema YAML after the common part, the schema field named, text the error says)
SCHEMA_CASES: dict[str, tuple[str, str, str]] = {
    "dunder_attribute": ("  jet_pt: jet_pt.__class__\n", "columns.jet_pt", "field '__class__' is not allowed"),
    "dunder_chain": ("  jet_pt: jet_pt.__class__.__subclasses__\n", "columns.jet_pt", "is not allowed"),
    "open_call": ("  jet_pt: open('/etc/passwd')\n", "columns.jet_pt", "unknown function 'open'"),
    "import_call": ("  jet_pt: __import__('os').system('ls')\n", "columns.jet_pt", "unknown function"),
    "getattr_call": ("  jet_pt: getattr(jet_pt, 'x')\n", "columns.jet_pt", "unknown function 'getattr'"),
    "lambda": ("  jet_pt: 'lambda x: x'\n", "columns.jet_pt", "Lambda is not allowed"),
    "list_comprehension": ("  jet_pt: '[x for x in jet_pt]'\n", "columns.jet_pt", "ListComp is not allowed"),
    "generator": ("  jet_pt: sum(x for x in jet_pt)\n", "columns.jet_pt", "unknown function 'sum'"),
    "string_subscript": ("  jet_pt: jet_pt['x']\n", "columns.jet_pt", "Subscript is not allowed"),
    "string_constant": ("  jet_pt: jet_pt == 'x'\n", "columns.jet_pt", "only numbers are allowed as constants"),
    "walrus": ("  jet_pt: (y := jet_pt)\n", "columns.jet_pt", "NamedExpr is not allowed"),
    "conditional": ("  jet_pt: jet_pt if jet_pt else 0\n", "columns.jet_pt", "IfExp is not allowed"),
    "power_tower": ("  jet_pt: 2**10**10\n", "columns.jet_pt", "a power inside an exponent"),
    "power_in_exponent_of_array": ("  jet_pt: jet_pt ** 9**9\n", "columns.jet_pt", "a power inside an exponent"),
    "huge_constant_power": ("  jet_pt: 10**100000\n", "columns.jet_pt", "a power of constants needs a plain exponent"),
    "nested_constant_power": ("  jet_pt: (2**64)**64\n", "columns.jet_pt", "a base without **"),
    "overly_long": (f"  jet_pt: {LONG}\n", "columns.jet_pt", "longer than 1000 characters"),
    "nested_too_deeply": ("  jet_pt: " + "-" * 150 + "jet_pt\n", "columns.jet_pt", "nested too deeply"),
    "keyword_argument": ("  jet_pt: sqrt(jet_pt, out=jet_pt)\n", "columns.jet_pt", "takes no keyword argument 'out'"),
    "star_arguments": ("  jet_pt: hypot(*jet_pt)\n", "columns.jet_pt", "Starred is not allowed"),
    "in_the_selection": ("  jet_pt: jet_pt\nselection: jet_pt.__class__\n", "selection", "'__class__'"),
    "in_a_jagged_column": ("  jet_pt: jet_pt\n", "jagged[0].columns.part_px", "unknown function 'eval'"),
    "in_sort_by": ("  jet_pt: jet_pt\n", "jagged[0].sort_by", "unknown function 'exec'"),
    "dtype_not_numeric": ("  jet_pt: {expr: jet_pt, dtype: object}\n", "columns.jet_pt",
                          "dtype 'object' is not a numeric numpy dtype"),
    "dtype_unknown": ("  jet_pt: {expr: jet_pt, dtype: float33}\n", "columns.jet_pt", "dtype 'float33'"),
}
JAGGED_EDITS = {"in_a_jagged_column": ("part_px: part_px", "part_px: eval('1')"),
                "in_sort_by": ("    columns:", "    sort_by: exec('1')\n    columns:")}


def offending_expression(case: str) -> str:
    """The expression a case's error must quote: the edited one, or the value of the last schema line."""
    if case in JAGGED_EDITS:
        return JAGGED_EDITS[case][1].split(": ")[-1].split("\n")[0]
    return SCHEMA_CASES[case][0].strip().splitlines()[-1].split(": ", 1)[1].strip("'")


@pytest.mark.parametrize("case", SCHEMA_CASES)
def test_schemas_with_forbidden_expressions_are_rejected(case, raw, tmp_path):
    columns, field, problem = SCHEMA_CASES[case]
    text = schema_text("parquet", columns)
    if case in JAGGED_EDITS:
        text = text.replace(*JAGGED_EDITS[case])
    schema = tmp_path / "evil.yaml"
    schema.write_text(text)
    result = run_convert([raw["parquet"]], schema, tmp_path / "out")
    named = [field] if "dtype" in case else [f"{field}: expression", offending_expression(case)[:40]]
    assert_clean_failure(result, [str(schema), *named, problem])
    assert not (tmp_path / "out").exists()
    with pytest.raises(UserError):  # the same check guards every other reader of schemas
        load_schema(schema)


def test_expression_limits_leave_the_shipped_schemas_valid():
    """The bounds on length, nesting and powers are far above what real schemas need."""
    for name in ("jetclass", "jetclass2", "fcc-tau", "clic-events"):
        assert load_schema(name).located_expressions()


# ----------------------------------------------------------------------------------------------------------------
# Documented policies: jets without constituents are kept; NaN is fixed in the schema


def stored_chunks(root: Path) -> list[dict[str, np.ndarray]]:
    """Every chunk of every split of a dataset, as written."""
    manifest = read_manifest(root)
    return [arrays for info in manifest.splits.values() for shard in info.shards
            for _, arrays in iter_shard_chunks(root / shard.path)]


def test_jets_without_constituents_are_kept_and_masked(tmp_path):
    """Policy: a jet with no constituents is an example like any other (count 0, all padding)."""
    columns = raw_columns()
    lists = {k: columns[k].tolist() for k in ("part_px", "part_py", "part_pid")}
    for name in lists:
        for row in (2, 5):
            lists[name][row] = []
    columns.update({k: ak.Array(v) for k, v in lists.items()})
    schema = tmp_path / "tiny.yaml"
    schema.write_text(schema_text("parquet", "  jet_pt: jet_pt\n  jet_index: jet_index\n"))
    source = write_parquet(tmp_path / "empty-jets.parquet", {**columns, "jet_index": np.arange(60.0)})
    assert run_convert([source], schema, tmp_path / "out").exit_code == 0
    found = {int(i): (n, px) for chunk in stored_chunks(tmp_path / "out")
             for i, n, px in zip(chunk["jet_index"], chunk["part_n"], chunk["part_px"])}
    assert len(found) == 60
    assert found[2][0] == 0 and found[5][0] == 0 and not found[2][1].any()
    assert all(found[i][0] == len(lists["part_px"][i]) for i in found)


def test_jets_without_constituents_give_finite_model_outputs(tmp_path):
    """The loader masks a jet without constituents completely, and the model's outputs for it are finite."""
    columns = random_jets(64, MAX_PARTICLES, np.random.default_rng(1))
    for name in [k for k in columns if k.startswith("part_")]:
        columns[name][:4] = 0
    columns.update(label_is_signal=columns.pop("label_jet_class") % 2, target_log_n=np.zeros(64, np.float32),
                   jet_mass=columns.pop("jet_sdmass"))
    with DatasetWriter(tmp_path / "ds", schema="empty-jets", splits=(1, 0, 0), chunk_size=64) as writer:
        writer.add(columns)
    spec = parse_spec(tiny_job(tmp_path / "ds", data={"batch_size": 64, "val": None, "test": None}))
    batch = next(iter(open_stream(spec.data, "train", training=False).batches(0)))
    empty = batch["jet_index"] < 4
    assert int(empty.sum()) == 4 and not batch["mask"][empty].any() and batch["mask"][~empty].any(dim=-1).all()
    assert all(torch.isfinite(batch[k]).all() for k in ("features", "vectors"))
    with torch.no_grad():
        outputs = build_model(spec).eval()(batch)
    assert all(torch.isfinite(value[empty]).all() for value in outputs.values())


def test_nan_is_converted_once_the_schema_replaces_it(tmp_path):
    """The fix the NaN message suggests works: finite_or(jet_pt, 0) stores 0 where the input has NaN."""
    source = write_parquet(tmp_path / "nan.parquet", {**with_nan("jet_pt", 5), "jet_index": np.arange(60.0)})
    schema = tmp_path / "tiny.yaml"
    schema.write_text(schema_text("parquet", "  jet_pt: finite_or(jet_pt, 0)\n  jet_index: jet_index\n"))
    assert run_convert([source], schema, tmp_path / "out").exit_code == 0
    stored = {int(i): float(pt) for chunk in stored_chunks(tmp_path / "out")
              for i, pt in zip(chunk["jet_index"], chunk["jet_pt"])}
    assert len(stored) == 60 and stored[5] == 0.0 and all(np.isfinite(list(stored.values())))


# ----------------------------------------------------------------------------------------------------------------
# Partial output of a failed conversion


def test_a_failure_after_shards_were_written_leaves_nothing(raw, tmp_path, monkeypatch):
    """The first file converts (shards are written), the second has NaN: the folder is removed again."""
    bad = write_parquet(tmp_path / "nan.parquet", with_nan("jet_pt", 30))
    schema = tmp_path / "tiny.yaml"
    schema.write_text(schema_text("parquet"))
    seen = []
    original = DatasetWriter.add

    def add(writer, columns):
        original(writer, columns)
        seen.append(writer.shards_written)

    monkeypatch.setattr(DatasetWriter, "add", add)
    with pytest.raises(UserError, match=r"nan\.parquet .*column jet_pt: 1 NaN/inf"):
        convert([raw["parquet"], bad], tmp_path / "out", load_schema(schema), shard_size=10, chunk_size=5)
    assert seen and seen[-1] > 0  # shards existed before the failure
    assert not (tmp_path / "out").exists()


def test_a_failure_keeps_a_resumable_checkpoint(raw, tmp_path, monkeypatch):
    """Once a checkpoint is written, a failure keeps it (a rerun resumes after a transient read error)."""
    monkeypatch.setattr(convert_module, "CHECKPOINT_EVERY_SHARDS", 1)
    bad = write_parquet(tmp_path / "nan.parquet", with_nan("jet_pt", 30))
    schema = tmp_path / "tiny.yaml"
    schema.write_text(schema_text("parquet"))
    with pytest.raises(UserError, match="NaN"):
        convert([raw["parquet"], bad], tmp_path / "out", load_schema(schema), shard_size=10, chunk_size=5)
    assert (tmp_path / "out" / ".partial" / "state.json").is_file()
    assert not (tmp_path / "out" / "manifest.json").exists()


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_bad_input_leaves_an_existing_dataset_untouched(raw, tmp_path):
    schema = tmp_path / "tiny.yaml"
    schema.write_text(schema_text("parquet"))
    assert run_convert([raw["parquet"]], schema, tmp_path / "out").exit_code == 0
    before = snapshot(tmp_path / "out")
    bad = write_parquet(tmp_path / "nan.parquet", with_nan("jet_pt", 5))
    cut = truncated(raw["parquet"], 0.3)(tmp_path / "cut.parquet")
    for source, named in ((bad, "already holds a dataset"), (cut, "cut.parquet: not a readable parquet file")):
        assert_clean_failure(run_convert([source], schema, tmp_path / "out"), [named])
        assert snapshot(tmp_path / "out") == before


# ----------------------------------------------------------------------------------------------------------------
# The loader: hand-edited manifests, damaged and swapped shards, missing splits


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small valid jet dataset (train: 4 full shards of 2 x 16 jets and a shorter last one)."""
    return write_jet_dataset(tmp_path_factory.mktemp("ds") / "jets", examples=200, chunk_size=16, chunks_per_shard=2)


def edit_manifest(change: Callable[[dict], object]) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        manifest = json.loads((root / "manifest.json").read_text())
        change(manifest)
        (root / "manifest.json").write_text(json.dumps(manifest))
    return mutate


def first_shard(manifest: dict) -> dict:
    return manifest["splits"]["train"]["shards"][0]


def shard(root: Path, index: int = 0, split: str = "train") -> Path:
    return root / split / f"shard-{index:06d}.tar"


def consistent_count(manifest: dict) -> None:
    """A hand edit that keeps the manifest's own sums right: only reading the shard shows it is wrong."""
    first_shard(manifest)["chunks"][0] -= 1
    first_shard(manifest)["examples"] -= 1
    manifest["splits"]["train"]["examples"] -= 1


def same_size_garbage(root: Path) -> None:
    size = shard(root).stat().st_size
    shard(root).write_bytes(np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes())


def broken_npy(root: Path) -> None:
    """The `.npy` magic of the first part_px member destroyed: the tar is fine, one array is not."""
    with tarfile.open(shard(root)) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".part_px.npy"))
    data = bytearray(shard(root).read_bytes())
    data[member.offset_data:member.offset_data + 6] = b"NOTNPY"
    shard(root).write_bytes(bytes(data))


def truncate_shard(root: Path, split: str) -> None:
    path = shard(root, 0, split)
    path.write_bytes(path.read_bytes()[:3000])


def swap_with(index: int) -> Callable[[Path], None]:
    return lambda root: shutil.copyfile(shard(root, index), shard(root))


ADVICE = "restore the original or write the dataset again"
SHARD_ADVICE = "hepml data verify"
# case id: (mutation of a dataset copy, texts of the loader's UserError, (exit status, texts) of `hepml data verify`)
LOADER_CASES: dict[str, tuple[Callable[[Path], None], list[str], tuple[int, list[str]]]] = {
    "manifest_invalid_json": (lambda r: (r / "manifest.json").write_text('{"format": "hepml-shards",'),
                              ["manifest.json", "not valid JSON", ADVICE], (2, ["not valid JSON"])),
    "manifest_not_an_object": (lambda r: (r / "manifest.json").write_text("[1, 2]"),
                               ["manifest.json", "a manifest is a JSON object, not list", ADVICE],
                               (2, ["JSON object"])),
    "manifest_binary": (lambda r: (r / "manifest.json").write_bytes(b"\xff\xfe\x00garbage"),
                        ["manifest.json", "malformed manifest", ADVICE], (2, ["malformed manifest"])),
    "manifest_missing_columns": (edit_manifest(lambda m: m.pop("columns")),
                                 ["manifest.json", "missing key 'columns'", ADVICE], (2, ["missing key 'columns'"])),
    "manifest_shard_without_sha256": (edit_manifest(lambda m: first_shard(m).pop("sha256")),
                                      ["manifest.json", "splits.train: shards[0]: missing key 'sha256'"],
                                      (2, ["missing key 'sha256'"])),
    "manifest_wrong_count": (edit_manifest(lambda m: first_shard(m)["chunks"].__setitem__(0, 20)),
                             ["manifest.json", "splits.train: shards[0]: examples 32 is not the sum of chunks",
                              "[20, 16]"],
                             (2, ["is not the sum of chunks"])),
    "manifest_count_edited_consistently": (edit_manifest(consistent_count),
                                           ["shard-000000.tar", "chunk 0 has 16 examples, the manifest says 15",
                                            SHARD_ADVICE],
                                           (1, ["shard-000000.tar", "differ from the manifest [15, 16]"])),
    "manifest_negative_count": (edit_manifest(lambda m: first_shard(m).update(chunks=[-5, 16], examples=11)),
                                ["splits.train: shards[0]: chunks [-5, 16]: every chunk holds at least one example"],
                                (2, ["at least one example"])),
    "manifest_count_not_a_number": (edit_manifest(lambda m: first_shard(m)["chunks"].__setitem__(0, "many")),
                                    ["splits.train: shards[0]: invalid literal for int()", "'many'"], (2, ["'many'"])),
    "manifest_unknown_dtype": (edit_manifest(lambda m: m["columns"]["part_px"].update(dtype="banana")),
                               ["columns.part_px: dtype 'banana' is not a numeric numpy dtype"], (2, ["'banana'"])),
    "manifest_shape_too_small": (edit_manifest(lambda m: m["columns"]["part_px"].update(shape=[5])),
                                 ["shard-0000", "column part_px: shape (12,) does not fit the manifest shape [5]"],
                                 (1, ["does not fit the manifest shape [5]"])),
    "manifest_path_outside_the_dataset": (edit_manifest(lambda m: first_shard(m).update(path="../../etc/passwd")),
                                          ["splits.train: shards[0]: path '../../etc/passwd'", "inside the dataset"],
                                          (2, ["inside the dataset"])),
    "manifest_newer_format": (edit_manifest(lambda m: m.update(format_version=99)),
                              ["format_version 99 is newer", "upgrade hepml_dist"], (2, ["upgrade hepml_dist"])),
    "missing_split": (edit_manifest(lambda m: m["splits"].pop("train")),
                      ["data:", "/train: the dataset has splits ['test', 'val'], not 'train'"], (0, ["all match"])),
    "split_listed_without_shards": (edit_manifest(lambda m: m["splits"]["train"].update(shards=[], examples=0)),
                                    ["/train: the train split of this dataset is empty"],
                                    (1, ["not listed in manifest.json"])),
    "split_folder_without_shards": (lambda r: [p.unlink() for p in (r / "train").glob("*.tar")],
                                    ["train/shard-0000", "file not found", SHARD_ADVICE], (1, ["missing"])),
    "split_folder_missing": (lambda r: shutil.rmtree(r / "train"),
                             ["/train does not exist", "split folder"], (1, ["train/shard-000000.tar: missing"])),
    "shard_truncated": (lambda r: truncate_shard(r, "train"),
                        ["train/shard-000000.tar", "3000 bytes, the manifest says", "truncated", SHARD_ADVICE],
                        (1, ["3000 bytes, manifest says"])),
    "shard_empty": (lambda r: shard(r).write_bytes(b""), ["train/shard-000000.tar", "0 bytes"], (1, ["0 bytes"])),
    "shard_not_a_tar": (same_size_garbage, ["train/shard-000000.tar", "invalid header", SHARD_ADVICE],
                        (1, ["sha256 differs"])),
    "shard_with_a_broken_array": (broken_npy, ["train/shard-000000.tar", "part_px", "not a .npy array"],
                                  (1, ["sha256 differs"])),
    "shard_replaced_by_another": (swap_with(1), ["train/shard-000000.tar", "holds chunk train_000001_0000",
                                                 "replaced by another shard"],
                                  (1, ["train/shard-000000.tar: sha256 differs from the manifest"])),
    "shard_replaced_by_a_test_shard": (lambda r: shutil.copyfile(shard(r, 0, "test"), shard(r)),
                                       ["train/shard-000000.tar", "holds chunk test_000000_0000"],
                                       (1, ["sha256 differs"])),
}


def read_train_stream(root: Path, training: bool = False) -> int:
    spec = DataSpec(train=str(root / "train"), batch_size=16, loader_workers=0, steps_per_epoch=None,
                    inputs={"features": "part_full", "max_length": MAX_PARTICLES})
    return sum(1 for _ in open_stream(spec, "train", training=training).batches(0))


@pytest.mark.parametrize("case", LOADER_CASES)
def test_loader_and_verify_reject_damaged_datasets(case, dataset, tmp_path):
    mutate, loader_expects, (verify_code, verify_expects) = LOADER_CASES[case]
    root = tmp_path / "jets"
    shutil.copytree(dataset, root)
    mutate(root)
    before = snapshot(root)
    with pytest.raises(UserError) as err:
        read_train_stream(root)
    message = str(err.value)
    assert "Traceback" not in message
    for text in loader_expects:
        assert text in message, f"{text!r} not in {message!r}"
    result = runner.invoke(app, ["data", "verify", str(root)])
    assert_clean_failure(result, verify_expects, code=verify_code)
    assert snapshot(root) == before  # reading and verifying write nothing


def test_training_stream_names_the_truncated_shard(dataset, tmp_path):
    """The same error on the training path (shuffled windows, a plan of steps): one line, no traceback."""
    root = tmp_path / "jets"
    shutil.copytree(dataset, root)
    truncate_shard(root, "train")
    with pytest.raises(UserError) as err:
        read_train_stream(root, training=True)
    assert "Traceback" not in str(err.value) and "\n" not in str(err.value)
    assert "train/shard-000000.tar: 3000 bytes, the manifest says" in str(err.value)


def test_the_valid_dataset_reads_and_verifies(dataset):
    """The cases above fail because of their damage: the untouched copy streams and verifies."""
    assert read_train_stream(dataset) > 0
    assert runner.invoke(app, ["data", "verify", str(dataset)]).exit_code == 0


# ----------------------------------------------------------------------------------------------------------------
# hepml predict


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    """A run directory holding one checkpoint of a (randomly initialised) tiny ParT trained on `dataset`."""
    run = tmp_path_factory.mktemp("predict") / "run"
    spec = parse_spec(tiny_job(dataset))
    torch.manual_seed(0)
    write_model_checkpoint(run / "checkpoints" / "step-00000001", spec, build_model(spec).eval(), {"step": 1})
    return run


def copy_run(run: Path, tmp: Path, change: Callable[[Path], object]) -> Path:
    target = tmp / "run-copy"
    shutil.copytree(run, target)
    change(target / "checkpoints")
    return target


def other_schema_shards(tmp: Path) -> Path:
    with DatasetWriter(tmp / "other", schema="other", chunk_size=16, chunks_per_shard=2) as writer:
        writer.add({"jet_pt": np.ones(100, np.float32), "label_x": np.zeros(100, np.int64)})
    return tmp / "other" / "test"


def broken_shards(dataset: Path, tmp: Path) -> Path:
    shutil.copytree(dataset, tmp / "jets")
    truncate_shard(tmp / "jets", "test")
    return tmp / "jets" / "test"


def text_file(path: Path) -> Path:
    path.write_text("not ROOT\n")
    return path


def empty_run(tmp: Path) -> Path:
    (tmp / "empty-run").mkdir()
    return tmp / "empty-run"


def tiny_schema(tmp: Path) -> Path:
    path = tmp / "tiny.yaml"
    path.write_text(schema_text("parquet"))
    return path


# case id: (the run directory from (trained run, tmp), the predict arguments from (raw, dataset, tmp), the texts
# the error names)
PREDICT_CASES: dict[str, tuple[Callable, Callable, list[str]]] = {
    "missing_raw_file": (lambda run, t: run, lambda raw, ds, t: ["--data", str(t / "nope.parquet")],
                         ["nope.parquet: no such file"]),
    "missing_shard_folder": (lambda run, t: run, lambda raw, ds, t: ["--data", str(t / "nope")],
                             ["nope does not exist", "split folder"]),
    "raw_file_of_another_schema": (lambda run, t: run, lambda raw, ds, t: ["--data", str(raw["parquet"]), "--schema",
                                                                           str(tiny_schema(t))],
                                   ["data.inputs.features = part_full needs stored column(s)", "part_pz",
                                    "pick a feature set"]),
    "raw_file_without_the_schema_branches": (lambda run, t: run,
                                             lambda raw, ds, t: ["--data", str(raw["parquet"]), "--schema", "fcc-tau"],
                                             ["good.parquet: missing input branch/column(s)", "reco_cand_p4s"]),
    "raw_parquet_for_a_root_schema": (lambda run, t: run,
                                      lambda raw, ds, t: ["--data", str(raw["parquet"]), "--schema", "jetclass"],
                                      ["good.parquet: a parquet file, but schema jetclass reads root files"]),
    "raw_text_with_root_suffix": (lambda run, t: run, lambda raw, ds, t: ["--data", str(text_file(t / "notes.root")),
                                                                          "--schema", "jetclass"],
                                  ["notes.root: not a readable ROOT file"]),
    "shards_of_another_schema": (lambda run, t: run, lambda raw, ds, t: ["--data", str(other_schema_shards(t))],
                                 ["needs stored column(s)", "it has ['jet_pt', 'label_x']"]),
    "truncated_shard": (lambda run, t: run, lambda raw, ds, t: ["--data", str(broken_shards(ds, t))],
                        ["test/shard-000000.tar", "3000 bytes", "hepml data verify"]),
    "run_without_checkpoint": (lambda run, t: empty_run(t),
                               lambda raw, ds, t: ["--data", str(ds / "test")],
                               ["empty-run: no checkpoint found", "has the run saved one yet?"]),
    "run_missing": (lambda run, t: t / "no-run", lambda raw, ds, t: ["--data", str(ds / "test")],
                    ["no-run: no such run directory or checkpoint"]),
    "checkpoint_weights_corrupt": (lambda run, t: copy_run(run, t, lambda c: (
        c / "step-00000001" / "model.pt").write_bytes(b"\x00garbage")), lambda raw, ds, t: ["--data", str(ds / "test")],
                                   ["model.pt: not a readable model checkpoint", "use another checkpoint folder"]),
    "checkpoint_weights_truncated": (lambda run, t: copy_run(run, t, lambda c: truncated(
        c / "step-00000001" / "model.pt", 0.5)(c / "step-00000001" / "model.pt")),
                                     lambda raw, ds, t: ["--data", str(ds / "test")],
                                     ["model.pt: not a readable model checkpoint"]),
    "best_json_malformed": (lambda run, t: copy_run(run, t, lambda c: (c / "best.json").write_text("{step-1")),
                            lambda raw, ds, t: ["--data", str(ds / "test")],
                            ["best.json: unreadable (JSONDecodeError", "delete it to use the latest checkpoint"]),
    "best_json_outside_the_run": (lambda run, t: copy_run(run, t, lambda c: (c / "best.json").write_text(
        '{"checkpoint": "../../elsewhere"}')), lambda raw, ds, t: ["--data", str(ds / "test")],
                                  ["best.json: checkpoint '../../elsewhere' is not a folder name"]),
}


@pytest.mark.parametrize("case", PREDICT_CASES)
def test_predict_rejects_bad_inputs_and_runs(case, trained, raw, dataset, tmp_path):
    make_run, arguments, expected = PREDICT_CASES[case]
    run = make_run(trained, tmp_path)
    out_dir = tmp_path / "predictions"
    out_dir.mkdir()
    (out_dir / "scores.parquet").write_bytes(b"an earlier prediction")
    result = runner.invoke(app, ["predict", str(run), *arguments(raw, dataset, tmp_path),
                                 "--out", str(out_dir / "scores.parquet")])
    assert_clean_failure(result, expected)
    assert [p.name for p in out_dir.iterdir()] == ["scores.parquet"]  # no temporary file left
    assert (out_dir / "scores.parquet").read_bytes() == b"an earlier prediction"
