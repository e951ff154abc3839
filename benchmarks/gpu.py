"""Every GPU check in one call: GPU time comes in short loans (15 minutes, usually one chip), so one prepared
script measures everything in at most 8 minutes and writes benchmarks/results-gpu.md.

Sections (each a Markdown table; whatever cannot run on this machine is a row saying why, never left out):
  env     torch, device name and count, CUDA/HIP, cuDNN, NCCL, the dense bf16/fp16 peak used for MFU;
  train   forward + backward + optimizer step of ParT (jobs/part-jetclass.yaml, 2.14M parameters, 128 particles,
          batch 512) and MultiParTau (jobs/multipartau.yaml, PCGrad as the job trains, batch 12288), in fp32,
          bf16-mixed and fp16-mixed (GradScaler), eager and compiled (`training.compile`, through the project's
          make_engine / compile_model): jets/s, MFU (FLOPs of the eager model's step from torch.utils.flop_counter
          x steps/s / peak), peak memory, and which SDPA kernel ran (read from a profiled forward);
  ddp     DDP over NCCL (RCCL on ROCm) with 1 and all visible GPUs, one spawned process each: jets/s, scaling;
  zero    DeepSpeed ZeRO-2 and ZeRO-3 on ParT through the project's make_engine, one rank;
  loader  ShardStream (open_stream) on a generated jet dataset feeding training steps: jets/s and the share of
          wall time spent waiting for the next batch;
  launch  `hepml train` of a tiny ParT on generated jets with each launcher (`cluster.launcher`: processes, one
          worker per GPU over NCCL/RCCL, up to 2; and ray), to its end: the start-up to the first optimizer step
          with its phases, and whether the run finished. The smoke run tries the processes launcher on 2 CPU workers.

Synthetic batches come from benchmarks/models.py (realistic jet-length spread), so the numbers are compute only,
except in the loader section. Every figure is taken after warm-up steps and with the device synchronised.
The compiled rows run last and only while the time budget (--budget-s) lasts: each compiles 3-4 graphs (ParT's
static-shape buckets) per precision, the largest and least predictable cost; a row the budget did not reach says
so, and `--only train` reruns that section alone.

    python benchmarks/gpu.py                        # GPU machine: every section -> benchmarks/results-gpu.md
    python benchmarks/gpu.py --only train zero --out /tmp/rerun.md   # rerun sections (into the default file,
                                                    # it would hold only those)
    python benchmarks/gpu.py --smoke                # tiny models, few steps: about a minute on 2 CPU cores; CI runs
                                                    # it (tests/test_gpu_benchmark.py) so the script cannot rot.
                                                    # Writes a temporary file unless --out is given: smoke figures
                                                    # never overwrite the GPU results.

On a GPU loan: `python benchmarks/gpu.py --smoke` first (about a minute there, catches a broken code path), then
`timeout 540 python benchmarks/gpu.py` (--budget-s 420 by default, imports included; a compiled configuration
started inside the budget may overrun it by a minute). The results file is rewritten after every section, so a run
stopped midway keeps what it measured; the tables are also printed to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import itertools
import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

START = time.perf_counter()  # the total time in the results includes the imports
HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # benchmarks/ is not a package: models.py (batches, peak table), run.py (machine)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before anything imports DeepSpeed, which probes for CUDA

from models import PEAK_BF16_TFLOPS, synchronize, synthetic_batch  # noqa: E402
from run import machine  # noqa: E402

from hepml_dist.models import build_model, get_family  # noqa: E402
from hepml_dist.spec import load_job, parse_spec  # noqa: E402
from hepml_dist.train.engine import make_engine  # noqa: E402

PRECISIONS = ("fp32", "bf16-mixed", "fp16-mixed")
COMPILE_ORDER = ("bf16-mixed", "fp16-mixed", "fp32")  # what a short budget should reach first
SETTLE_STEPS = 4  # compiled warm-up ends after this many steps without a new graph
TOTAL_STEPS = 10**6  # the schedule's length: long enough that the learning rate barely moves while timing
SMOKE_MODEL = ("model.embed_dims=[16,16]", "model.pair_embed_dims=[8]", "model.num_heads=2", "model.num_layers=1",
               "model.num_cls_layers=1", "model.head.hidden=[16]")
# DeepSpeed runs AdamW (jobs/part-jetclass-zero2.yaml does the same); the rest is the ParT JetClass job
ZERO_OVERRIDES = ("parallel.strategy=deepspeed", "parallel.num_workers=1", "optim.name=adamw")


@dataclass(frozen=True)
class ModelCase:
    label: str
    job: str
    batch: int
    length: int  # padded particles per jet
    mean_length: float  # mean real particles per jet of the synthetic batches


@dataclass(frozen=True)
class Plan:
    """Sizes and step counts of one run: the GPU run, or the tiny smoke run."""

    smoke: bool
    cases: tuple[ModelCase, ...]
    overrides: tuple[str, ...]  # --set-style overrides applied to every job
    warmup: int
    steps: int
    max_timed_s: float  # a configuration stops timing early past this (a slow fp32 row must not eat the budget)
    compile_warmup_max: int
    distinct_batches: int
    parallel_precision: str  # DDP and ZeRO rows: the same precision, so that they compare with each other
    loader_examples: int
    loader_batch: int
    loader_workers: int
    loader_warmup: int
    loader_steps: int
    budget_s: float


GPU_CASES = (ModelCase("ParT JetClass", "jobs/part-jetclass.yaml", 512, 128, 50.0),
             ModelCase("MultiParTau", "jobs/multipartau.yaml", 12288, 20, 9.0))
SMOKE_CASES = (ModelCase("ParT JetClass", "jobs/part-jetclass.yaml", 32, 16, 8.0),
               ModelCase("MultiParTau", "jobs/multipartau.yaml", 32, 16, 8.0))


def make_plan(args: argparse.Namespace) -> Plan:
    if args.smoke:
        plan = Plan(True, SMOKE_CASES, SMOKE_MODEL, warmup=2, steps=4, max_timed_s=5.0, compile_warmup_max=0,
                    distinct_batches=2, parallel_precision="bf16-mixed",
                    loader_examples=1200, loader_batch=32, loader_workers=1, loader_warmup=3, loader_steps=12,
                    budget_s=240.0)
    else:
        # eager warm-up past ParT's 5 untrimmed calls; ~1/3 of a second per ParT step at most, so 30 steps fit
        plan = Plan(False, GPU_CASES, (), warmup=8, steps=30, max_timed_s=10.0, compile_warmup_max=40,
                    distinct_batches=4, parallel_precision="bf16-mixed", loader_examples=60000, loader_batch=512,
                    loader_workers=2, loader_warmup=10, loader_steps=60, budget_s=420.0)
    changes = {k: v for k, v in (("budget_s", args.budget_s), ("steps", args.steps)) if v is not None}
    return replace(plan, **changes)


# ----------------------------------------------------------------------------------------------------------------------
# Output


class Table:
    """One Markdown table; rows are dicts keyed by column header (missing cells stay empty)."""

    def __init__(self, title: str, columns: list[str], notes: str = ""):
        self.title, self.columns, self.notes = title, columns, notes
        self.rows: list[dict[str, str]] = []

    def add(self, cells: dict[str, object]) -> dict[str, object]:
        self.rows.append(dict(cells))
        return self.rows[-1]

    def markdown(self) -> str:
        def cell(value: object) -> str:
            return str(value).replace("|", "/").replace("\n", " ")

        lines = [f"## {self.title}", ""] + ([self.notes, ""] if self.notes else [])
        lines.append("| " + " | ".join(self.columns) + " |")
        lines.append("|" + "---|" * len(self.columns))
        lines += ["| " + " | ".join(cell(r.get(c, "")) for c in self.columns) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"


class Clock:
    def __init__(self, budget_s: float):
        self.start, self.budget_s = START, budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.budget_s - self.elapsed()


def command_line() -> str:
    env = [f"{k}={shlex.quote(os.environ[k])}" for k in ("CUDA_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
                                                          "DS_ACCELERATOR", "OMP_NUM_THREADS") if k in os.environ]
    return " ".join([*env, "python", shlex.join(sys.argv)])


def document(tables: list[Table], clock: Clock, info: dict[str, str], done: bool) -> str:
    where = info.get("gpu") or "no GPU"
    state = "" if done else " so far (incomplete: a section is still running or the run was stopped)"
    head = [
        f"# GPU benchmark, {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}", "",
        f"- machine: {platform.node()}: {where}; CPU {info['cpu']}, {info['cores']} cores, "
        f"{info.get('memory', '?')} memory",
        f"- command: `{command_line()}`",
        f"- total time: {clock.elapsed():.0f} s{state} (budget {clock.budget_s:.0f} s)", "",
    ]
    return "\n".join(head) + "\n" + "\n".join(t.markdown() for t in tables)


def fmt(value: float | None, digits: int = 0, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}{unit}"


def rate(jets_per_s: float) -> str:
    return fmt(jets_per_s) if jets_per_s >= 100 else f"{jets_per_s:.3g}"  # small smoke figures stay nonzero


def short_error(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[-1] if text else ''}"[:200]


# ----------------------------------------------------------------------------------------------------------------------
# Device helpers


def peak_tflops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> str:
    if device.type != "cuda":
        return "n/a (CPU)"
    return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


# ----------------------------------------------------------------------------------------------------------------------
# Training steps through the project's engine


def to_device(batch: dict, device: torch.device) -> dict:
    """As the training loop moves a batch (hepml_dist.evaluate.loop.to_device, not imported: it pulls in
    scikit-learn, seconds more start-up for every spawned DDP rank)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def job_spec(case: ModelCase, plan: Plan, *extra: str):
    return load_job(ROOT / case.job, [*plan.overrides, f"data.batch_size={case.batch}",
                                      f"data.inputs.max_length={case.length}", *extra])


