"""Loader benchmark: jets/s delivered as ready tensors, hepml_dist's ShardStream vs weaver-core's own loader.

Both loaders read the same synthetic jets: weaver-core (`weaver.utils.dataset.SimpleIterDataset` in a torch
DataLoader, as `weaver/train.py` builds it) from the parquet files, with a weaver data-config YAML that builds
the same inputs; hepml_dist from shards converted from those parquet files. Two cases:

  (a) FCC tau jets, 20 candidates, the 17 MultiParTau candidate features + 4-vectors + mask;
  (b) JetClass-like jets, 128 particles, ParT's 17 "full" features (standardised, clipped) + 4-vectors + mask.

Each loader runs with 1 and 2 DataLoader workers; after a warm-up, the batches delivered in a fixed time are
counted (the data are looped, so files are in the page cache for both). Run:

    python benchmarks/loader.py                    # full run, prints a Markdown table
    python benchmarks/loader.py --quick            # small smoke run
"""

from __future__ import annotations

import argparse
import gc
import logging
import multiprocessing
import os
import resource
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import yaml

TAU_FEATURES = 17


def synthetic_jets(n: int, max_particles: int, mean_particles: float, rng: np.random.Generator, jetclass: bool):
    """Flat-column jets as awkward arrays (lists per jet), pT-ordered, with labels."""
    import awkward as ak

    counts = np.clip(rng.poisson(mean_particles, n), 1, max_particles)
    total = int(counts.sum())
    pt = rng.exponential(8.0, total).astype(np.float32) + 0.3
    eta = rng.normal(0, 0.2, total).astype(np.float32)
    phi = rng.normal(0, 0.2, total).astype(np.float32)
    order = np.lexsort((-pt, np.repeat(np.arange(n), counts)))
    pt, eta, phi = pt[order], eta[order], phi[order]
    kind = rng.integers(0, 5, total)
    charge = np.where(kind == 0, rng.choice([-1.0, 1.0], total), 0.0).astype(np.float32)
    charged = charge != 0
    columns = {
        "part_px": pt * np.cos(phi), "part_py": pt * np.sin(phi), "part_pz": pt * np.sinh(eta),
        "part_energy": pt * np.cosh(eta), "part_charge": charge,
        "part_pid": np.choose(kind, [211, 130, 22, 11, 13]).astype(np.int32),
        "part_d0val": np.where(charged, rng.normal(0, 0.05, total), 0).astype(np.float32),
        "part_d0err": np.where(charged, rng.uniform(0, 0.05, total), 0).astype(np.float32),
        "part_dzval": np.where(charged, rng.normal(0, 0.05, total), 0).astype(np.float32),
        "part_dzerr": np.where(charged, rng.uniform(0, 0.05, total), 0).astype(np.float32),
    }
    out = {k: ak.unflatten(v.astype(np.float32) if k != "part_pid" else v, counts) for k, v in columns.items()}
    px, py, pz, e = (np.asarray(ak.sum(out[k], axis=1)) for k in ("part_px", "part_py", "part_pz", "part_energy"))
    jet_pt = np.hypot(px, py)
    jet_eta = np.arcsinh(pz / jet_pt)
    jet_phi = np.arctan2(py, px)
    out.update(jet_pt=jet_pt.astype(np.float32), jet_eta=jet_eta.astype(np.float32),
               jet_phi=jet_phi.astype(np.float32), jet_energy=e.astype(np.float32))
    if jetclass:
        out["jet_sdmass"] = rng.uniform(20, 300, n).astype(np.float32)
        # JetClass inputs the way weaver's JetClass_full.yaml reads them
        part_eta = np.arcsinh(out["part_pz"] / np.hypot(out["part_px"], out["part_py"]))
        part_phi = np.arctan2(out["part_py"], out["part_px"])
        sign = np.where(jet_eta < 0, -1.0, 1.0).astype(np.float32)
        out["part_deta"] = (part_eta - jet_eta) * sign
        out["part_dphi"] = (part_phi - jet_phi + np.pi) % (2 * np.pi) - np.pi
        for flag, code in (("part_isChargedHadron", 211), ("part_isNeutralHadron", 130), ("part_isPhoton", 22),
                           ("part_isElectron", 11), ("part_isMuon", 13)):
            out[flag] = ak.values_astype(abs(out["part_pid"]) == code, np.float32)
        label = rng.integers(0, 10, n)
        for i in range(10):
            out[f"label_{i}"] = (label == i).astype(np.float32)
        out["jet_label"] = label.astype(np.int64)
    else:
        out["label_is_tau"] = rng.integers(0, 2, n).astype(np.int64)
    return out


