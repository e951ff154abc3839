"""All benchmarks in one command: loader, model and end-to-end training, ours against weaver-core's in the same run.

    python benchmarks/run.py                      # everything; writes benchmarks/results.md and prints it
    python benchmarks/run.py --quick              # short measurements (a smoke run, numbers are rough)
    python benchmarks/run.py --only train         # one of: loader, models, train
    python benchmarks/run.py --compile            # the model benchmark also times torch.compile (minutes more)

Each sub-benchmark is its own script (benchmarks/loader.py, models.py, train.py) run in a fresh process, so one
cannot warm or slow another. This script collects their numbers into one Markdown table (our figure, weaver-core's
figure, the ratio) plus the machine (CPU, cores, load average before and after: other jobs on the machine lower
every figure), then appends each sub-benchmark's own detailed table. On a GPU the sub-benchmarks run in bf16 and
report TFLOP/s and MFU; they are passed through here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def machine() -> dict[str, str]:
    """CPU model, cores, memory, GPU and library versions: the context every number needs."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": str(os.cpu_count()), "python": platform.python_version()}
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["memory"] = f"{pages * size / 2**30:.0f} GiB"
    except (ValueError, OSError, AttributeError):
        pass
    import torch

    info["torch"] = torch.__version__
    if torch.cuda.is_available():
        info["gpu"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}"
    try:
        import weaver  # noqa: F401
        from importlib.metadata import version

        info["weaver-core"] = version("weaver-core")
    except Exception:  # noqa: BLE001
        info["weaver-core"] = "not installed"
    return info


