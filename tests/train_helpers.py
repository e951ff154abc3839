"""Shared by the training-engine tests: small separable jet datasets written with the real shard writer, and a
tiny ParT job on them (a quickstart-like job sized for seconds on 2 CPU cores)."""

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import psutil
import pytest
import yaml

from hepml_dist.data.writer import DatasetWriter
from hepml_dist.runs import latest_checkpoint, read_state
from hepml_dist.track.tracker import read_metrics

MAX_PARTICLES = 12


def write_jet_dataset(out_dir: Path, examples: int = 3000, seed: int = 0, chunk_size: int = 128, chunks_per_shard: int = 2) -> Path:
    """Two classes of jets that a small model separates easily: signal jets have more, charged, wider-spread
    constituents. Also a per-jet regression target (the log of a jet property) and a tau-like `only_where` label."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, examples)
    n = np.where(label == 1, rng.integers(7, MAX_PARTICLES + 1, examples), rng.integers(2, 7, examples))
    slots = np.arange(MAX_PARTICLES)[None, :]
    real = slots < n[:, None]
    pt = rng.exponential(20.0, (examples, MAX_PARTICLES)).astype(np.float32) + 1.0
    spread = np.where(label == 1, 0.3, 0.1)[:, None]
    eta = rng.normal(0.0, 1.0, examples)[:, None] + rng.normal(0, 1, (examples, MAX_PARTICLES)) * spread
    phi = rng.uniform(-np.pi, np.pi, examples)[:, None] + rng.normal(0, 1, (examples, MAX_PARTICLES)) * spread
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    energy = np.sqrt(px**2 + py**2 + pz**2)
    charge = np.where(label[:, None] == 1, rng.choice([-1.0, 1.0], (examples, MAX_PARTICLES)), 0.0)
    pid = np.where(charge != 0, 211 * charge, 22).astype(np.int32)
    zero = np.zeros((examples, MAX_PARTICLES), np.float32)

    def pad(a):
        return np.where(real, a, 0).astype(np.float32)

    jet_px, jet_py, jet_pz, jet_e = (pad(a).sum(1) for a in (px, py, pz, energy))
    jet_pt = np.hypot(jet_px, jet_py)
    columns: dict[str, Any] = {
        "part_px": pad(px), "part_py": pad(py), "part_pz": pad(pz), "part_energy": pad(energy),
        "part_charge": pad(charge), "part_pid": np.where(real, pid, 0).astype(np.int32),
        "part_d0val": zero, "part_d0err": zero, "part_dzval": zero, "part_dzerr": zero,
        "part_n": n.astype(np.int32),
        "jet_pt": jet_pt.astype(np.float32), "jet_eta": np.arcsinh(jet_pz / np.maximum(jet_pt, 1e-3)).astype(np.float32),
        "jet_phi": np.arctan2(jet_py, jet_px).astype(np.float32), "jet_energy": jet_e.astype(np.float32),
        "jet_mass": np.sqrt(np.maximum(jet_e**2 - jet_pt**2 - jet_pz**2, 0)).astype(np.float32),
        "label_is_signal": label.astype(np.int64),
        "target_log_n": np.log(n).astype(np.float32),
    }
    with DatasetWriter(out_dir, schema="jets", splits=(0.7, 0.15, 0.15), seed=seed, chunk_size=chunk_size,
                       chunks_per_shard=chunks_per_shard) as writer:
        writer.add(columns)
    return out_dir


def tiny_job(data_dir: Path, **overrides: Any) -> dict[str, Any]:
    """A small ParT on `data_dir` with a classification and a regression task; nested overrides merge in."""
    job: dict[str, Any] = {
        "name": "tiny",
        "model": {
            "family": "part", "embed_dims": [16, 16], "pair_embed_dims": [8], "num_heads": 2, "num_layers": 1,
            "num_cls_layers": 1, "ffn_ratio": 2, "dropout": 0.1, "attn_dropout": 0.0, "activation_dropout": 0.0,
            "head": {"hidden": [16]},
            # ParT's random trimming counts warm-up calls in a plain attribute, which a checkpoint cannot restore;
            # off here so that resumed runs can be compared bit for bit with uninterrupted ones.
            "trim": False,
        },
        "tasks": [
            {"name": "is_signal", "kind": "binary", "label": "label_is_signal", "classes": ["bkg", "sig"], "loss": "ce"},
            {"name": "size", "kind": "regression", "targets": ["log_n"], "loss": "mse", "weight": 0.5},
        ],
        "data": {
            "train": str(data_dir / "train"), "val": str(data_dir / "val"), "test": str(data_dir / "test"),
            "inputs": {"features": "part_full", "max_length": MAX_PARTICLES},
            "batch_size": 32, "steps_per_epoch": 8, "val_steps": 4, "shuffle_buffer": 256, "loader_workers": 0,
        },
        "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01},
        "schedule": {"name": "cosine", "warmup_steps": 2, "final_ratio": 0.1},
        "training": {"epochs": 3, "eval_interval": 8, "log_interval": 4, "seed": 7},
        "parallel": {"num_workers": 1},
        "checkpoint": {"keep_last": 2, "keep_best_by": "val_is_signal_auc", "best_mode": "max"},
        "tracking": {"mode": "offline"},
        # `auto` would take the processes launcher here; these tests exercise Ray Train, the path every cluster run
        # takes. The processes launcher's own tests (test_process_workers.py) set theirs.
        "cluster": {"launcher": "ray"},
    }
    return merge(job, overrides)


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def write_job(path: Path, job: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def _spawned(rank: int, world: int, port: int, runs: list[dict[str, Any]], env: dict[str, str], setup=None) -> None:
    import os
    import shutil

    import torch
    import torch.distributed as dist

    os.environ.update(env)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    if setup is not None:
        setup(rank)  # e.g. a fault to inject in this rank (a module-level function of a test module)
    try:
        from hepml_dist.train.loop import train_loop_per_worker

        for run in runs:
            if rank == 0 and run.get("copy_from"):
                shutil.copytree(run["copy_from"], run["run_dir"])
                for folder in Path(run["run_dir"], "checkpoints").glob("step-*"):
                    if int(folder.name.split("-")[1]) > run["keep_until"]:
                        shutil.rmtree(folder)
            dist.barrier()
            train_loop_per_worker(run["config"])
    finally:
        dist.destroy_process_group()


def run_without_ray(runs: list[tuple[dict[str, Any], Path]] | list[dict[str, Any]], world: int = 2, setup=None) -> None:
    """Run the training loop in `world` plain gloo processes (no Ray), one run after the other in the same
    processes (imports paid once). A run is (job, run_dir), or a dict with `job`, `run_dir` and optionally
    `copy_from` + `keep_until`: start from a copy of another run with its checkpoints after that step removed."""
    import random

    import torch.multiprocessing as mp

    from hepml_dist.spec import parse_spec

    prepared = []
    for run in runs:
        run = {"job": run[0], "run_dir": run[1]} if isinstance(run, tuple) else dict(run)
        spec = parse_spec(run["job"])
        run["config"] = {"spec": spec.model_dump(mode="json"), "run_dir": str(run["run_dir"]), "plain_logs": True}
        run["run_dir"] = str(run["run_dir"])
        run.pop("job")
        prepared.append(run)
    env = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    mp.spawn(_spawned, args=(world, random.randint(20000, 40000), prepared, env, setup), nprocs=world, join=True)


def final_weights(run_dir: Path) -> dict[str, Any]:
    import torch

    from hepml_dist.runs import latest_checkpoint

    return torch.load(latest_checkpoint(run_dir) / "model.pt", weights_only=True)


def max_difference(a: dict[str, Any], b: dict[str, Any]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


@pytest.fixture(scope="session")
def ray_session():
    """One Ray instance for every Ray test of the session (starting Ray costs seconds)."""
    import os

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from hepml_dist.train.ray_setup import WORKER_SETUP_HOOK

    if not ray.is_initialized():
        # the worker set-up hook `hepml train` installs on its own Ray: without it, Ray's log monitor prints the
        # workers' per-report lines and the cleaner's warnings between later tests
        ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING",
                 runtime_env={"worker_process_setup_hook": WORKER_SETUP_HOOK})
    yield ray
    ray.shutdown()


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if any(r.get("step", 0) >= step for r in read_metrics(run_dir) if "train_loss" in r):
            return
        time.sleep(0.05)
    raise AssertionError(f"training did not reach step {step} (exit status {process.poll()})")


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def ctrl_c_at_step(command: list[str], run_dir: Path, log_path: Path, step: int = 4,
                   env: dict[str, str] | None = None) -> "Interrupted":
    """Runs `hepml train` in a session of its own, and at `step` sends SIGINT to the whole session, as a terminal's
    Ctrl-C signals its foreground group. Asserts what every launcher must do then: exit status 130, the "stopped
    by SIGINT ... to resume" line, and a checkpoint of that step marked stopped."""
    with log_path.open("w+") as log:
        train = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
        try:
            wait_for_step(run_dir, step, train)
            started = {p.pid: " ".join(p.cmdline()) for p in psutil.Process(train.pid).children(recursive=True)}
            os.killpg(train.pid, signal.SIGINT)
            rc = train.wait(timeout=60)
        finally:
            if train.poll() is None:
                os.killpg(train.pid, signal.SIGKILL)
        log.seek(0)
        output = log.read()
    assert rc == 130, output
    stopped = re.search(r"stopped by SIGINT at step (\d+) \(checkpoint written\); to resume: (.+)", output)
    assert stopped, output
    state = read_state(latest_checkpoint(run_dir))
    assert state["step"] == int(stopped.group(1)) >= step and state["stopped"] and not state["finished"]
    return Interrupted(output, started, state["step"], shlex.split(stopped.group(2)))


class Interrupted(NamedTuple):
    """What `ctrl_c_at_step` saw."""

    output: str
    started: dict[int, str]  # the processes the run had started: pid, command line
    step: int  # the step of the checkpoint written on the way out
    resume: list[str]  # the resume command printed


def left_running(started: dict[int, str], grace_s: float = 2.0) -> list[str]:
    """The command lines of `started` still running once they are all gone or `grace_s` has passed (0: now)."""
    deadline = time.monotonic() + grace_s
    while True:
        left = [command for pid, command in started.items() if alive(pid)]
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.2)
