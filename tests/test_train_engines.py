"""The training loop on 2 plain gloo processes (no Ray, so imports are paid once per test): DeepSpeed ZeRO 1, 2
and 3 train and resume exactly (mid-epoch, from their per-rank shards); PCGrad trains inside the loop; fine-tuning
loads and freezes modules; a phase trains only its modules; gradient accumulation counts optimizer steps."""

import json
import math
from pathlib import Path

import pytest
import torch
from train_helpers import final_weights, max_difference, run_without_ray, tiny_job, write_jet_dataset

from hepml_dist.models import build_model
from hepml_dist.runs import latest_checkpoint, list_checkpoints, load_trained, resolve_checkpoint
from hepml_dist.track.tracker import read_metrics

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]

STAGES = {1: "fp32", 2: "bf16-mixed", 3: "bf16-mixed"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_jet_dataset(tmp_path_factory.mktemp("jets") / "data")


def job(dataset, **overrides):
    base = {"parallel": {"num_workers": 2}, "tracking": {"mode": "disabled"}}
    return tiny_job(dataset, **{**base, **overrides})


def deepspeed_job(dataset, stage):
    return job(
        dataset,
        parallel={"num_workers": 2, "strategy": "deepspeed", "zero_stage": stage},
        training={"precision": STAGES[stage], "epochs": 3, "eval_interval": 8, "log_interval": 4, "seed": 7},
        checkpoint={"interval": 3, "keep_last": 10, "keep_best_by": "val_loss", "best_mode": "min"},
    )


def test_deepspeed_zero_stages_train_and_resume_exactly(dataset, tmp_path):
    runs = []
    for stage in STAGES:
        full, resumed = tmp_path / f"zero{stage}", tmp_path / f"zero{stage}-resumed"
        runs.append((deepspeed_job(dataset, stage), full))
        # The same run restarted from its step-9 checkpoint (mid-epoch 2), as after a crash.
        runs.append({"job": deepspeed_job(dataset, stage), "run_dir": resumed, "copy_from": str(full), "keep_until": 9})
    run_without_ray(runs)

    for stage in STAGES:
        full, resumed = tmp_path / f"zero{stage}", tmp_path / f"zero{stage}-resumed"
        losses = [r["train_loss"] for r in read_metrics(full) if "train_loss" in r]
        assert losses[-1] < 0.5 * losses[0], f"ZeRO-{stage} did not learn: {losses}"
        last = latest_checkpoint(full)
        shards = {p.name for p in (last / "deepspeed").iterdir()}
        assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)} <= shards or stage == 3
        if stage == 3:  # ZeRO-3 also partitions the parameters: one model-state file per rank
            assert sum("model_states" in name for name in shards) == 2
        assert json.loads((last / "state.json").read_text())["finished"]
        _, model = load_trained(full)  # the consolidated fp32 model.pt rebuilds the model
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert [r["resumed_from"] for r in read_metrics(resumed) if "resumed_from" in r] == [9]
        difference = max_difference(final_weights(full), final_weights(resumed))
        assert difference < 1e-5, f"ZeRO-{stage}: resumed run differs by {difference}"


def test_pcgrad_finetuning_phases_and_accumulation(dataset, tmp_path):
    pcgrad = tmp_path / "pcgrad"
    finetune = tmp_path / "finetune"
    phased = tmp_path / "phased"
    accum = tmp_path / "accum"
    unfrozen = tmp_path / "unfrozen"
    run_without_ray([
        (job(dataset, training={"epochs": 2, "multitask": "pcgrad", "pcgrad": {"mode": "global", "order": "seeded"},
                                "eval_interval": 8, "log_interval": 4, "seed": 7}), pcgrad),
        # Frozen backbone: load everything but the heads from the PCGrad run, freeze the particle embedding.
        (job(dataset, training={"epochs": 1, "init_from": str(pcgrad), "init_modules": ["^(embed|pair_embed|blocks)\\."],
                                "freeze": ["^embed\\."], "eval_interval": 8, "log_interval": 4, "seed": 7},
             optim={"name": "radam_lookahead", "lr": 3e-3, "lr_multipliers": {"^heads\\.": 5.0}, "weight_decay": 0.0}), finetune),
        # MultiParTau-style second phase: from epoch 2 only the regression head learns.
        (job(dataset, training={"epochs": 2, "phases": [{"start_epoch": 2, "trainable": ["heads\\.size\\."]}],
                                "eval_interval": 8, "log_interval": 4, "seed": 7},
             checkpoint={"keep_last": 5}), phased),
        (job(dataset, training={"epochs": 2, "grad_accum": 2, "eval_interval": 4, "log_interval": 2, "seed": 7}), accum),
        # OmniJet-style fine-tuning: embedding frozen in epoch 1, then a phase unfreezes everything.
        (job(dataset, training={"epochs": 2, "init_from": str(pcgrad), "freeze": ["^embed\\."],
                                "phases": [{"start_epoch": 2, "trainable": [".*"]}], "eval_interval": 8,
                                "log_interval": 4, "seed": 7}, checkpoint={"keep_last": 5}), unfrozen),
    ])

    records = read_metrics(pcgrad)
    assert any("pcgrad_weight_is_signal" in r for r in records)
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    assert losses[-1] < losses[0]

    # init_from a run directory loads its best checkpoint (the contract of resolve_checkpoint)
    pretrained = torch.load(resolve_checkpoint(pcgrad) / "model.pt", weights_only=True)
    tuned = final_weights(finetune)
    for name, value in tuned.items():
        if name.startswith("embed.") and value.is_floating_point() and "running" not in name:
            assert torch.equal(value, pretrained[name]), f"{name} was frozen but changed"
    assert not torch.equal(tuned["blocks.0.fc1.weight"], pretrained["blocks.0.fc1.weight"])  # loaded, then trained

    epoch1 = torch.load(list_checkpoints(phased)[0] / "model.pt", weights_only=True)  # step 8, end of epoch 1
    final = final_weights(phased)
    changed = {n for n in final if final[n].is_floating_point() and "running" not in n and not torch.equal(final[n], epoch1[n])}
    assert changed and all(n.startswith("heads.size.") for n in changed), changed

    frozen_epoch = torch.load(list_checkpoints(unfrozen)[0] / "model.pt", weights_only=True)  # end of epoch 1
    unfrozen_final = final_weights(unfrozen)
    embed = [n for n in frozen_epoch if n.startswith("embed.") and frozen_epoch[n].is_floating_point() and "running" not in n]
    assert embed and all(torch.equal(frozen_epoch[n], pretrained[n]) for n in embed)  # frozen during epoch 1
    assert any(not torch.equal(unfrozen_final[n], frozen_epoch[n]) for n in embed)  # the phase unfroze and trained it

    state = json.loads((latest_checkpoint(accum) / "state.json").read_text())
    assert state["step"] == 8 and state["finished"]  # 2 epochs x 8 batches / 2 micro-batches per step


