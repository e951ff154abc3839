"""End-to-end training speed: `hepml train` (Ray, DDP, shard loader, the model, the optimizer) on generated fcc-tau
jets, and weaver-core's own trainer (`weaver`) on the same jets, in one run on one machine.

Measured:
  * start-up: from invoking `hepml train` to the end of the first optimizer step (Python imports, embedded Ray,
    the worker group and its process group, model, first batch), read from the run's metrics.jsonl, with the
    phases `hepml train` records itself (`startup/<phase>_s`, hepml_dist/train/startup.py), for each launcher
    in `--launchers` (`cluster.launcher`: Ray Train, or worker processes without Ray);
  * the demo job (jobs/multipartau-quickstart.yaml, 4 tasks) in jets/s with 1 worker using every core and with
    2 DDP workers of one core each, at the same per-worker batch;
  * ParT tau ID (one task, the quickstart's encoder), one process with every core: `hepml train` with 1 worker
    against `weaver` with weaver-core's ParticleTransformer of the same configuration, the same 17 candidate
    features and 4-vectors (computed by weaver's own `new_variables` from the same jets written as parquet), the
    same batch, AdamW, one loader worker each;
  * where each `hepml train` spends its training time (rank 0, steady state): in steps (forward, backward,
    all-reduce, optimizer), waiting for the loader, and the rest (`step_share`, `data_wait_share` of the log
    records, hepml_dist/train/step.py);
  * ParT tau ID end to end with each launcher in the same rounds;
  * the model alone: the same model, losses and the job's own optimizer step (gradient clipping, the optimizer,
    the learning-rate schedule) on the same batches (read into memory first), threads and batch size, with no
    loader, Ray or logging around it. End to end over model-only is what the service costs; the pair, and
    weaver-core next to it, is run `--rounds` times, interleaved, since this kind of machine drifts by up to 1.5x
    within minutes, in an order rotated from round to round (a run's speed also depends on what ran just before
    it); the median ratio is given with a bootstrap interval. Each round also runs the model alone
    with the optimizer alone (no clipping, no schedule: the baseline until 2026-12-05 08:00 UTC), for comparison;
  * where each millisecond of a ParT tau-ID step goes: rank 0's `training.profile` of its last 10 steps (outside
    the throughput window) next to the model alone's profile under the same phase labels;
  * peak resident memory of the driver, each training worker and its loader process (VmHWM, sampled);
  * the floor under the start-up: a fresh process to an empty train function of 2 CPU workers, with Ray Train's
    stock TorchTrainer and with the trainer `hepml train` uses (ray_train_floor);
  * the demo job with its 2 workers on two Ray nodes of one core each (a local two-raylet cluster,
    `hepml train --address`), against the same workers on one node.

Throughput is steady-state: for `hepml train`, jets between the end of step `--warmup` and the last step over the
wall time between them (metrics.jsonl times); for weaver, two runs of N1 and N2 steps and the difference of their
epoch times (weaver's own "avg. speed" line), so start-up cancels on both sides.

    python benchmarks/train.py                       # generates 20k events into a temporary folder
    python benchmarks/train.py --data data/fcc-tau --json train.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOG_INTERVAL = 10
PROFILE_STEPS = 10  # the last PROFILE_STEPS steps of a profiled run (outside its throughput window)
TIMEOUT_S = 1200  # per training run: a hung run (a worker killed from outside) must not hang the benchmark
QUICKSTART = ROOT / "jobs/multipartau-quickstart.yaml"
SINGLE_TASK = ROOT / "jobs/singlepartau-tauid.yaml"
# the quickstart encoder, for the single-task comparison (weaver-core's ParticleTransformer takes the same numbers)
SMALL_PART = {"embed_dims": [64, 128, 64], "pair_embed_dims": [32, 32], "num_heads": 4, "num_layers": 2,
              "num_cls_layers": 1, "head_hidden": 64, "head_dropout": 0.1}


def hepml(*args: str) -> list[str]:
    return [sys.executable, "-m", "hepml_dist", *args]


def ensure_data(path: Path | None, events: int, workdir: Path) -> Path:
    """The dataset at `path`; generated (`--events`) there if it has no manifest yet, or in `workdir` if no path."""
    if path is not None and (path / "manifest.json").exists():
        return path.resolve()
    out = path.resolve() if path is not None else workdir / "fcc-tau"
    print(f"generating {events} fcc-tau events into {out}", flush=True)
    subprocess.run(hepml("data", "generate", "fcc-tau", "--events", str(events), "--out", str(out), "--seed", "1"),
                   check=True, stdout=subprocess.DEVNULL)
    return out


def job_sets(data: Path, workers: int, threads: int, steps: int, batch: int, extra: list[str] = ()) -> list[str]:
    """The --set overrides of a benchmark run: a record every LOG_INTERVAL steps, no validation or checkpoint,
    CPU workers."""
    return [f"data.{s}={data / s}" for s in ("train", "val", "test")] + [
        # a record every LOG_INTERVAL steps: logging every step (TensorBoard, the plain line through Ray's log
        # monitor) costs a few per cent that no real job pays
        "training.epochs=null", f"training.steps={steps}", f"training.log_interval={LOG_INTERVAL}",
        f"training.eval_interval={10 * steps}", f"checkpoint.interval={10 * steps}", "tracking.mode=disabled",
        f"parallel.num_workers={workers}", f"parallel.cpus_per_worker={max(1, threads // workers)}",
        f"data.batch_size={batch}", "data.steps_per_epoch=null", "data.loader_workers=1",
        # CPU cores against weaver on the same cores (the single-task job extends the A100 multipartau.yaml)
        "parallel.accelerator=cpu", "parallel.gpus_per_worker=0", *extra,
    ]


def train_run(job: Path, data: Path, run_dir: Path, workers: int, threads: int, steps: int, batch: int,
              extra: list[str] = (), profile: bool = False, address: str | None = None) -> dict:
    """One `hepml train`: start-up, steady-state jets/s and where the training time went (rank 0's step, data
    wait and other shares, from metrics.jsonl; no validation), the peak memory of its processes, and with
    `profile` rank 0's milliseconds per phase over the last PROFILE_STEPS steps (training.profile)."""
    sets = job_sets(data, workers, threads, steps, batch, extra)
    if profile:
        sets += [f"training.profile.steps={PROFILE_STEPS}", f"training.profile.start_step={steps - PROFILE_STEPS + 1}"]
    shutil.rmtree(run_dir, ignore_errors=True)
    command = hepml("train", str(job), "--run-dir", str(run_dir), "--plain", *[a for s in sets for a in ("--set", s)],
                    *(["--address", address] if address else []))
    start = time.time()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}) as process:
        memory = PeakMemory(process.pid)
        try:
            stdout, stderr = process.communicate(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()  # its embedded Ray exits with it
            raise RuntimeError(f"hepml train did not finish in {TIMEOUT_S} s") from None
        finally:
            memory.stop()
    if process.returncode != 0:
        raise RuntimeError(f"hepml train failed:\n{stdout[-3000:]}\n{stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps_logged = [r for r in records if "jets_per_s" in r]
    if profile:  # the profiled steps run slower: out of the throughput window
        steps_logged = [r for r in steps_logged if r["step"] <= steps - PROFILE_STEPS]
    warm = steps_logged[min(len(steps_logged) - 2, max(2, len(steps_logged) // 5))]
    last = steps_logged[-1]
    global_batch = batch * workers
    startup = next((r for r in records if "startup/total_s" in r), {})  # the phases `hepml train` measured itself
    return {
        "workers": workers, "threads_per_worker": max(1, threads // workers), "batch_per_worker": batch,
        "steps": steps, "startup_s": steps_logged[0]["time"] - start,
        "startup_phases_s": {k.split("/")[1][:-2]: v for k, v in startup.items() if k.startswith("startup/")},
        "jets_per_s": (last["step"] - warm["step"]) * global_batch / (last["time"] - warm["time"]),
        **time_shares([r for r in steps_logged if r["step"] > warm["step"]]),
        "peak_rss_mib": memory.peaks(),
        **({"profile": json.loads((run_dir / "profile/rank0.json").read_text())} if profile else {}),
    }


class PeakMemory:
    """Peak resident memory (VmHWM) of `hepml train`'s driver, its training workers (Ray's `ray::RayTrainWorker`
    processes, or the children of the driver's fork server under `cluster.launcher: processes`) and their loader
    processes (children of a training worker), sampled every half second. Shared pages (the loader's batch slots,
    Ray's object store) count in every process that maps them."""

    def __init__(self, driver: int):
        self.driver, self.seen, self.servers = driver, {}, set()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()

    def _poll(self) -> None:
        while not self.done.wait(0.5):
            for status in Path("/proc").glob("[0-9]*/status"):
                try:
                    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
                    command = (status.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                except OSError:
                    continue
                pid = int(status.parent.name)
                forked = "multiprocessing.forkserver" in command  # the fork server, its workers and their loaders
                if pid == self.driver or command.startswith("ray::RayTrainWorker") or forked:
                    peak = int(fields.get("VmHWM", "0 kB").split()[0]) / 1024
                    parent = int(fields["PPid"])
                    self.seen[pid] = (max(peak, self.seen.get(pid, (0, 0))[0]), parent)
                    if forked and parent == self.driver:
                        self.servers.add(pid)

    def stop(self) -> None:
        self.done.set()
        self.thread.join()

    def peaks(self) -> dict[str, float]:
        workers = {pid for pid, (_, parent) in self.seen.items()
                   if pid != self.driver and pid not in self.servers and (parent not in self.seen or parent in self.servers)}
        loaders = {pid for pid, (_, parent) in self.seen.items() if parent in workers}
        top = lambda pids: round(max((self.seen[p][0] for p in pids), default=0.0))  # noqa: E731
        return {"driver": top({self.driver} & set(self.seen)), "worker": top(workers), "loader": top(loaders),
                "workers": len(workers)}


def time_shares(records: list[dict]) -> dict:
    """Mean shares of rank 0's training time over the steady-state log records (all of equal length: one step)."""
    if not records or "step_share" not in records[0]:
        return {}
    step = statistics.mean(r["step_share"] for r in records)
    wait = statistics.mean(r["data_wait_share"] for r in records)
    return {"step_share": step, "data_wait_share": wait, "other_share": max(0.0, 1.0 - step - wait)}


def shares(run: dict) -> str:
    if "step_share" not in run:
        return "no time shares"
    return (f"time in steps {run['step_share']:.0%}, waiting for data {run['data_wait_share']:.0%}, "
            f"other {run['other_share']:.0%}")


def model_only(job: Path, data: Path, threads: int, steps: int, batch: int, extra: list[str] = (),
               warmup: int = 10, bare: bool = False) -> dict:
    """jets/s of the same model, losses and optimizer step on the same batches, threads and batch size, with no
    service around it: the batches are read into memory first, then `steps` optimizer steps are timed (in a
    subprocess, so that its thread settings are its own). The optimizer step is the job's whole update: gradient
    clipping (optim.clip_grad_norm), the optimizer, the learning-rate schedule; `bare`: the optimizer alone, the
    baseline of the runs until 2026-12-05 08:00 UTC."""
    sets = job_sets(data, 1, threads, steps, batch, extra)
    command = [sys.executable, __file__, "--model-only", str(job), "--threads", str(threads), "--steps", str(steps),
               "--warmup", str(warmup), *(["--bare-optimizer"] if bare else []),
               *[a for s in sets for a in ("--set", s)]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
    if done.returncode != 0:
        raise RuntimeError(f"model-only run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def model_only_worker(job: str, sets: list[str], threads: int, steps: int, warmup: int, bare: bool) -> None:
    """Prints jets/s of `steps` forward + backward + optimizer steps on in-memory batches of the job's training
    split (see model_only)."""
    import itertools

    import torch

    from hepml_dist.data.loader import open_stream
    from hepml_dist.models import build_model, get_family
    from hepml_dist.spec import load_job
    from hepml_dist.train.optim import build_optimizer, build_scheduler
    from hepml_dist.train.profile import phase, summarize

    torch.set_num_threads(threads)
    spec = load_job(job, sets)
    torch.manual_seed(spec.training.seed)
    stream = open_stream(spec.data, "train", seed=spec.training.seed, training=True)
    batches = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in b.items()}
               for b in itertools.islice(stream.batches(0), warmup + steps)]
    model = build_model(spec).train()
    family = get_family(spec.model.family)
    optimizer = build_optimizer(model, spec.optim)  # the job's own (fused AdamW on CPU), as `hepml train` builds it
    scheduler = build_scheduler(optimizer, spec.schedule, warmup + steps + PROFILE_STEPS)
    params = [p for p in model.parameters() if p.requires_grad]
    clip = None if bare else spec.optim.clip_grad_norm

    def step(batch: dict) -> None:
        optimizer.zero_grad(set_to_none=True)
        with phase("forward"):
            outputs = model(batch)
        with phase("losses"):
            total = sum(family.losses(outputs, batch, spec).values())
        with phase("backward"):
            total.backward()
        with phase("optimizer"):
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            if not bare:
                scheduler.step()

    for i, batch in enumerate(batches):
        if i == warmup:
            start = time.perf_counter()
        step(batch)
    jets_per_s = sum(len(b["mask"]) for b in batches[warmup:]) / (time.perf_counter() - start)
    profiled = batches[-PROFILE_STEPS:]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        for batch in profiled:
            step(batch)
        wall = time.perf_counter() - start
    print(json.dumps({"jets_per_s": jets_per_s, "profile": summarize(profiler.key_averages(), wall, len(profiled), 1)}))


def ray_train_floor(kind: str) -> float:
    """Seconds from a fresh Python process's start to rank 0 entering a train function that does nothing: 2 CPU
    workers of a TorchTrainer on an embedded Ray started as `hepml train` starts it. What Ray Train itself costs
    before any of the job's code runs: `stock` is Ray Train's TorchTrainer, `hepml` the trainer `hepml train`
    uses (ray_workers._Trainer on an embedded Ray: no Ray Data callback, placement-group cleaner or autoscaling
    coordinator), with the imports of hepml_dist.train.launch."""
    done = subprocess.run([sys.executable, __file__, "--ray-floor", kind], capture_output=True, text=True,
                          timeout=TIMEOUT_S, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    if done.returncode != 0:
        raise RuntimeError(f"Ray Train floor ({kind}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["to_train_fn_s"]


def note_entry(config: dict) -> None:
    """The floor's train function: rank 0 notes when it was entered."""
    import ray.train

    if ray.train.get_context().get_world_rank() == 0:
        Path(config["path"]).write_text(str(time.time()))


def ray_train_floor_worker(kind: str) -> None:
    import psutil

    started = psutil.Process().create_time()
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer_class = TorchTrainer
    if kind == "hepml":
        from hepml_dist.train import ray_workers

        for name, value in ray_workers.EMBEDDED_RAY_ENV.items():
            os.environ.setdefault(name, value)
        trainer_class = functools.partial(ray_workers._Trainer, embedded=True)
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING",
             log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="hepml-ray-floor-") as tmp:
        entered = Path(tmp) / "entered"
        trainer_class(note_entry, train_loop_config={"path": str(entered)}, scaling_config=ScalingConfig(num_workers=2),
                      run_config=RunConfig(storage_path=tmp)).fit()
        print(json.dumps({"to_train_fn_s": float(entered.read_text()) - started}))
    ray.shutdown()


def memory(run: dict) -> str:
    peaks = run["peak_rss_mib"]
    return f"driver {peaks['driver']} MiB, worker {peaks['worker']} MiB, loader process {peaks['loader']} MiB"


def median_interval(values: list[float], resamples: int = 10000, seed: int = 0) -> tuple[float, float]:
    """A 95 % percentile-bootstrap interval of the median of `values` (rounds are independent draws of a machine
    whose speed drifts)."""
    draw = random.Random(seed)
    medians = sorted(statistics.median(draw.choices(values, k=len(values))) for _ in range(resamples))
    return medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def phase_table(service: dict, alone: dict) -> str:
    """Milliseconds per step in each phase: `hepml train`'s rank 0 (training.profile) next to the model alone."""
    lines = [f"{'phase':<12} {'hepml train ms':>15} {'model alone ms':>15}"]
    for name in [*service["phases_ms"], "rest"]:
        ours = service["rest_ms"] if name == "rest" else service["phases_ms"][name]
        theirs = alone["rest_ms"] if name == "rest" else alone["phases_ms"].get(name, 0.0)
        lines.append(f"{name:<12} {ours:>15.2f} {theirs:>15.2f}")
    lines.append(f"{'step':<12} {service['wall_ms']:>15.2f} {alone['wall_ms']:>15.2f}")
    return "\n".join(lines)


@contextlib.contextmanager
def two_node_ray(threads: int) -> Iterator[str]:
    """A Ray cluster of two nodes on this machine (two raylets, `threads // 2` CPUs each), run by a child process for
    the duration of the block; yields its GCS address for `hepml train --address`. It listens on this machine's own
    address, not 127.0.0.1: a driver joining "127.0.0.1:port" is sent to that address by Ray (2.60) anyway, and
    traffic to one's own address stays on the machine."""
    script = textwrap.dedent(f"""
        import sys
        from ray.cluster_utils import Cluster
        cluster = Cluster(initialize_head=True, head_node_args={{"num_cpus": {max(1, threads // 2)},
                          "include_dashboard": False}})
        cluster.add_node(num_cpus={max(1, threads // 2)})
        cluster.wait_for_nodes()
        print(cluster.address, flush=True)
        sys.stdin.read()  # until the benchmark closes our stdin
        cluster.shutdown()
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        address = child.stdout.readline().strip()
        if not address:
            raise RuntimeError("the two-node Ray cluster did not start")
        yield address
    finally:
        child.stdin.close()
        child.wait(timeout=120)


# ----------------------------------------------------------------------------------------------------------------------
# weaver-core on the same jets

WEAVER_DATA_CONFIG = """
selection: null
new_variables:
  # weaver pads the raw buffers of jagged arrays: columns read straight from a row range must be packed first
  part_px_: ak.to_packed(part_px)
  part_py_: ak.to_packed(part_py)
  part_pz_: ak.to_packed(part_pz)
  part_energy_: ak.to_packed(part_energy)
  part_charge_: ak.to_packed(part_charge)
  part_d0val_: ak.to_packed(part_d0val)
  part_d0err_: ak.to_packed(part_d0err)
  part_dzval_: ak.to_packed(part_dzval)
  part_dzerr_: ak.to_packed(part_dzerr)
  part_mask: ak.ones_like(part_energy_)
  part_pt: np.hypot(part_px, part_py)
  part_eta: np.arcsinh(part_pz / np.maximum(part_pt, 1e-8))
  part_phi: np.arctan2(part_py, part_px)
  part_abs_deta: np.abs(part_eta - jet_eta)
  part_abs_dphi: np.abs((part_phi - jet_phi + math.pi) % (2 * math.pi) - math.pi)
  part_logpt: np.log(np.maximum(part_pt, 1e-6))
  part_loge: np.log(np.maximum(part_energy, 1e-6))
  part_logptrel: np.log(np.maximum(part_pt / jet_pt, 1e-6))
  part_logerel: np.log(np.maximum(part_energy / jet_energy, 1e-6))
  part_dr: np.hypot(part_abs_deta, part_abs_dphi)
  part_is_electron: np.abs(part_pid) == 11
  part_is_muon: np.abs(part_pid) == 13
  part_is_photon: part_pid == 22
  part_is_chhad: (part_charge != 0) & (np.abs(part_pid) != 11) & (np.abs(part_pid) != 13)
  part_is_nhad: (part_charge == 0) & (part_pid != 22)
  label_tau: label_is_tau == 1
  label_jet: label_is_tau == 0
preprocess: {method: manual, data_fraction: 1}
inputs:
  pf_features:
    length: 20
    pad_mode: constant
    vars: [[part_abs_deta, null], [part_abs_dphi, null], [part_logpt, null], [part_loge, null],
           [part_logptrel, null], [part_logerel, null], [part_dr, null], [part_charge_, null],
           [part_is_electron, null], [part_is_muon, null], [part_is_photon, null], [part_is_chhad, null],
           [part_is_nhad, null], [part_dzval_, null], [part_dzerr_, null], [part_d0val_, null], [part_d0err_, null]]
  pf_vectors:
    length: 20
    pad_mode: constant
    vars: [[part_px_, null], [part_py_, null], [part_pz_, null], [part_energy_, null]]
  pf_mask:
    length: 20
    pad_mode: constant
    vars: [[part_mask, null]]
labels: {type: simple, value: [label_jet, label_tau]}
observers: []
"""

WEAVER_NETWORK = '''
"""weaver-core's ParticleTransformer with the quickstart encoder (benchmarks/train.py)."""
import torch
from weaver.nn.model.ParticleTransformer import ParticleTransformer

CONFIG = {config}


class Wrapper(torch.nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.mod = ParticleTransformer(**kwargs)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {{"mod.cls_token"}}

    def forward(self, features, vectors, mask):
        return self.mod(features, v=vectors, mask=mask)


def get_model(data_config, **kwargs):
    c = CONFIG
    model = Wrapper(input_dim=len(data_config.input_dicts["pf_features"]), num_classes=len(data_config.label_value),
                    pair_input_dim=4, embed_dims=c["embed_dims"], pair_embed_dims=c["pair_embed_dims"],
                    num_heads=c["num_heads"], num_layers=c["num_layers"], num_cls_layers=c["num_cls_layers"],
                    block_params=dict(dropout=0.0, attn_dropout=0.0, activation_dropout=0.0),
                    fc_params=[(c["head_hidden"], c["head_dropout"])], trim=True)
    info = {{"input_names": list(data_config.input_names), "output_names": ["softmax"],
            "input_shapes": {{k: ((1,) + s[1:]) for k, s in data_config.input_shapes.items()}},
            "dynamic_axes": {{**{{k: {{0: "N", 2: "n_" + k.split("_")[0]}} for k in data_config.input_names}},
                             "softmax": {{0: "N"}}}}}}
    return model, info


def get_loss(data_config, **kwargs):
    return torch.nn.CrossEntropyLoss()
'''


def write_parquet(data: Path, out: Path, max_jets: int) -> int:
    """The train split as one parquet file of jagged candidate arrays (weaver's input format)."""
    import awkward as ak
    import numpy as np

    from hepml_dist.evaluate.baseline import read_split

    jets = read_split(str(data / "train"), max_jets)
    jets["jet_energy"] = np.sqrt(jets["jet_pt"].astype(np.float64) ** 2 * np.cosh(jets["jet_eta"]) ** 2
                                 + jets["jet_mass"].astype(np.float64) ** 2).astype(np.float32)
    counts = jets["part_n"]
    mask = np.arange(jets["part_px"].shape[1])[None, :] < counts[:, None]
    table = {k: ak.unflatten(v[mask], counts) if k.startswith("part_") and v.ndim == 2 else v
             for k, v in jets.items() if k != "part_n"}
    ak.to_parquet(ak.zip(table, depth_limit=1), out, row_group_size=8192)
    return len(counts)


def weaver_run(parquet: Path, workdir: Path, steps: int, batch: int, threads: int) -> float:
    """Seconds weaver's training epoch of `steps` batches took (from its 'avg. speed' line)."""
    (workdir / "data.yaml").write_text(WEAVER_DATA_CONFIG)
    (workdir / "network.py").write_text(WEAVER_NETWORK.format(config=repr(SMALL_PART)))
    command = [
        sys.executable, "-m", "weaver.train", "--data-train", str(parquet), "--data-config", str(workdir / "data.yaml"),
        "--network-config", str(workdir / "network.py"), "--model-prefix", str(workdir / "model/net"),
        "--run-mode", "train", "--num-epochs", "1", "--steps-per-epoch", str(steps), "--batch-size", str(batch),
        "--gpus", "", "--num-workers", "1", "--fetch-step", "1", "--in-memory", "--train-val-split", "0.95", "--steps-per-epoch-val", "1",
        "--optimizer", "adamw", "--start-lr", "1e-3", "--log-file", str(workdir / "weaver.log"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=workdir, timeout=TIMEOUT_S)
    log = (workdir / "weaver.log").read_text() if (workdir / "weaver.log").is_file() else ""
    found = re.search(r"Processed (\d+) entries in total \(avg\. speed ([\d.]+) entries/s\)", log + done.stdout + done.stderr)
    if not found:
        raise RuntimeError(f"weaver did not report its speed:\n{(done.stdout + done.stderr)[-3000:]}")
    return int(found.group(1)) / float(found.group(2))


def weaver_rate(parquet: Path, workdir: Path, steps: tuple[int, int], batch: int, threads: int) -> float:
    """weaver-core's jets/s in its training loop: two runs of different lengths, so that start-up cancels."""
    seconds = []
    for n in steps:
        run_dir = workdir / f"weaver-{n}"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir()
        seconds.append(weaver_run(parquet, run_dir, n, batch, threads))
    return (steps[1] - steps[0]) * batch / (seconds[1] - seconds[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=None, help="fcc-tau dataset; generated there (--events) if it "
                        "has none yet (default: generated in the work directory)")
    parser.add_argument("--events", type=int, default=20000, help="events to generate when --data has no dataset")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="cores to use in total")
    parser.add_argument("--steps", type=int, default=120, help="optimizer steps per hepml run")
    parser.add_argument("--batch", type=int, default=256, help="jets per worker and step")
    parser.add_argument("--weaver-steps", type=int, nargs=2, default=(30, 130), help="the two weaver run lengths")
    parser.add_argument("--no-weaver", action="store_true", help="skip the weaver-core comparison")
    parser.add_argument("--no-two-nodes", action="store_true", help="skip the run across two local Ray nodes")
    parser.add_argument("--launchers", nargs="+", choices=("ray", "processes"), default=["ray", "processes"],
                        help="cluster.launcher values to measure (start-up, the demo job, ParT tau ID rounds)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="interleaved rounds of ParT tau ID: end to end, the model alone and weaver-core (the first "
                        "profiled)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--model-only", metavar="JOB", default=None, help=argparse.SUPPRESS)  # model_only()'s child
    parser.add_argument("--warmup", type=int, default=10, help=argparse.SUPPRESS)
    parser.add_argument("--set", action="append", default=[], help=argparse.SUPPRESS)
    parser.add_argument("--bare-optimizer", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ray-floor", choices=("stock", "hepml"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.ray_floor:
        ray_train_floor_worker(args.ray_floor)
        return
    if args.model_only:
        model_only_worker(args.model_only, args.set, args.threads, args.steps, args.warmup, args.bare_optimizer)
        return

    workdir = Path(tempfile.mkdtemp(prefix="hepml-bench-train-"))
    try:
        data = ensure_data(args.data, args.events, workdir)
        results: dict = {"threads": args.threads, "data": str(data)}
        runs = {}
        for launcher in args.launchers:  # keys: 1, 2 (Ray, as before), "processes 1", "processes 2"
            for workers in (1, 2):
                key = workers if launcher == "ray" else f"{launcher} {workers}"
                runs[key] = train_run(QUICKSTART, data, workdir / f"run-{launcher}-{workers}", workers, args.threads,
                                      args.steps, args.batch, [f"cluster.launcher={launcher}"])
                phases = ", ".join(f"{k} {v:.1f}" for k, v in runs[key]["startup_phases_s"].items())
                print(f"multipartau-quickstart, {workers} worker(s), launcher {launcher}: "
                      f"{runs[key]['jets_per_s']:.0f} jets/s, start-up {runs[key]['startup_s']:.1f} s ({phases} s), "
                      f"{shares(runs[key])}, peak RSS {memory(runs[key])}", flush=True)
        if "ray" in args.launchers:
            floors = {kind: ray_train_floor(kind) for kind in ("stock", "hepml")}
            results["ray_train_floor_s"] = floors
            print(f"Ray Train alone, 2 CPU workers, process start to an empty train function: stock TorchTrainer "
                  f"{floors['stock']:.1f} s, hepml's embedded trainer {floors['hepml']:.1f} s (hepml train to its "
                  f"first step: {runs[2]['startup_s']:.1f} s)", flush=True)
        if not args.no_two_nodes:
            with two_node_ray(args.threads) as address:
                runs["2 nodes"] = train_run(QUICKSTART, data, workdir / "run-2-nodes", 2, args.threads, args.steps,
                                            args.batch, address=address)
            print(f"multipartau-quickstart, 2 workers on 2 Ray nodes of {args.threads // 2} CPU: "
                  f"{runs['2 nodes']['jets_per_s']:.0f} jets/s, {shares(runs['2 nodes'])}, "
                  f"peak RSS {memory(runs['2 nodes'])}", flush=True)
        results["multipartau"] = {str(k): v for k, v in runs.items()}
        model_sets = [f"model.{k}={json.dumps(v)}" for k, v in SMALL_PART.items() if not k.startswith("head")] + [
            f"model.head.hidden=[{SMALL_PART['head_hidden']}]", f"model.head.dropout={SMALL_PART['head_dropout']}",
            "model.dropout=0.0", "model.attn_dropout=0.0", "model.activation_dropout=0.0", "training.precision=fp32",
            "optim.lr=1e-3",
        ]

        def single(launcher: str, profile: bool = False) -> dict:
            return train_run(SINGLE_TASK, data, workdir / f"run-single-{launcher}", 1, args.threads, args.steps,
                             args.batch, [*model_sets, f"cluster.launcher={launcher}"], profile=profile)

        first = args.launchers[0]  # its first run is profiled (training.profile) next to the model alone's profile
        ours = single(first, profile=True)
        alone = model_only(SINGLE_TASK, data, args.threads, args.steps, args.batch, model_sets)
        print(f"ParT tau ID, hepml train 1 worker, launcher {first}: {ours['jets_per_s']:.0f} jets/s, {shares(ours)}; "
              f"the model alone on the same batches: {alone['jets_per_s']:.0f} jets/s (end to end = "
              f"{ours['jets_per_s'] / alone['jets_per_s']:.0%} of it)", flush=True)
        print(phase_table(ours["profile"], alone["profile"]), flush=True)
        results["part_tau_id"] = {"launcher": first, "hepml_dist": ours["jets_per_s"], "model_only": alone["jets_per_s"],
                                  "profile": ours["profile"], "model_only_profile": alone["profile"],
                                  **{k: v for k, v in ours.items() if k.endswith("_share")}}
        weaver = None
        if not args.no_weaver:  # in every round, next to its pair: this machine drifts too much to compare across
            parquet = workdir / "train.parquet"
            write_parquet(data, parquet, (args.weaver_steps[1] + 10) * args.batch)
            weaver = lambda: weaver_rate(parquet, workdir, args.weaver_steps, args.batch, args.threads)  # noqa: E731
        # each round: end to end with each launcher, the model alone (both baselines), weaver-core; interleaved,
        # since this machine drifts by up to 1.5x in minutes, and in an order rotated from round to round, since a
        # run's speed also depends on what ran just before it
        measures = {launcher: functools.partial(lambda name: single(name)["jets_per_s"], launcher)
                    for launcher in args.launchers}
        measures["model_only"] = lambda: model_only(SINGLE_TASK, data, args.threads, args.steps, args.batch,
                                                    model_sets)["jets_per_s"]
        measures["model_only_bare"] = lambda: model_only(SINGLE_TASK, data, args.threads, args.steps, args.batch,
                                                         model_sets, bare=True)["jets_per_s"]
        if weaver:
            measures["weaver-core"] = weaver
        measured_first = {first: ours["jets_per_s"], "model_only": alone["jets_per_s"]}  # round 1's, above
        rounds = []
        for index in range(args.rounds):
            shift = index % len(measures)
            order = [*list(measures)[shift:], *list(measures)[:shift]]
            row = {name: measured_first[name] if index == 0 and name in measured_first else measures[name]()
                   for name in order}
            rounds.append({**row, "order": order})
        results["part_tau_id"]["rounds"] = rounds
        listed = lambda key: ", ".join(f"{r[key]:.0f}" for r in rounds)  # noqa: E731
        for launcher in args.launchers:
            for baseline, what in (("model_only", "model alone"), ("model_only_bare", "model alone, bare optimizer")):
                ratios = [r[launcher] / r[baseline] for r in rounds]
                low, high = median_interval(ratios)
                results["part_tau_id"][f"{launcher}/{baseline}"] = {"median": statistics.median(ratios),
                                                                     "interval_95": [low, high]}
                print(f"ParT tau ID, launcher {launcher}, end to end / {what} over {len(rounds)} interleaved "
                      f"round(s): {', '.join(f'{x:.0%}' for x in ratios)}; median {statistics.median(ratios):.1%} "
                      f"(95 % bootstrap interval {low:.1%}-{high:.1%}; {listed(launcher)} vs {listed(baseline)} "
                      "jets/s)", flush=True)
            if weaver:
                versus = [r[launcher] / r["weaver-core"] for r in rounds]
                print(f"ParT tau ID, launcher {launcher}, hepml train / weaver-core in the same rounds: "
                      f"{', '.join(f'{x:.2f}x' for x in versus)}; median {statistics.median(versus):.2f}x (weaver-core "
                      f"{listed('weaver-core')} jets/s)", flush=True)
        if weaver:
            results["part_tau_id"]["weaver-core"] = statistics.median(r["weaver-core"] for r in rounds)
        quick_alone = model_only(QUICKSTART, data, args.threads, args.steps, args.batch)["jets_per_s"]
        versus_alone = "; ".join(f"{key} worker end to end = {runs[key]['jets_per_s'] / quick_alone:.0%} of it"
                                 for key in (1, "processes 1") if key in runs)
        print(f"multipartau-quickstart, the model alone with {args.threads} threads: {quick_alone:.0f} jets/s "
              f"({versus_alone})", flush=True)
        results["multipartau_model_only"] = quick_alone
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
