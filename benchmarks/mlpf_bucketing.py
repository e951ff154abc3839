"""MLPF loader bucketing benchmark: padded share of the element slots and events/s, with and without
`data.bucket_by_length`.

Generates clic-events (or reads `--data`), then streams the training split with the mlpf-quickstart data settings
(batch 16, max_length 256, pad_to_multiple 32, one loader worker) twice, unbucketed and bucketed, and reports:
- padded fraction: padded / all element slots over the batches (what attention and the heads compute in vain);
- loader events/s: batches as ready tensors, nothing else;
- training events/s: the same batches through forward + backward + AdamW step of the mlpf-quickstart model (CPU),
  which is what the padding costs in practice; timed in alternating rounds, the best round of each counts.
Small enough for a laptop CPU in under 2 minutes:

    python benchmarks/mlpf_bucketing.py                     # 1000 generated events
    python benchmarks/mlpf_bucketing.py --data data/clic-events --steps 40
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from hepml_dist.data.loader import open_stream
from hepml_dist.generate import get_process
from hepml_dist.generate.runner import generate_dataset
from hepml_dist.models import build_model
from hepml_dist.models.mlpf.losses import mlpf_losses
from hepml_dist.spec import load_job

ROOT = Path(__file__).resolve().parents[1]


def load_batches(spec, steps: int) -> tuple[list[dict], dict[str, float]]:
    """The first `steps` training batches, with the padded fraction and the loader's events/s."""
    stream = open_stream(spec.data, "train", seed=spec.training.seed)
    slots = real = events = 0
    start = time.perf_counter()
    batches = []
    for batch in stream.batches(0):
        mask = batch["mask"]
        slots, real, events = slots + mask.numel(), real + int(mask.sum()), events + len(mask)
        batches.append(batch)
        if len(batches) == steps:
            break
    elapsed = time.perf_counter() - start
    return batches, {"batches": len(batches), "padded_fraction": 1 - real / slots, "mean_length": slots / events,
                     "loader_events_per_s": events / elapsed}


def train_time(spec, batches: list[dict]) -> float:
    """Seconds for forward + backward + AdamW step over `batches` (a fresh model each time)."""
    torch.manual_seed(0)
    model = build_model(spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    start = time.perf_counter()
    for batch in batches:
        loss = sum(mlpf_losses(model(batch), batch, spec).values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a clic-events dataset (default: generate --events into a temp dir)")
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=30, help="batches per measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the training steps")
    parser.add_argument("--rounds", type=int, default=3, help="timed training rounds per setting (best counts)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            data = Path(tmp) / "clic"
            generate_dataset(get_process("clic-events"), args.events, data, seed=1, show_progress=False)
        rows, loaded = {}, {}
        for bucketed in (False, True):
            overrides = [f"data.train={data / 'train'}", f"data.val={data / 'val'}", f"data.test={data / 'test'}",
                         "data.steps_per_epoch=1000", f"data.bucket_by_length={str(bucketed).lower()}"]
            spec = load_job(ROOT / "jobs" / "mlpf-quickstart.yaml", overrides)
            load_batches(spec, 3)  # warm-up: page cache, worker start
            name = "bucketed" if bucketed else "random batches"
            loaded[name] = (spec, *load_batches(spec, args.steps))
        # training steps timed in alternating rounds, best of each: a shared machine's load hits both alike
        times: dict[str, list[float]] = {name: [] for name in loaded}
        for _ in range(args.rounds):
            for name, (spec, batches, _) in loaded.items():
                times[name].append(train_time(spec, batches))
        for name, (_, batches, row) in loaded.items():
            rows[name] = row | {"train_events_per_s": sum(len(b["mask"]) for b in batches) / min(times[name])}
    print(f"| batches of 16 events ({args.steps} each) | padded fraction | mean padded length | loader events/s | "
          "training events/s (CPU) |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['padded_fraction']:.3f} | {r['mean_length']:.1f} | {r['loader_events_per_s']:.0f} | "
              f"{r['train_events_per_s']:.1f} |")
    before, after = rows["random batches"], rows["bucketed"]
    print(f"\ntraining speed-up {after['train_events_per_s'] / before['train_events_per_s']:.2f}x, padded fraction "
          f"{before['padded_fraction']:.3f} -> {after['padded_fraction']:.3f}")


if __name__ == "__main__":
    main()