def test_shipped_zero_jobs_train_shrunk_to_cpu(dataset, tmp_path):
    """jobs/mlpf-clic-zero3.yaml and jobs/part-jetclass-zero2.yaml as shipped, shrunk to CPU sizes by overrides
    only (model width, batch, steps, CPU workers; ParT's fp16 becomes bf16: DeepSpeed has no fp16 on CPU): their
    DeepSpeed configurations train, and the consolidated model.pt rebuilds each model."""
    from typer.testing import CliRunner

    from hepml_dist.cli import app
    from hepml_dist.spec import load_job

    events = tmp_path / "clic"
    made = CliRunner().invoke(app, ["data", "generate", "clic-events", "--events", "120", "--out", str(events)])
    assert made.exit_code == 0, made.output
    on_cpu = ["parallel.num_workers=2", "parallel.accelerator=cpu", "parallel.gpus_per_worker=0",
              "parallel.cpus_per_worker=1", "tracking.mode=disabled", "training.epochs=1", "training.eval_interval=4",
              "training.log_interval=1", "data.steps_per_epoch=4", "data.val_steps=2", "data.loader_workers=0"]

    def splits(folder):
        return [f"data.{s}={folder / s}" for s in ("train", "val", "test")]

    mlpf = load_job(ROOT / "jobs" / "mlpf-clic-zero3.yaml", [
        *on_cpu, *splits(events), "model.num_heads=2", "model.head_dim=8", "model.num_convs=1", "data.batch_size=8",
        "data.inputs.max_length=256", "data.inputs.pad_to_multiple=32"])
    part = load_job(ROOT / "jobs" / "part-jetclass-zero2.yaml", [
        *on_cpu, *splits(dataset), "training.precision=bf16-mixed", "model.embed_dims=[16,16]",
        "model.pair_embed_dims=[8]", "model.num_heads=2", "model.num_layers=1", "model.num_cls_layers=1",
        "data.batch_size=32", "data.inputs.max_length=12",
        "tasks=[{name: jet_class, kind: multiclass, label: label_is_signal, classes: [b, s], loss: ce}]"])
    assert (mlpf.parallel.zero_stage, part.parallel.zero_stage) == (3, 2)
    runs = [(spec.model_dump(mode="json"), tmp_path / spec.name) for spec in (mlpf, part)]
    run_without_ray(runs)
    for spec in (mlpf, part):
        losses = [r["train_loss"] for r in read_metrics(tmp_path / spec.name) if "train_loss" in r]
        assert len(losses) == 4 and all(math.isfinite(v) for v in losses), (spec.name, losses)
        loaded, model = load_trained(tmp_path / spec.name)
        assert loaded.parallel.zero_stage == spec.parallel.zero_stage
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in build_model(spec).parameters())


def test_epochs_without_steps_per_epoch_are_one_pass_over_the_training_split(dataset, tmp_path):
    from hepml_dist.data.loader import open_stream
    from hepml_dist.spec import parse_spec
    from hepml_dist.train.launch import resolve_steps_per_epoch
    from hepml_dist.train.loop import train_loop_per_worker

    job = tiny_job(dataset, data={"steps_per_epoch": None, "val_steps": 2}, tracking={"mode": "disabled"},
                   training={"epochs": 1, "eval_interval": 1000, "log_interval": 50, "seed": 7},
                   parallel={"num_workers": 2})
    spec = parse_spec(job)  # validates: epochs no longer need a hand-counted steps_per_epoch
    examples = open_stream(spec.data, "train", world_size=2).examples
    assert 0.6 * 3000 < examples < 0.8 * 3000  # the 70 % train split of the fixture
    resolved = resolve_steps_per_epoch(spec)
    assert resolved.data.steps_per_epoch == examples // (32 * 2)  # batch 32 on each of 2 ranks
    single = parse_spec(tiny_job(dataset, data={"steps_per_epoch": None, "val_steps": 2}, tracking={"mode": "disabled"},
                                 training={"epochs": 1, "eval_interval": 1000, "log_interval": 50, "seed": 7}))
    result = train_loop_per_worker({"spec": single.model_dump(mode="json"), "run_dir": str(tmp_path / "one-pass")})
    assert result["step"] == resolve_steps_per_epoch(single).data.steps_per_epoch == examples // 32
