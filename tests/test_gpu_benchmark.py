"""benchmarks/gpu.py --smoke: the one-call GPU benchmark runs end to end on a CPU (tiny models, few steps) and
writes a row for every section, so that the script still works when a GPU is finally lent for a few minutes."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("ParT JetClass", "MultiParTau")
PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed")


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """benchmarks/run.py's parser, loaded by path (benchmarks/ is not a package, and putting it on sys.path would
    let its `models` and `run` modules shadow others for the rest of the session)."""
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks/run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.markdown_tables(text)


def jets_per_s(row: dict[str, str]) -> float:
    return float(row["jets/s"].replace(",", ""))


def table_with(tables: list[list[dict[str, str]]], column: str) -> list[dict[str, str]]:
    found = [t for t in tables if t and column in t[0]]
    assert len(found) == 1, f"expected one table with a {column!r} column, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> tuple[str, list[list[dict[str, str]]]]:
    out = tmp_path_factory.mktemp("gpu-bench") / "results.md"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--smoke", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    text = out.read_text()
    assert "| model |" in done.stdout, "the tables are printed to stdout as well"
    return text, markdown_tables(text)


def test_file_starts_with_date_machine_command_and_total_time(results):
    text, _ = results
    head = text.splitlines()[:8]
    assert re.match(r"# GPU benchmark, \d{4}-\d\d-\d\d \d\d:\d\d UTC$", head[0])
    assert any(line.startswith("- machine: ") for line in head)
    assert any("benchmarks/gpu.py --smoke --out" in line for line in head if line.startswith("- command: "))
    assert any(re.match(r"- total time: \d+ s \(budget", line) for line in head)


def test_every_section_has_its_rows(results):
    _, tables = results
    env = {r["item"]: r["value"] for r in table_with(tables, "item")}
    assert {"torch", "device", "CUDA / HIP", "dense bf16/fp16 peak (MFU denominator)"} <= env.keys()

    train = {(r["model"], r["precision"], r["mode"]): r for r in table_with(tables, "SDPA backend")}
    for model in MODELS:
        for precision in PRECISIONS:
            eager = train[(model, precision, "eager")]
            assert jets_per_s(eager) > 0 and eager["SDPA backend"], eager
            assert (model, precision, "compiled") in train  # measured on a GPU; a row saying why on a CPU

    ddp = {r["processes"]: r for r in table_with(tables, "scaling efficiency")}
    assert jets_per_s(ddp["1"]) > 0 and jets_per_s(ddp["2"]) > 0
    assert ddp["2"]["backend"] == "gloo"

    zero = {r["stage"]: r for r in table_with(tables, "stage")}
    assert jets_per_s(zero["ZeRO-2"]) > 0 and jets_per_s(zero["ZeRO-3"]) > 0

    (loader,) = table_with(tables, "waiting for data")
    assert jets_per_s(loader) > 0
    assert re.fullmatch(r"[\d.]+ %", loader["waiting for data"])

    (launch,) = table_with(tables, "launcher")  # the smoke run: the processes launcher, 2 CPU workers
    assert launch["launcher"] == "processes" and launch["verdict"] == "finished at step 20", launch
    assert float(launch["start-up s"]) > 0 and "workers" in launch["phases"] and "ray" not in launch["phases"]


def test_rows_not_measured_say_why(results):
    _, tables = results
    for row in (r for table in tables for r in table if "jets/s" in r):
        if re.fullmatch(r"[\d,.]+", row["jets/s"]):
            continue
        assert row["jets/s"] == "skipped", f"a row failed: {row}"
        reason = row.get("note") or row.get("verdict") or ""
        assert reason.startswith("skipped: "), row