def device_batches(spec, case: ModelCase, count: int, device: torch.device, seed: int = 0) -> list[dict]:
    # a few batches, reused: generating 512 x 128 jets on the host every step would time the generator
    return [to_device(synthetic_batch(spec, case.batch, case.length, case.mean_length, seed=seed + i), device)
            for i in range(count)]


def make_step(engine, spec):
    """One optimizer step as the training loop runs it (engine forward, family losses, backward, step), without
    the loop's logging and loss checks."""
    losses_of = get_family(spec.model.family).losses
    engine.model.train()
    counter = itertools.count()

    def step(batch: dict) -> None:
        losses = losses_of(engine.forward(batch), batch, spec)
        engine.backward(losses, last_micro_batch=True)
        engine.step(next(counter))

    return step


def warm_up(step, batches: list[dict], device: torch.device, minimum: int, maximum: int, compiled: bool) -> int:
    """Untimed steps: `minimum`, and for a compiled model more until SETTLE_STEPS steps in a row compiled no new
    graph (every shape bucket of the random trimming has been seen), `maximum` at most. Returns the steps run."""
    done, quiet, graphs = 0, 0, unique_graphs()
    while done < minimum or (compiled and quiet < SETTLE_STEPS and done < maximum):
        step(batches[done % len(batches)])
        done += 1
        now = unique_graphs()
        quiet, graphs = (quiet + 1 if now == graphs else 0), now
    synchronize(device)
    return done


