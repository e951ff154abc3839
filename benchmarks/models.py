"""Training-step speed of our ParT family against weaver-core's ParticleTransformer, side by side in one process.

Measures forward + backward jets/s (no optimizer step) for
  * ParT, the JetClass configuration (jobs/part-jetclass.yaml), 128 particles per jet;
  * MultiParTau (jobs/multipartau.yaml), 20 candidates per jet, 4 tasks with their losses; weaver-core has no
    multi-pathway model, so its side is weaver's encoder (ParticleTransformer without class blocks) plus four
    pathways built from weaver's own Block (class token, 2 class-attention blocks, LayerNorm, head), as MultiParTau is.
Both sides get the same batches (jets with a realistic spread of lengths, zero-padded), the same configuration,
threads and precision, training mode with sequence trimming on; timings are interleaved to share machine noise.
On a GPU it runs in bf16 autocast and reports MFU from a FLOP count (torch.utils.flop_counter) over the same steps.
With --compile a third row times our model under torch.compile (as `training.compile: true` applies it, through
hepml_dist.train.engine.compile_model) and reports its speed relative to eager; compilation and the recompiles
for new shapes happen in the warm-up steps, so give it more of them (--warmup 12).

    python benchmarks/models.py --threads 2 --batch-part 64 --batch-tau 256        # CPU
    python benchmarks/models.py --batch-part 512 --batch-tau 12288                   # GPU (bf16)
    python benchmarks/models.py --compile --warmup 12 --only part                    # + compiled vs eager
"""

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from hepml_dist.models import build_model, get_family
from hepml_dist.spec import load_job

ROOT = Path(__file__).resolve().parents[1]
# Dense bf16 peak TFLOP/s by device-name substring (vendor data sheets, SXM/OAM parts).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "MI250X": 191.5, "MI300X": 1307.0, "L40S": 362.0}


def synthetic_batch(spec, batch_size: int, length: int, mean_length: float, seed: int) -> dict[str, torch.Tensor]:
    """Jets with Gamma-distributed lengths (mean `mean_length`, capped at `length`), physical 4-vectors, labels."""
    torch.manual_seed(seed)  # torch.distributions samples from the global generator
    g = torch.Generator().manual_seed(seed)
    n = torch.distributions.Gamma(torch.tensor(4.0), torch.tensor(4.0 / mean_length)).sample((batch_size,))
    n = n.round().clamp(2, length).long()
    mask = (torch.arange(length)[None] < n[:, None]).float()[:, None]
    pt = torch.distributions.Exponential(torch.tensor(0.1)).sample((batch_size, length)) + 0.5
    eta, phi = 0.3 * torch.randn(batch_size, length, generator=g), 0.3 * torch.randn(batch_size, length, generator=g)
    pz = pt * torch.sinh(eta)
    vectors = torch.stack((pt * torch.cos(phi), pt * torch.sin(phi), pz, torch.sqrt(pt**2 + pz**2 + 0.0196)), dim=1) * mask
    batch = {"features": torch.randn(batch_size, 17, length, generator=g) * mask, "vectors": vectors, "mask": mask}
    for task in spec.tasks:
        if task.kind == "regression":
            batch |= {f"target_{t}": torch.randn(batch_size, generator=g) for t in task.targets}
        else:
            classes = 2 if task.kind == "binary" else task.output_dim
            batch[task.label_key] = torch.randint(0, classes, (batch_size,), generator=g)
    return batch


def weaver_encoder_kwargs(m) -> dict:
    return dict(
        pair_input_dim=m.pair_input_dim, use_pre_activation_pair=m.use_pre_activation_pair, embed_dims=m.embed_dims,
        pair_embed_dims=m.pair_embed_dims, num_heads=m.num_heads, num_layers=m.num_layers, trim=m.trim,
        block_params=dict(dropout=m.dropout, attn_dropout=m.attn_dropout, activation_dropout=m.activation_dropout),
        weight_init=None, fix_init=False,
    )


class WeaverPart(nn.Module):
    """weaver-core's ParticleTransformer (one shared class pathway), with our batch/output convention."""

    def __init__(self, spec):
        super().__init__()
        from weaver.nn.model.ParticleTransformer import ParticleTransformer

        m, task = spec.model, spec.tasks[0]
        self.task = task.name
        self.net = ParticleTransformer(
            input_dim=17, num_classes=task.output_dim, num_cls_layers=m.num_cls_layers,
            fc_params=[(w, m.head.dropout) for w in m.head.hidden], **weaver_encoder_kwargs(m),
        )

    def forward(self, batch):
        return {self.task: self.net(batch["features"], batch["vectors"], batch["mask"])}


class WeaverMultiPathway(nn.Module):
    """weaver-core's encoder plus one pathway per task made of weaver Blocks (the MultiParTau construction)."""

    def __init__(self, spec):
        super().__init__()
        from weaver.nn.model.ParticleTransformer import Block, ParticleTransformer

        m = spec.model
        dim = m.embed_dims[-1]
        self.encoder = ParticleTransformer(input_dim=17, num_classes=None, num_cls_layers=0, fc_params=None, **weaver_encoder_kwargs(m))
        self.tokens = nn.ParameterDict({t.name: nn.Parameter(0.02 * torch.randn(1, 1, dim)) for t in spec.tasks})
        cls_cfg = dict(embed_dim=dim, num_heads=m.num_heads, ffn_ratio=m.ffn_ratio, dropout=0, attn_dropout=0, activation_dropout=0)
        self.blocks = nn.ModuleDict({t.name: nn.ModuleList(Block(**cls_cfg) for _ in range(m.num_cls_layers)) for t in spec.tasks})
        self.norms = nn.ModuleDict({t.name: nn.LayerNorm(dim) for t in spec.tasks})
        self.heads = nn.ModuleDict()
        for t in spec.tasks:
            drop = m.head.dropout if t.head_dropout is None else t.head_dropout
            self.heads[t.name] = nn.Sequential(nn.Linear(dim, m.head.hidden[0]), nn.GELU(), nn.Dropout(drop), nn.Linear(m.head.hidden[0], t.output_dim))

    def forward(self, batch):
        x, padding_mask = self.encoder(batch["features"], batch["vectors"], batch["mask"])
        out = {}
        for name, blocks in self.blocks.items():
            cls = self.tokens[name].expand(x.shape[0], -1, -1)
            for block in blocks:
                cls = block(x, x_cls=cls, padding_mask=padding_mask)
            out[name] = self.heads[name](self.norms[name](cls.squeeze(1)))
        return out


