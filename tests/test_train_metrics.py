"""Validation metrics and engine configuration without processes: metrics of merged rank payloads equal the metrics
of one process that saw everything (sums and gathered predictions, never means of means), physics metrics against
direct computations, and the generated DeepSpeed config."""

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from train_helpers import tiny_job

from hepml_dist.evaluate.metrics import Collector, compute_metrics, merge_payloads, rejection_at
from hepml_dist.spec import parse_spec
from hepml_dist.train.deepspeed_engine import deepspeed_config, zero3_leaf_classes
from hepml_dist.train.step import LogWindow, StepResult


@pytest.fixture
def spec(tmp_path):
    return parse_spec(tiny_job(tmp_path))


def fake_batch(n: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    label = torch.randint(0, 2, (n,), generator=gen)
    logits = torch.randn(n, 2, generator=gen) + torch.stack([-label, label], 1).float()
    target = torch.rand(n, generator=gen) + 1.0
    outputs = {"is_signal": logits, "size": (target + 0.1 * torch.randn(n, generator=gen))[:, None]}
    batch = {"label_is_signal": label, "target_log_n": target, "jet_pt": torch.rand(n, generator=gen) * 100}
    losses = {
        "is_signal": torch.nn.functional.cross_entropy(logits, label),
        "size": 0.5 * ((outputs["size"][:, 0] - target) ** 2).mean(),
    }
    return outputs, batch, losses


def test_merged_ranks_equal_one_process(spec):
    ranks = [Collector(spec), Collector(spec)]
    whole = Collector(spec)
    for i, size in enumerate([64, 64, 17, 40]):  # unequal batch sizes: a mean of means would be wrong
        outputs, batch, losses = fake_batch(size, seed=i)
        ranks[i % 2].update(outputs, batch, losses)
        whole.update(outputs, batch, losses)
    merged = compute_metrics(spec, merge_payloads([r.local() for r in ranks]))
    single = compute_metrics(spec, whole.local())
    assert merged.keys() == single.keys()
    for key in single:
        assert merged[key] == pytest.approx(single[key], rel=1e-9), key
    # the split mean of a mean loss: total loss sum / total count
    parts = [fake_batch(s, seed=i) for i, s in enumerate([64, 64, 17, 40])]
    expected = sum(float(p[2]["is_signal"]) * len(p[1]["label_is_signal"]) for p in parts) / (64 + 64 + 17 + 40)
    assert single["val_is_signal_loss"] == pytest.approx(expected)


def test_physics_metrics(spec):
    from sklearn.metrics import roc_auc_score

    collector = Collector(spec)
    outputs, batch, losses = fake_batch(2000, seed=3)
    collector.update(outputs, batch, losses)
    metrics = compute_metrics(spec, collector.local())
    probs = torch.softmax(outputs["is_signal"], 1)[:, 1].numpy()
    labels = batch["label_is_signal"].numpy()
    assert metrics["val_is_signal_auc"] == pytest.approx(roc_auc_score(labels, probs))
    assert metrics["val_is_signal_accuracy"] == pytest.approx(((probs > 0.5) == labels).mean())
    # rejection at 50 %: 1 / (fraction of background above the signal median)
    threshold = np.median(probs[labels == 1])
    assert metrics["val_is_signal_rejection_at_50"] == pytest.approx(1 / (probs[labels == 0] > threshold).mean(), rel=0.02)
    # log_* targets: response = exp(pred - true), median near 1 for unbiased predictions
    assert metrics["val_size_response_median"] == pytest.approx(1.0, abs=0.02)
    assert 0.05 < metrics["val_size_resolution"] < 0.3


def test_rejection_is_capped_by_background_count():
    labels = np.array([0, 0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.4, 0.8, 0.9])  # perfect separation: no background passes
    assert rejection_at(labels, scores, 0.5) == 4.0


def test_deepspeed_config_follows_the_spec(tmp_path):
    spec = parse_spec(tiny_job(tmp_path, parallel={"strategy": "deepspeed", "zero_stage": 2, "offload": "cpu", "num_workers": 4},
                               training={"precision": "bf16-mixed", "grad_accum": 2, "epochs": 3},
                               optim={"name": "adamw", "clip_grad_norm": 1.0}))
    config = deepspeed_config(spec, world_size=4)
    assert config["train_batch_size"] == 32 * 2 * 4 and config["gradient_accumulation_steps"] == 2
    assert config["zero_optimization"]["stage"] == 2 and config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert "torch_adam" not in config["optimizer"]["params"]  # offload uses DeepSpeed's CPU Adam
    assert config["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "fp16" not in config
    assert config["gradient_clipping"] == 1.0


def test_zero3_gathers_attention_modules_whole(tmp_path):
    from hepml_dist.models import build_model

    model = build_model(parse_spec(tiny_job(tmp_path)))
    assert [cls.__name__ for cls in zero3_leaf_classes(model)] == ["Attention"]


def test_log_lines_count_jets_or_events_as_the_family_trains_them():
    from hepml_dist.models import get_family
    from hepml_dist.train.step import format_record

    record = {"train_loss": 0.5, "lr": 1e-3, "jets_per_s": 1234.4, "overflow_steps": 0}
    units = {family: get_family(family).examples for family in ("part", "omnijet", "mlpf", "aot")}
    assert units == {"part": "jets", "omnijet": "jets", "mlpf": "events", "aot": "events"}
    assert format_record(3, 10, 0, record, units["aot"]).endswith("1234 events/s")
    assert format_record(3, 10, 0, {**record, "overflow_steps": 2}, "jets").endswith("1234 jets/s (2 fp16 overflow)")


def test_log_window_splits_training_time_into_data_wait_and_steps():
    """A loader that needs 40 ms per batch and a step of 80 ms: the window says about a third of the time went to
    waiting for data and two thirds to the steps (sleeps only get longer under load, hence the wide bounds)."""
    def slow_batches():
        for i in range(5):
            time.sleep(0.04)
            yield i

    window = LogWindow(world_size=1)
    for _ in window.timed(slow_batches()):
        time.sleep(0.08)
        window.add(StepResult(losses=[{"a": 1.0}], examples=[4]))
    record = window.flush(SimpleNamespace(lr=lambda: 0.1, grad_norm=1.0, task_weights={}))
    assert 0.15 < record["data_wait_share"] < 0.5
    assert 0.45 < record["step_share"] < 0.85
    assert record["data_wait_share"] + record["step_share"] <= 1.0 + 1e-9


@pytest.mark.parametrize("clip", [None, 0.05])
def test_the_gradient_norm_is_measured_on_logged_steps_and_whenever_gradients_are_clipped(tmp_path, clip):
    import math

    import torch

    from hepml_dist.models import build_model, get_family
    from hepml_dist.train.cadence import Cadence
    from hepml_dist.train.engine import make_engine

    spec = parse_spec(tiny_job(tmp_path, optim={"name": "sgd", "lr": 0.1, "clip_grad_norm": clip},
                               training={"log_interval": 4, "epochs": None, "steps": 10}))
    family = get_family(spec.model.family)
    torch.manual_seed(0)
    batch = {"features": torch.randn(8, 17, 12), "vectors": torch.randn(8, 4, 12), "mask": torch.ones(8, 1, 12),
             "label_is_signal": torch.randint(0, 2, (8,)), "target_log_n": torch.randn(8)}
    engine = make_engine(build_model(spec), spec, torch.device("cpu"), total_steps=10)
    norms = []
    for measured in (True, False):
        engine.backward(family.losses(engine.forward(batch), batch, spec), last_micro_batch=True)
        engine.step(0, measure_grad_norm=measured)
        norms.append(engine.grad_norm)
    assert math.isfinite(norms[0]) and norms[0] > 0
    if clip:  # clipping needs the norm: measured either way
        assert math.isfinite(norms[1]) and norms[1] > clip
    else:
        assert math.isnan(norms[1])
    cadence = Cadence(spec.training, spec.checkpoint, total_steps=10, validates=False)
    assert [s for s in range(1, 11) if cadence.logs_at(s)] == [4, 8, 10]
    assert all(cadence.logs_at(s) == cadence.at(s, False).log for s in range(1, 11))