def timed(step, batches: list[dict], device: torch.device, steps: int, max_s: float) -> tuple[int, float]:
    """(steps run, seconds): `steps`, or fewer once `max_s` has passed."""
    synchronize(device)
    start = time.perf_counter()
    done = 0
    while done < steps:
        step(batches[done % len(batches)])
        done += 1
        if time.perf_counter() - start > max_s:
            break
    synchronize(device)
    return done, time.perf_counter() - start


def count_flops(step, batches: list[dict], count: int = 2) -> float:
    """FLOPs of one optimizer step, averaged over `count` steps (random trimming varies the lengths)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        for batch in batches[:count]:
            step(batch)
    return counter.get_total_flops() / min(count, len(batches))


# SDPA's fused kernels, by the aten op that dispatches them and by substrings of their GPU kernel names
SDPA_OPS = {"_scaled_dot_product_cudnn_attention": "cudnn",
            "_scaled_dot_product_flash_attention": "flash",
            "_scaled_dot_product_efficient_attention": "mem-efficient",
            "_scaled_dot_product_attention_math": "math fallback",
            "_scaled_dot_product_fused_attention_overrideable": "fused (vendor)"}
SDPA_KERNELS = {"flash_fwd": "flash", "fmha_cutlass": "mem-efficient", "efficient_attention": "mem-efficient",
                "aotriton": "mem-efficient/flash (aotriton)", "attn_fwd": "mem-efficient/flash (aotriton)",
                "cudnn_generated_fort_native_sdpa": "cudnn", "sdpa": "cudnn"}


def classify_sdpa(names: list[str], device: torch.device) -> str:
    """'kind xN' per SDPA op the forward called (N calls), plus the first fused GPU kernel name seen."""
    ops = Counter(n.removeprefix("aten::") for n in names
                  if n.startswith("aten::_scaled_dot_product") or n.removeprefix("aten::") in SDPA_OPS)
    if device.type != "cuda":
        return "cpu: " + ", ".join(f"{op} x{n}" for op, n in sorted(ops.items())) if ops else "cpu"
    kinds = Counter()
    for op, n in ops.items():
        kinds[SDPA_OPS.get(op, op)] += n
    kernels = sorted({n for n in names if not n.startswith("aten::") and any(k in n for k in SDPA_KERNELS)})
    for kind in {SDPA_KERNELS[k] for n in kernels for k in SDPA_KERNELS if k in n} - set(kinds):
        kinds[kind] += 0  # a kernel without its aten op (a compiled graph calls kernels directly)
    text = " + ".join(f"{kind} x{n}" if n else kind for kind, n in sorted(kinds.items())) or "none seen"
    return text + (f" ({kernels[0][:48]})" if kernels else "")


def sdpa_backend(engine, batch: dict, device: torch.device) -> str:
    """Which SDPA kernels a training-mode forward runs, from the profiler's op and kernel names."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        engine.forward(batch)
        synchronize(device)
    return classify_sdpa([e.name for e in prof.events()], device)


@dataclass
class Measured:
    jets_per_s: float
    step_ms: float
    memory: str
    note: str = ""