def train_step(model, batch, spec, device, dtype):
    losses_of = get_family(spec.model.family).losses
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        losses = losses_of(model(batch), batch, spec)
    sum(losses.values()).backward()
    model.zero_grad(set_to_none=True)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(model, batches, spec, device, dtype) -> float:
    synchronize(device)
    start = time.perf_counter()
    for batch in batches:
        train_step(model, batch, spec, device, dtype)
    synchronize(device)
    return time.perf_counter() - start


def flops_per_step(model, batches, spec, device, dtype) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    total = 0
    for batch in batches:
        with FlopCounterMode(display=False) as counter:
            train_step(model, batch, spec, device, dtype)
        total += counter.get_total_flops()
    return total / len(batches)


def compare(name, spec, ours, theirs, batch_size, length, mean_length, args, device, dtype) -> list[dict]:
    batches = [
        {k: v.to(device) for k, v in synthetic_batch(spec, batch_size, length, mean_length, seed=i).items()}
        for i in range(args.steps)
    ]
    models = {"hepml_dist": ours.to(device).train(), "weaver-core": theirs.to(device).train()}
    if args.compile:
        from hepml_dist.train.engine import compile_model

        models["hepml_dist compiled"] = compile_model(copy.deepcopy(ours), spec.model.family)
        # what compiling runs, without compiling it: separates the cost of the static-shape (dense) code from the
        # gain of the compiler
        models["hepml_dist static shapes, eager"] = copy.deepcopy(ours)
        models["hepml_dist static shapes, eager"].static_shapes = True
    for model in models.values():  # past the trimmer's 5 warm-up calls, allocator and kernel caches warm
        time_steps(model, batches[: args.warmup], spec, device, dtype)
    seconds = {k: [] for k in models}
    for _ in range(args.repeats):  # interleaved, so both sides see the same machine noise
        for key, model in models.items():
            seconds[key].append(time_steps(model, batches, spec, device, dtype))
    rows = []
    for key, model in models.items():
        best = statistics.median(seconds[key])
        row = {
            "model": name, "implementation": key, "batch": batch_size, "length": length,
            "params": sum(p.numel() for p in model.parameters()),
            "jets_per_s": batch_size * len(batches) / best,
        }
        if device.type == "cuda":
            flops = flops_per_step(model, batches[: min(4, len(batches))], spec, device, dtype)
            peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
            row["tflops"] = flops * len(batches) / best / 1e12
            row["mfu"] = row["tflops"] / peak if peak else None
        rows.append(row)
    for row in rows[2:]:
        row["speedup_vs_weaver"] = row["jets_per_s"] / rows[1]["jets_per_s"]
    rows[0]["speedup_vs_weaver"] = rows[0]["jets_per_s"] / rows[1]["jets_per_s"]
    if args.compile:
        rows[2]["compiled_vs_eager"] = rows[2]["jets_per_s"] / rows[0]["jets_per_s"]
        rows[2]["compiled_vs_static_eager"] = rows[2]["jets_per_s"] / rows[3]["jets_per_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--batch-part", type=int, default=64)
    parser.add_argument("--batch-tau", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per repeat")
    parser.add_argument("--warmup", type=int, default=6, help="untimed steps first (>= 6 passes the trimmer warm-up)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak for MFU if the GPU is not known")
    parser.add_argument("--only", choices=["part", "multipartau"], default=None)
    parser.add_argument("--compile", action="store_true", help="also time our model under torch.compile (vs eager)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    rows = []
    if args.only in (None, "part"):
        spec = load_job(ROOT / "jobs/part-jetclass.yaml")
        torch.manual_seed(0)
        rows += compare("ParT JetClass", spec, build_model(spec), WeaverPart(spec), args.batch_part, 128, 50, args, device, dtype)
    if args.only in (None, "multipartau"):
        spec = load_job(ROOT / "jobs/multipartau.yaml")
        torch.manual_seed(0)
        rows += compare("MultiParTau", spec, build_model(spec), WeaverMultiPathway(spec), args.batch_tau, 20, 9, args, device, dtype)
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"\nforward+backward, training mode with trimming, {where}, {dtype}".replace("torch.", ""))
    header = "| model | implementation | params | batch x length | jets/s | vs weaver |" + (" TFLOP/s | MFU |" if device.type == "cuda" else "")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        line = f"| {r['model']} | {r['implementation']} | {r['params']:,} | {r['batch']} x {r['length']} | {r['jets_per_s']:,.0f} | "
        line += f"{r['speedup_vs_weaver']:.2f}x |" if "speedup_vs_weaver" in r else "1.00x |"
        if device.type == "cuda":
            mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") else "n/a"
            line += f" {r['tflops']:.1f} | {mfu} |"
        print(line)
    for r in rows:
        if "compiled_vs_eager" in r:
            print(f"{r['model']}: torch.compile / eager = {r['compiled_vs_eager']:.2f}x "
                  f"(/ the same static-shape code run eagerly = {r['compiled_vs_static_eager']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