def run_script(name: str, args: list[str], log: Path) -> tuple[str, dict | list | None, float]:
    """Run benchmarks/<name>.py; (its stdout, its --json output if it offers one, seconds)."""
    script = HERE / f"{name}.py"
    help_text = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True).stdout
    json_path = None
    if "--json" in help_text:
        json_path = Path(tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".json")[1])
        args = [*args, "--json", str(json_path)]
    start = time.perf_counter()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, cwd=ROOT, env=env)
    seconds = time.perf_counter() - start
    log.write_text(done.stdout + "\n--- stderr ---\n" + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"benchmarks/{name}.py failed (exit {done.returncode}); its output is in {log}:\n"
                           + "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:]))
    data = None
    if json_path is not None:
        try:
            data = json.loads(json_path.read_text())
        except (OSError, json.JSONDecodeError):
            data = None
        json_path.unlink(missing_ok=True)
    return done.stdout, data, seconds


def markdown_tables(text: str) -> list[list[dict[str, str]]]:
    """Every Markdown table in `text`, as rows of {header: cell}."""
    tables, lines = [], text.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|[\s:|-]+\|$", lines[i + 1].strip()):
            header = [c.strip() for c in lines[i].strip().strip("|").split("|")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                rows.append(dict(zip(header, cells)))
                i += 1
            tables.append(rows)
        else:
            i += 1
    return tables


def number(text: str) -> float | None:
    found = re.search(r"-?[\d,]*\.?\d+", text or "")
    return float(found.group().replace(",", "")) if found else None


# ----------------------------------------------------------------------------------------------------------------------
# Summary rows: (benchmark, ours, theirs, unit, note)


def loader_rows(stdout: str, data) -> list[tuple]:
    rows = []
    for table in markdown_tables(stdout):
        for r in table:
            ours = next((number(v) for k, v in r.items() if k.startswith("hepml_dist jets/s")), None)
            theirs = next((number(v) for k, v in r.items() if k.startswith("weaver-core jets/s")), None)
            if ours is None or theirs is None:
                continue
            case = r.get("case", "loader")
            rows.append((f"loader: {case}, {r.get('workers', '?')} loader worker(s), batch {r.get('batch', '?')}",
                         ours, theirs, "jets/s", "ready tensors from shards vs weaver's loader from parquet"))
    return rows


def model_rows(stdout: str, data) -> list[tuple]:
    rows = []
    if not isinstance(data, list):
        return rows
    by_model: dict[str, dict[str, dict]] = {}
    for r in data:
        by_model.setdefault(r["model"], {})[r["implementation"]] = r
    for model, pair in by_model.items():
        ours, theirs = pair.get("hepml_dist"), pair.get("weaver-core")
        if not ours:
            continue
        note = f"forward+backward, batch {ours['batch']} x {ours['length']}, {ours['params']:,} parameters"
        if ours.get("tflops") is not None:
            mfu = f"{100 * ours['mfu']:.1f} %" if ours.get("mfu") else "n/a"
            note += f"; bf16 {ours['tflops']:.1f} TFLOP/s, MFU {mfu}"
            if theirs and theirs.get("mfu"):
                note += f" (weaver-core MFU {100 * theirs['mfu']:.1f} %)"
        rows.append((f"model: {model}", ours["jets_per_s"], theirs["jets_per_s"] if theirs else None, "jets/s", note))
        compiled = pair.get("hepml_dist compiled")
        if compiled:
            rows.append((f"model: {model}, training.compile: true", compiled["jets_per_s"],
                         theirs["jets_per_s"] if theirs else None, "jets/s",
                         f"torch.compile (inductor) / eager: {compiled['jets_per_s'] / ours['jets_per_s']:.2f}x"))
    return rows


def train_rows(stdout: str, data) -> list[tuple]:
    if not isinstance(data, dict):
        return []
    rows = []
    single = data.get("part_tau_id", {})
    if "hepml_dist" in single:
        rounds = [r for r in single.get("rounds", []) if r.get("weaver-core")]
        ours, theirs = single["hepml_dist"], single.get("weaver-core")
        if rounds:  # each round measured both, side by side: medians over the rounds
            ours, theirs = (statistics.median(r[k] for r in rounds) for k in ("hepml_dist", "weaver-core"))
        rows.append(("end to end: ParT tau ID, 1 process, all cores", ours, theirs, "jets/s",
                     "hepml train (Ray, 1 worker, shard loader) vs weaver train (parquet, same network)"
                     + (f"; medians of {len(rounds)} interleaved rounds" if rounds else "")))
    runs = data.get("multipartau", {})  # keyed "1", "2" (workers on one node) and "2 nodes"
    if "1" in runs and "2" in runs:
        one, two = runs["1"], runs["2"]
        rows.append(("end to end: demo job (MultiParTau quickstart), 1 worker x "
                     f"{one['threads_per_worker']} threads", one["jets_per_s"], None, "jets/s",
                     f"batch {one['batch_per_worker']} per worker"))
        rows.append((f"end to end: demo job, 2 DDP workers x {two['threads_per_worker']} thread",
                     two["jets_per_s"], None, "jets/s",
                     f"scaling 2 vs 1 worker: {two['jets_per_s'] / one['jets_per_s']:.2f}x"))
        if "2 nodes" in runs:
            nodes = runs["2 nodes"]
            rows.append(("end to end: demo job, 2 workers on 2 local Ray nodes", nodes["jets_per_s"], None, "jets/s",
                         f"scaling over 1 worker: {nodes['jets_per_s'] / one['jets_per_s']:.2f}x"))
        phases = two.get("startup_phases_s", {})
        rows.append(("start-up: `hepml train` invoked to first optimizer step done (2 workers)", two["startup_s"],
                     None, "s", "; ".join(f"{k} {v:.1f} s" for k, v in phases.items() if k != "total")
                     or "imports, embedded Ray, worker group, process group, model, first batch"))
    return rows


SUITES = {
    "loader": (loader_rows, {"quick": ["--quick"], "full": []}),
    "models": (model_rows, {"quick": ["--steps", "3", "--repeats", "2"], "full": []}),
    "train": (train_rows, {"quick": ["--events", "6000", "--steps", "40", "--weaver-steps", "10", "40"], "full": []}),
}


def render(info: dict, rows: list[tuple], details: dict[str, str], skipped: dict[str, str], load: tuple, seconds: float
           ) -> str:
    out = [f"# hepml_dist benchmarks ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC)", ""]
    out.append("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    out.append(f"load average (1 min) before / after: {load[0]:.1f} / {load[1]:.1f} on {info['cores']} cores; "
               f"the whole run took {seconds / 60:.1f} min. A load above the core count means other processes "
               "shared the machine: both sides of each row ran in the same conditions, interleaved or back to back, "
               "so the ratios are fairer than the absolute figures.")
    out += ["", "| benchmark | hepml_dist | weaver-core | ratio | unit | notes |", "|---|---:|---:|---:|---|---|"]
    for name, ours, theirs, unit, note in rows:
        fmt = (lambda v: f"{v:,.1f}") if unit == "s" else (lambda v: f"{v:,.0f}")
        ratio = f"{ours / theirs:.2f}x" if theirs else ""
        out.append(f"| {name} | {fmt(ours)} | {fmt(theirs) if theirs else '-'} | {ratio} | {unit} | {note} |")
    for name, reason in skipped.items():
        out.append(f"| {name} | - | - | | | not run: {reason} |")
    out.append("")
    out.append("ratio = hepml_dist / weaver-core: above 1 means we are faster.")
    for name, text in details.items():
        tables = [line for line in text.splitlines() if line.startswith("|") or not line.strip()]
        body = "\n".join(tables).strip()
        if body:
            out += ["", f"## {name} (benchmarks/{name}.py)", "", body]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short measurements: a smoke run, rough numbers")
    parser.add_argument("--only", choices=list(SUITES), action="append", help="run only these (repeatable)")
    parser.add_argument("--out", type=Path, default=HERE / "results.md", help="Markdown file to write")
    parser.add_argument("--compile", action="store_true",
                        help="the model benchmark also times our models under torch.compile (compiling takes minutes)")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    rows, details, skipped = [], {}, {}
    logs = Path(tempfile.mkdtemp(prefix="hepml-bench-logs-"))
    for name, (collect, modes) in SUITES.items():
        if args.only and name not in args.only:
            continue
        if not (HERE / f"{name}.py").is_file():
            skipped[name] = f"benchmarks/{name}.py is missing"
            continue
        print(f"[bench] {name} ...", flush=True)
        try:
            extra = ["--compile", "--warmup", "12"] if args.compile and name == "models" else []
            stdout, data, seconds = run_script(name, modes["quick" if args.quick else "full"] + extra,
                                               logs / f"{name}.log")
        except RuntimeError as err:
            print(err, file=sys.stderr)
            skipped[name] = f"failed, see {logs / (name + '.log')}"
            continue
        print(f"[bench] {name}: {seconds:.0f} s", flush=True)
        rows += collect(stdout, data)
        details[name] = stdout
    text = render(machine(), rows, details, skipped, (load_before, os.getloadavg()[0]), time.perf_counter() - start)
    tmp = args.out.with_name(f".{args.out.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, args.out)
    print(text)
    print(f"written to {args.out}")
    if skipped:
        sys.exit(1)


if __name__ == "__main__":
    main()