def measure(step, batches: list[dict], device: torch.device, plan: Plan, batch_size: int, compiled: bool) -> Measured:
    reset_memory(device)
    graphs = unique_graphs()
    warm = warm_up(step, batches, device, plan.warmup, max(plan.compile_warmup_max, plan.warmup), compiled)
    settled = unique_graphs()
    done, seconds = timed(step, batches, device, plan.steps, plan.max_timed_s)
    note = f"{done} steps timed after {warm} warm-up"
    if compiled:
        note += f", {settled - graphs} graphs compiled"
        if unique_graphs() != settled:
            note += "; RECOMPILED while timing: figure too low"
    return Measured(batch_size * done / seconds, 1000 * seconds / done, peak_memory(device), note)


# ----------------------------------------------------------------------------------------------------------------------
# Section: environment


def env_section(device: torch.device, plan: Plan, args: argparse.Namespace, info: dict[str, str]) -> Table:
    table = Table("Environment", ["item", "value"])
    rows = {"torch": torch.__version__, "python": platform.python_version(),
            "host CPU": f"{info['cpu']}, {info['cores']} cores"}
    if device.type == "cuda":
        rows["device"] = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(device)}"
        rows["CUDA / HIP"] = f"HIP {torch.version.hip}" if torch.version.hip else f"CUDA {torch.version.cuda}"
        rows["cuDNN"] = str(torch.backends.cudnn.version())
        with contextlib.suppress(Exception):
            nccl = torch.cuda.nccl.version()  # a tuple, an int in older torch
            rows["NCCL / RCCL"] = ".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl)
    else:
        rows["device"] = "CPU (no GPU visible)"
        built = torch.version.cuda or torch.version.hip
        rows["CUDA / HIP"] = f"{built} (no device)" if built else "n/a (torch built without it)"
    peak = peak_tflops(device, args.peak_tflops)
    if peak:
        rows["dense bf16/fp16 peak (MFU denominator)"] = f"{peak:,.1f} TFLOP/s"
    elif device.type == "cuda":
        rows["dense bf16/fp16 peak (MFU denominator)"] = "n/a: GPU not in models.PEAK_BF16_TFLOPS; pass --peak-tflops"
    else:
        rows["dense bf16/fp16 peak (MFU denominator)"] = "n/a (CPU)"
    rows["fp32 matmul precision"] = f"{torch.get_float32_matmul_precision()} (TF32 off unless 'high')"
    with contextlib.suppress(Exception):
        from importlib.metadata import version

        rows["deepspeed"] = version("deepspeed")
    rows["run"] = ("smoke: tiny models, few steps; figures only show the code paths work" if plan.smoke
                   else f"full: {plan.steps} timed steps per configuration at most")
    for key, value in rows.items():
        table.add({"item": key, "value": value})
    return table


# ----------------------------------------------------------------------------------------------------------------------
# Section: training throughput on one device

TRAIN_COLUMNS = ["model", "precision", "mode", "batch x length", "jets/s", "step ms", "TFLOP/s", "MFU", "peak memory",
                 "SDPA backend", "note"]


def train_table(plan: Plan) -> tuple[Table, dict[tuple, dict]]:
    """The table with a placeholder row per configuration (filled as they run, in any order)."""
    notes = ("Forward + backward + optimizer step through hepml_dist.train.engine.make_engine (the job's optimizer; "
             "MultiParTau with the job's PCGrad), synthetic jets (benchmarks/models.py). MFU: FLOPs of the eager "
             "model's step (torch.utils.flop_counter; the compiled rows reuse it) x steps/s / the dense bf16/fp16 "
             "peak, for fp32 rows too. SDPA backend: the attention ops of one profiled training-mode forward, with call counts; "
             "a compiled graph may replace some attention with inductor's own kernels, which it does not count.")
    table = Table("Training throughput, one device", TRAIN_COLUMNS, notes)
    rows = {}
    for case in plan.cases:
        for precision in PRECISIONS:
            for mode in ("eager", "compiled"):
                rows[(case.label, precision, mode)] = table.add({
                    "model": case.label, "precision": precision, "mode": mode,
                    "batch x length": f"{case.batch} x {case.length}", "jets/s": "skipped",
                    "note": "not run"})
    return table, rows