def write_parquet(directory: Path, files: int, jets_per_file: int, **kwargs) -> list[str]:
    import awkward as ak

    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(1)
    for i in range(files):
        columns = synthetic_jets(jets_per_file, rng=rng, **kwargs)
        path = directory / f"part-{i:03d}.parquet"
        ak.to_parquet(ak.zip(columns, depth_limit=1), path, row_group_size=10000)
        paths.append(str(path))
    return paths


PARTICLE_COLUMNS = ["part_px", "part_py", "part_pz", "part_energy", "part_charge", "part_pid", "part_d0val",
                    "part_d0err", "part_dzval", "part_dzerr"]


def bench_schema(name: str, max_length: int, label: str):
    from hepml_dist.data.convert import Schema

    columns = {c: c for c in PARTICLE_COLUMNS}
    columns["part_pid"] = {"expr": "part_pid", "dtype": "int32"}
    scalars = {c: c for c in ("jet_pt", "jet_eta", "jet_phi", "jet_energy")}
    scalars[label] = "jet_label" if label == "label_jet_class" else label
    return Schema.model_validate({"name": name, "format": "parquet",
                                  "jagged": [{"count": "part_n", "max_length": max_length, "columns": columns}],
                                  "columns": scalars})


def weaver_config(path: Path, case: str) -> str:
    """A weaver data-config YAML producing the same inputs as hepml_dist's feature set for the case."""
    if case == "tau":
        length = 20
        new = {
            "part_mask": "ak.ones_like(part_energy)",
            "part_pt": "np.hypot(part_px, part_py)",
            "part_eta": "np.arcsinh(part_pz / np.maximum(part_pt, 1e-8))",
            "part_phi": "np.arctan2(part_py, part_px)",
            "part_abs_deta": "np.abs(part_eta - jet_eta)",
            "part_abs_dphi": "np.abs((part_phi - jet_phi + np.pi) % (2 * np.pi) - np.pi)",
            "part_log_pt": "np.log(np.maximum(part_pt, 1e-6))",
            "part_log_e": "np.log(np.maximum(part_energy, 1e-6))",
            "part_log_ptrel": "np.log(np.maximum(part_pt / jet_pt, 1e-6))",
            "part_log_erel": "np.log(np.maximum(part_energy / jet_energy, 1e-6))",
            "part_dr": "np.hypot(part_abs_deta, part_abs_dphi)",
            "part_isElectron": "(np.abs(part_pid) == 11) * 1.0",
            "part_isMuon": "(np.abs(part_pid) == 13) * 1.0",
            "part_isPhoton": "(part_pid == 22) * 1.0",
            "part_isChargedHadron": "((part_charge != 0) & (np.abs(part_pid) != 11) & (np.abs(part_pid) != 13)) * 1.0",
            "part_isNeutralHadron": "(part_pid == 130) * 1.0",
        }
        features = ["part_abs_deta", "part_abs_dphi", "part_log_pt", "part_log_e", "part_log_ptrel",
                    "part_log_erel", "part_dr", "part_charge", "part_isElectron", "part_isMuon", "part_isPhoton",
                    "part_isChargedHadron", "part_isNeutralHadron", "part_dzval", "part_dzerr", "part_d0val",
                    "part_d0err"]
        feature_vars = [[f, None] for f in features]
        labels = {"type": "custom", "value": {"truth_label": "label_is_tau"}}
        pad = "constant"
    else:  # data/JetClass/JetClass_full.yaml of jet-universe/particle_transformer 2925bdb
        length = 128
        new = {
            "part_mask": "ak.ones_like(part_energy)",
            "part_pt": "np.hypot(part_px, part_py)",
            "part_pt_log": "np.log(part_pt)",
            "part_e_log": "np.log(part_energy)",
            "part_logptrel": "np.log(part_pt/jet_pt)",
            "part_logerel": "np.log(part_energy/jet_energy)",
            "part_deltaR": "np.hypot(part_deta, part_dphi)",
            "part_d0": "np.tanh(part_d0val)",
            "part_dz": "np.tanh(part_dzval)",
        }
        feature_vars = [["part_pt_log", 1.7, 0.7], ["part_e_log", 2.0, 0.7], ["part_logptrel", -4.7, 0.7],
                        ["part_logerel", -4.7, 0.7], ["part_deltaR", 0.2, 4.0], ["part_charge", None],
                        ["part_isChargedHadron", None], ["part_isNeutralHadron", None], ["part_isPhoton", None],
                        ["part_isElectron", None], ["part_isMuon", None], ["part_d0", None],
                        ["part_d0err", 0, 1, 0, 1], ["part_dz", None], ["part_dzerr", 0, 1, 0, 1],
                        ["part_deta", None], ["part_dphi", None]]
        labels = {"type": "simple", "value": [f"label_{i}" for i in range(10)]}
        pad = "wrap"
    config = {
        "selection": None,
        "new_variables": new,
        "preprocess": {"method": "manual", "data_fraction": 0.5},
        "inputs": {
            "pf_features": {"length": length, "pad_mode": pad, "vars": feature_vars},
            "pf_vectors": {"length": length, "pad_mode": pad,
                           "vars": [["part_px", None], ["part_py", None], ["part_pz", None], ["part_energy", None]]},
            "pf_mask": {"length": length, "pad_mode": "constant", "vars": [["part_mask", None]]},
        },
        "labels": labels,
        "observers": ["jet_pt", "jet_eta"],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def _workers_cpu() -> float:
    """CPU seconds used so far by this process's live child processes (the DataLoader workers), from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for child in multiprocessing.active_children():
        try:
            fields = Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, IndexError):
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def _main_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(make_batches, seconds: float, warmup: int = 5) -> tuple[float, float, float]:
    """(jets/s wall clock, jets per loader-worker CPU second, jets per main-process CPU second), steady state.

    After `warmup` batches (workers started, first files read), batches are counted for about `seconds`.
    CPU time of the workers is read from /proc before and after, so it is not distorted by other processes
    competing for the cores the way wall-clock time is.
    """
    gc.collect()
    batches = make_batches()
    iterator = iter(batches)
    for _ in range(warmup):
        next(iterator)
    workers, main, start = _workers_cpu(), _main_cpu(), time.perf_counter()
    jets = 0
    while time.perf_counter() - start < seconds:
        jets += _batch_len(next(iterator))
    wall = time.perf_counter() - start
    workers, main = _workers_cpu() - workers, _main_cpu() - main
    if hasattr(batches, "close"):
        batches.close()  # our generator: shuts its DataLoader down
    del iterator, batches
    gc.collect()
    return jets / wall, jets / max(workers, 1e-9), jets / max(main, 1e-9)


def _batch_len(batch) -> int:
    if isinstance(batch, dict):
        return len(batch["mask"])
    inputs = batch[0]
    return len(next(iter(inputs.values())))


def hepml_batches(split_dir: Path, features: str, max_length: int, batch_size: int, workers: int):
    """A generator of ready batches (dicts of tensors) from hepml_dist's ShardStream."""
    from hepml_dist.data.stream import ShardStream
    from hepml_dist.spec.data import DataSpec

    spec = DataSpec(train=str(split_dir), batch_size=batch_size, loader_workers=workers, shuffle_buffer=16384,
                    steps_per_epoch=10**7, inputs={"features": features, "max_length": max_length})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stream = ShardStream(spec, "train", rank=0, world_size=1, seed=0)
    return stream.batches(0)


def weaver_batches(files: list[str], config: str, batch_size: int, workers: int):
    """weaver-core's training loader, built as weaver/train.py builds it (fetch whole files, infinity mode)."""
    import torch
    from weaver.utils.dataset import SimpleIterDataset

    dataset = SimpleIterDataset({"_": files}, config, batch_size=batch_size, for_training=True,
                                fetch_by_files=True, fetch_step=1, infinity_mode=True, name="train")
    return iter(torch.utils.data.DataLoader(dataset, batch_size=batch_size, drop_last=True, pin_memory=False,
                                            num_workers=workers, persistent_workers=False,
                                            prefetch_factor=2 if workers else None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small data and short measurements (smoke test)")
    parser.add_argument("--seconds", type=float, default=8.0, help="measurement time per row")
    parser.add_argument("--workers", default="1,2", help="DataLoader worker counts to compare")
    parser.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed after)")
    parser.add_argument("--only", choices=["tau", "jetclass"], default=None)
    args = parser.parse_args()
    logging.getLogger("weaver").setLevel(logging.WARNING)
    logging.disable(logging.INFO)

    from hepml_dist.data.convert import convert

    work = Path(args.dir or tempfile.mkdtemp(prefix="hepml-loader-bench-"))
    seconds = 2.0 if args.quick else args.seconds
    scale = 0.1 if args.quick else 1.0
    workers = [int(w) for w in args.workers.split(",")]
    cases = {
        "tau": dict(title="(a) tau jets, 20 candidates", files=4, jets=int(100_000 * scale), max_particles=20,
                    mean=12, jetclass=False, features="tau_cand", length=20, batch=2048, label="label_is_tau"),
        "jetclass": dict(title="(b) JetClass-like, 128 particles", files=4, jets=int(15_000 * scale),
                         max_particles=128, mean=40, jetclass=True, features="part_full", length=128, batch=512,
                         label="label_jet_class"),
    }
    rows = []
    try:
        for key, case in cases.items():
            if args.only and key != args.only:
                continue
            files = write_parquet(work / key / "parquet", case["files"], case["jets"], max_particles=case["max_particles"],
                                  mean_particles=case["mean"], jetclass=case["jetclass"])
            start = time.perf_counter()
            manifest = convert(files, work / key / "shards", bench_schema(key, case["length"], case["label"]),
                               splits=(1.0, 0.0, 0.0), shard_size=16384, chunk_size=1024, workers=0, overwrite=True)
            convert_rate = manifest.splits["train"].examples / (time.perf_counter() - start)
            config = weaver_config(work / key / "weaver.yaml", key)
            shards = work / key / "shards" / "train"
            for w in workers:
                ours = measure(lambda: hepml_batches(shards, case["features"], case["length"], case["batch"], w),
                               seconds)
                theirs = measure(lambda: weaver_batches(files, config, case["batch"], w), seconds)
                rows.append((case["title"], w, case["batch"], ours, theirs, convert_rate))
                print(f"{case['title']}, {w} worker(s): hepml {ours[0]:,.0f} jets/s ({ours[1]:,.0f} per worker "
                      f"CPU s), weaver {theirs[0]:,.0f} jets/s ({theirs[1]:,.0f} per worker CPU s)", flush=True)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print("| case | workers | batch | hepml_dist jets/s (wall) | hepml_dist jets per loader-core s "
          "| weaver-core jets/s (wall) | weaver-core jets per loader-core s | speed-up per core |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for title, w, batch, ours, theirs, _ in rows:
        print(f"| {title} | {w} | {batch} | {ours[0]:,.0f} | {ours[1]:,.0f} | {theirs[0]:,.0f} | {theirs[1]:,.0f} "
              f"| {ours[1] / theirs[1]:.1f}x |")
    print("\nper loader-core: jets delivered / CPU seconds used by the DataLoader worker processes; the main "
          "process (receiving batches) used " + ", ".join(f"{r[3][2]:,.0f}" for r in rows) +
          " (hepml_dist) and " + ", ".join(f"{r[4][2]:,.0f}" for r in rows) + " (weaver) jets per CPU s.")
    print(f"\nmachine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end; "
          "conversion (parquet -> shards, 1 process): " +
          ", ".join(f"{t.split(',')[0]}: {r:,.0f} jets/s" for t, w, *_, r in rows if w == workers[0]))


if __name__ == "__main__":
    main()