def train_config(case: ModelCase, precision: str, compiled: bool, plan: Plan, device: torch.device,
                 flops: dict, peak: float | None) -> dict[str, str]:
    spec = job_spec(case, plan, f"training.precision={precision}", f"training.compile={str(compiled).lower()}")
    if compiled:
        torch._dynamo.reset()  # each configuration compiles afresh, and the recompile limit counts from zero
    torch.manual_seed(0)
    module = build_model(spec)
    engine = make_engine(module, spec, device, total_steps=TOTAL_STEPS)
    batches = device_batches(spec, case, plan.distinct_batches, device)
    step = make_step(engine, spec)
    result = measure(step, batches, device, plan, case.batch, compiled)
    key = (case.label, precision)
    if not compiled and key not in flops:
        flops[key] = count_flops(step, batches)
    backend = sdpa_backend(engine, batches[0], device)
    cells = {"jets/s": rate(result.jets_per_s), "step ms": fmt(result.step_ms, 1), "peak memory": result.memory,
             "SDPA backend": backend, "note": result.note}
    if key in flops:
        tflops = flops[key] * 1000 / result.step_ms / 1e12
        cells["TFLOP/s"] = f"{tflops:.3g}"
        cells["MFU"] = fmt(100 * tflops / peak, 1, " %") if peak else "n/a"
    params = sum(p.numel() for p in module.parameters())
    cells["note"] = f"{params / 1e6:.2f}M params; " + cells["note"]
    return cells


def run_train_config(rows: dict, case: ModelCase, precision: str, compiled: bool, plan: Plan, device: torch.device,
                     flops: dict, peak: float | None) -> None:
    row = rows[(case.label, precision, "compiled" if compiled else "eager")]
    start = time.perf_counter()
    try:
        row.update(train_config(case, precision, compiled, plan, device, flops, peak))
    except Exception as error:  # noqa: BLE001 - one failing configuration must not cost the rest of the GPU run
        traceback.print_exc()
        row.update({"jets/s": "error", "note": short_error(error)})
    reset_memory(device)  # out here, not in `finally`: an exception in flight still holds the model's tensors
    print(f"[gpu.py]   {case.label} {precision} {'compiled' if compiled else 'eager'}: {row['jets/s']} jets/s "
          f"({time.perf_counter() - start:.1f} s)", flush=True)


def train_eager(rows: dict, plan: Plan, device: torch.device, flops: dict, peak: float | None, clock: Clock) -> None:
    for case in plan.cases:
        for precision in PRECISIONS:
            if clock.left() < 10:
                rows[(case.label, precision, "eager")]["note"] = "skipped: time budget spent"
                continue
            run_train_config(rows, case, precision, False, plan, device, flops, peak)


def train_compiled(rows: dict, plan: Plan, device: torch.device, flops: dict, peak: float | None,
                   clock: Clock) -> None:
    """Compiled configurations, the budget permitting: each starts only when the time left covers what the last
    compiled run of that model took (a first guess before any has run)."""
    if plan.smoke:
        for key, row in rows.items():
            if key[2] == "compiled":
                row["note"] = "skipped: --smoke (torch.compile takes minutes per graph on a CPU)"
        return
    estimate = {case.label: 60.0 + 15.0 * (case.length // 16) for case in plan.cases}  # a guess until measured
    for precision in COMPILE_ORDER:
        for case in plan.cases:
            row = rows[(case.label, precision, "compiled")]
            if clock.left() < estimate[case.label]:
                row["note"] = (f"skipped: time budget ({clock.left():.0f} s left, ~{estimate[case.label]:.0f} s "
                               "needed); rerun with --only train")
                continue
            start = time.perf_counter()
            run_train_config(rows, case, precision, True, plan, device, flops, peak)
            estimate[case.label] = max(time.perf_counter() - start, 30.0)  # a quick failure proves nothing


# ----------------------------------------------------------------------------------------------------------------------
# Section: DDP over NCCL / gloo, one spawned process per device


def ddp_worker(rank: int, world: int, port: int, plan: Plan, device_type: str, result_path: str) -> None:
    """One DDP rank: the project's engine (DDP wrapper for world > 1) on this rank's own synthetic batches."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    cuda = device_type == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)  # ranks share the cores
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    try:
        case = plan.cases[0]
        spec = job_spec(case, plan, f"training.precision={plan.parallel_precision}")
        torch.manual_seed(0)
        engine = make_engine(build_model(spec), spec, device, total_steps=TOTAL_STEPS)
        batches = device_batches(spec, case, plan.distinct_batches, device, seed=1000 * rank)
        step = make_step(engine, spec)
        warm_up(step, batches, device, plan.warmup, plan.warmup, False)
        dist.barrier()
        start = time.perf_counter()
        done, _ = timed(step, batches, device, plan.steps, math.inf)  # no time cap: ranks must run the same steps
        dist.barrier()  # the slowest rank sets the pace
        seconds = time.perf_counter() - start
        if rank == 0:
            result = {"jets_per_s": world * case.batch * done / seconds, "steps": done, "memory": peak_memory(device)}
            Path(result_path).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def spawn_ddp(world: int, plan: Plan, device: torch.device) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "rank0.json"
        mp.spawn(ddp_worker, args=(world, free_port(), plan, device.type, str(result)), nprocs=world, join=True)
        return json.loads(result.read_text())


def ddp_section(plan: Plan, device: torch.device, clock: Clock) -> Table:
    case = plan.cases[0]
    gpu = device.type == "cuda"
    backend = ("RCCL" if torch.version.hip else "NCCL") if gpu else "gloo"
    notes = (f"{case.label} through make_engine (the DDP wrapper when more than one rank), one spawned process "
             "(torch.multiprocessing) per rank, each on its own synthetic batches."
             + ("" if gpu else " On CPU, gloo ranks of one thread each exercise the code path: not a scaling figure."))
    table = Table("DDP, one process per device", ["processes", "backend", "model", "batch per rank", "precision",
                                                   "jets/s", "scaling efficiency", "note"], notes)
    world_all = torch.cuda.device_count() if gpu else 2
    base = {"backend": backend, "model": case.label, "batch per rank": case.batch, "precision": plan.parallel_precision}
    single = None
    for world in sorted({1, world_all}):
        row = table.add({**base, "processes": world})
        result = ddp_run(row, world, plan, device, clock)
        if result and world == 1:
            single = result
        elif result and single:
            row["scaling efficiency"] = fmt(100 * result / (world * single), 1, " %")
    if gpu and world_all < 2:
        table.add({**base, "processes": "2+", "jets/s": "skipped",
                   "note": f"skipped: {world_all} GPU visible, scaling needs 2 or more"})
    if not gpu:
        table.add({**base, "processes": "all GPUs", "backend": "NCCL / RCCL", "jets/s": "skipped",
                   "note": "skipped: no GPU here (NCCL needs one per rank); the gloo rows run the same code"})
    return table


def ddp_run(row: dict, world: int, plan: Plan, device: torch.device, clock: Clock) -> float | None:
    """Fill `row` with a `world`-rank run; its jets/s, or None when it did not run."""
    if clock.left() < 20:
        row.update({"jets/s": "skipped", "note": "skipped: time budget spent"})
        return None
    try:
        result = spawn_ddp(world, plan, device)
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        row.update({"jets/s": "error", "note": short_error(error)})
        return None
    note = f"{result['steps']} steps timed; rank 0 peak memory {result['memory']}"
    row.update({"jets/s": rate(result["jets_per_s"]),
                "note": note + ("; one rank: the engine adds no DDP wrapper" if world == 1 else "")})
    return result["jets_per_s"]


# ----------------------------------------------------------------------------------------------------------------------
# Section: DeepSpeed ZeRO-2 / ZeRO-3, one rank


@contextlib.contextmanager
def single_rank_group(device: torch.device):
    """A one-rank process group (DeepSpeed needs one): NCCL on a GPU, gloo on the CPU."""
    env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def zero_stage(stage: int, plan: Plan, device: torch.device) -> dict[str, str]:
    case = plan.cases[0]
    spec = job_spec(case, plan, *ZERO_OVERRIDES, f"parallel.zero_stage={stage}",
                    f"training.precision={plan.parallel_precision}")
    torch.manual_seed(0)
    engine = make_engine(build_model(spec), spec, device, total_steps=TOTAL_STEPS)
    try:
        batches = device_batches(spec, case, plan.distinct_batches, device)
        result = measure(make_step(engine, spec), batches, device, plan, case.batch, compiled=False)
    finally:
        with contextlib.suppress(Exception):
            engine.engine.destroy()  # drops ZeRO-3's parameter hooks and partitions
    return {"jets/s": rate(result.jets_per_s), "step ms": fmt(result.step_ms, 1), "peak memory": result.memory,
            "note": result.note}


def zero_section(plan: Plan, device: torch.device, clock: Clock) -> Table:
    case = plan.cases[0]
    table = Table("DeepSpeed ZeRO, one rank", ["stage", "model", "batch", "precision", "jets/s", "step ms",
                                               "peak memory", "note"],
                  f"{case.label} through make_engine -> make_deepspeed_engine (AdamW, torch's implementation), "
                  "one rank: ZeRO's sharding saves nothing here, the rows show its per-step overhead.")
    rows = {s: table.add({"stage": f"ZeRO-{s}", "model": case.label, "batch": case.batch,
                          "precision": plan.parallel_precision, "jets/s": "skipped"}) for s in (2, 3)}
    try:
        with single_rank_group(device):
            for stage, row in rows.items():
                if clock.left() < 20:
                    row["note"] = "skipped: time budget spent"
                    continue
                try:
                    row.update(zero_stage(stage, plan, device))
                except Exception as error:  # noqa: BLE001
                    traceback.print_exc()
                    row.update({"jets/s": "error", "note": short_error(error)})
                reset_memory(device)
    except Exception as error:  # noqa: BLE001 - no process group: both rows say why
        traceback.print_exc()
        for row in rows.values():
            row.update({"jets/s": "error", "note": f"process group: {short_error(error)}"})
    return table


# ----------------------------------------------------------------------------------------------------------------------
# Section: the loader feeding training steps


def loader_spec(data_dir: Path, plan: Plan, device: torch.device):
    sys.path.insert(0, str(ROOT / "tests"))  # the test suite's jet dataset and tiny job
    from train_helpers import tiny_job

    model = {} if plan.smoke else load_job(ROOT / "jobs/part-jetclass.yaml").model.model_dump(mode="json")
    precision = "bf16-mixed" if device.type == "cuda" else "fp32"
    job = tiny_job(data_dir, model=model, training={"precision": precision}, tracking={"mode": "disabled"},
                   data={"batch_size": plan.loader_batch, "loader_workers": plan.loader_workers,
                         "steps_per_epoch": plan.loader_warmup + plan.loader_steps, "shuffle_buffer": 4096})
    return parse_spec(job)


def feed(stream, step, device: torch.device, warmup: int) -> tuple[int, float, float]:
    """(jets, seconds waiting for batches, seconds in all) after `warmup` batches (loader workers starting)."""
    batches = stream.batches(0)
    try:
        for _ in range(warmup):
            step(to_device(next(batches), device))
        synchronize(device)
        jets, waited, start = 0, 0.0, time.perf_counter()
        while True:
            asked = time.perf_counter()
            batch = next(batches, None)
            if batch is None:
                break
            waited += time.perf_counter() - asked
            batch = to_device(batch, device)
            jets += int(batch["mask"].shape[0])
            step(batch)
            # the training loop synchronises every step (its loss checks), so the device idles while we wait
            synchronize(device)
        return jets, waited, time.perf_counter() - start
    finally:
        batches.close()  # stops the loader workers


def loader_section(plan: Plan, device: torch.device, clock: Clock) -> Table:
    table = Table("Loader feeding training steps", ["data", "model", "loader workers", "batch", "steps", "jets/s",
                                                     "waiting for data", "verdict"],
                  "tests/train_helpers.write_jet_dataset jets (up to 12 particles, 17 part_full features) read by "
                  "open_stream (ShardStream, loader worker processes), each batch moved to the device and trained on.")
    model = "tiny ParT" if plan.smoke else "ParT JetClass"
    row = table.add({"data": f"{plan.loader_examples:,} generated jets", "model": model,
                     "loader workers": plan.loader_workers, "batch": plan.loader_batch, "steps": plan.loader_steps,
                     "jets/s": "skipped"})
    if clock.left() < 20:
        row["verdict"] = "skipped: time budget spent"
        return table
    try:
        row.update(loader_run(plan, device))
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        row.update({"jets/s": "error", "verdict": short_error(error)})
    return table


def loader_run(plan: Plan, device: torch.device) -> dict[str, str]:
    from hepml_dist.data.loader import open_stream

    sys.path.insert(0, str(ROOT / "tests"))
    from train_helpers import write_jet_dataset

    with tempfile.TemporaryDirectory(prefix="hepml-gpu-bench-") as tmp:
        data_dir = write_jet_dataset(Path(tmp) / "data", examples=plan.loader_examples, chunk_size=512,
                                     chunks_per_shard=4)
        spec = loader_spec(data_dir, plan, device)
        torch.manual_seed(0)
        engine = make_engine(build_model(spec), spec, device, total_steps=TOTAL_STEPS)
        stream = open_stream(spec.data, "train", seed=0)
        jets, waited, seconds = feed(stream, make_step(engine, spec), device, plan.loader_warmup)
    share = waited / seconds
    who = "the GPU" if device.type == "cuda" else "the training step (CPU run)"
    verdict = f"{who} waits for data" if share > 0.10 else "the loader keeps up"
    return {"jets/s": rate(jets / seconds), "waiting for data": fmt(100 * share, 1, " %"), "verdict": verdict}


LAUNCH_STEPS = 20


def launch_section(plan: Plan, device: torch.device, clock: Clock) -> Table:
    table = Table("hepml train with each launcher", ["launcher", "workers", "device", "steps", "start-up s", "phases",
                                                     "verdict"],
                  "`hepml train` in a subprocess: a tiny ParT on tests/train_helpers.write_jet_dataset jets, "
                  f"{LAUNCH_STEPS} optimizer steps; the start-up is the run's own `startup` record "
                  "(hepml_dist/train/startup.py), from the process start to the end of the first optimizer step.")
    on_gpu = device.type == "cuda"
    workers = max(1, min(torch.cuda.device_count(), 2)) if on_gpu else 2
    launchers = ("processes",) if plan.smoke else ("processes", "ray")
    sys.path.insert(0, str(ROOT / "tests"))
    from train_helpers import write_jet_dataset

    with tempfile.TemporaryDirectory(prefix="hepml-gpu-launch-") as tmp:
        data_dir = write_jet_dataset(Path(tmp) / "data", examples=2000)
        for launcher in launchers:
            row = table.add({"launcher": launcher, "workers": workers, "device": device.type, "steps": LAUNCH_STEPS,
                             "start-up s": "skipped"})
            if clock.left() < 45:
                row["verdict"] = "skipped: time budget spent"
                continue
            try:
                row.update(launch_run(launcher, workers, on_gpu, data_dir, Path(tmp) / f"run-{launcher}"))
            except Exception as error:  # noqa: BLE001
                traceback.print_exc()
                row.update({"start-up s": "error", "verdict": short_error(error)})
    return table


def launch_run(launcher: str, workers: int, on_gpu: bool, data_dir: Path, run_dir: Path) -> dict[str, str]:
    from train_helpers import tiny_job, write_job

    from hepml_dist.run_files import latest_checkpoint, read_state

    # a list of one vendor's types places workers on any GPU of that vendor (an H200 is neither A100 nor H100)
    accelerators = (["MI250X", "MI300X"] if torch.version.hip else ["A100", "H100"]) if on_gpu else "cpu"
    job = tiny_job(data_dir, training={"epochs": None, "steps": LAUNCH_STEPS, "eval_interval": LAUNCH_STEPS,
                                       "log_interval": 5},
                   data={"loader_workers": 1}, tracking={"mode": "disabled"}, cluster={"launcher": launcher},
                   parallel={"num_workers": workers, "gpus_per_worker": 1 if on_gpu else 0,
                             "cpus_per_worker": 1, "accelerator": accelerators})
    path = write_job(run_dir.parent / f"{launcher}.yaml", job)
    done = subprocess.run([sys.executable, "-m", "hepml_dist", "train", str(path), "--run-dir", str(run_dir),
                           "--plain"], capture_output=True, text=True, timeout=240)
    if done.returncode != 0:
        raise RuntimeError(f"hepml train exited {done.returncode}: {(done.stdout + done.stderr)[-1500:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    startup = next(r for r in records if "startup/total_s" in r)
    phases = ", ".join(f"{k.split('/')[1][:-2]} {v:.1f}" for k, v in startup.items()
                       if k.startswith("startup/") and k != "startup/total_s")
    state = read_state(latest_checkpoint(run_dir))
    verdict = f"finished at step {state['step']}" if state.get("finished") else f"ended at step {state['step']}"
    return {"start-up s": fmt(startup["startup/total_s"], 1), "phases": phases, "verdict": verdict}


# ----------------------------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny models and few steps (CI, or a GPU pre-flight)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results file (default: benchmarks/results-gpu.md; --smoke: a temporary file)")
    parser.add_argument("--only", nargs="+", choices=["train", "ddp", "zero", "loader", "launch"], default=None,
                        help="run only these sections (the environment is always written)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-time budget; compiled rows run last, while it lasts (default 420, smoke 240)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per configuration (default 30, smoke 4)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU, for a GPU not in "
                        "models.PEAK_BF16_TFLOPS")
    return parser.parse_args()


def output_path(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return args.out
    if args.smoke:  # never overwrite the committed GPU results with smoke figures
        return Path(tempfile.mkstemp(prefix="results-gpu-smoke-", suffix=".md")[1])
    return HERE / "results-gpu.md"


def main() -> None:
    args = parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.smoke:
        sys.exit("gpu.py: no GPU visible; the full run needs one (use --smoke for the tiny CPU run)")
    plan = make_plan(args)
    out = output_path(args)
    clock = Clock(plan.budget_s)
    info = machine()
    peak = peak_tflops(device, args.peak_tflops)
    wanted = set(args.only or ["train", "ddp", "zero", "loader", "launch"])
    tables = [env_section(device, plan, args, info)]

    def save(done: bool = False) -> None:  # after every section: a run stopped midway keeps what it measured
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(document(tables, clock, info, done))

    def section(name: str, run) -> None:
        start = time.perf_counter()
        print(f"[gpu.py] {name} ...", flush=True)
        result = run()
        if isinstance(result, Table):
            tables.append(result)
        print(f"[gpu.py] {name}: {time.perf_counter() - start:.1f} s (total {clock.elapsed():.0f} s, "
              f"{clock.left():.0f} s of budget left)", flush=True)
        save()

    flops: dict = {}
    rows: dict = {}
    if "train" in wanted:
        table, rows = train_table(plan)
        tables.append(table)
        section("train, eager", lambda: train_eager(rows, plan, device, flops, peak, clock))
    for name, run in (("ddp", ddp_section), ("zero", zero_section), ("loader", loader_section),
                      ("launch", launch_section)):
        if name in wanted:
            section(name, lambda run=run: run(plan, device, clock))
    if "train" in wanted:
        section("train, compiled", lambda: train_compiled(rows, plan, device, flops, peak, clock))
    save(done=True)
    print()
    print(out.read_text())
    print(f"[gpu.py] wrote {out}")


if __name__ == "__main__":
    main()
