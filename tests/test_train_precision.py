"""Mixed precision through the training loop on 2 gloo processes: fp16 autocast with a GradScaler (DDP and PCGrad,
the MultiParTau configuration) and bf16 learn; fp16 overflow steps are skipped and counted; a run resumed mid-epoch
restores the loss scale and ends with the same weights as the uninterrupted one. Devices that cannot run a precision
are refused naming the field."""

import pytest
import torch
from train_helpers import final_weights, max_difference, run_without_ray, tiny_job, write_jet_dataset

from hepml_dist.errors import UserError
from hepml_dist.precision import require_precision, unsupported_reason
from hepml_dist.spec import parse_spec
from hepml_dist.track.tracker import read_metrics
from hepml_dist.train.launch import check_local_precision

pytestmark = pytest.mark.integration

# 2**24: the first steps' scaled gradients overflow fp16 (max 65504), so the scaler has to back off before step 9.
OVERFLOWING_SCALE_POWER = 24


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_jet_dataset(tmp_path_factory.mktemp("jets") / "data")


def job(dataset, precision, **training):
    return tiny_job(
        dataset,
        parallel={"num_workers": 2},
        tracking={"mode": "disabled"},
        training={"precision": precision, "epochs": 3, "eval_interval": 8, "log_interval": 1, "seed": 7, **training},
        checkpoint={"interval": 3, "keep_last": 10, "keep_best_by": "val_loss", "best_mode": "min"},
    )


def train_losses(run_dir):
    return [r["train_loss"] for r in read_metrics(run_dir) if "train_loss" in r]


def test_fp16_bf16_and_pcgrad_fp16_learn_count_overflows_and_fp16_bf16_resume_exactly(dataset, tmp_path):
    fp16, resumed = tmp_path / "fp16", tmp_path / "fp16-resumed"
    bf16, bf16_resumed, pcgrad = tmp_path / "bf16", tmp_path / "bf16-resumed", tmp_path / "pcgrad-fp16"
    fp16_job = job(dataset, "fp16-mixed", fp16_initial_scale_power=OVERFLOWING_SCALE_POWER)
    run_without_ray([
        (fp16_job, fp16),
        # The same run restarted from its step-9 checkpoint (mid-epoch 2), as after a crash.
        {"job": fp16_job, "run_dir": resumed, "copy_from": str(fp16), "keep_until": 9},
        (job(dataset, "bf16-mixed"), bf16),
        {"job": job(dataset, "bf16-mixed"), "run_dir": bf16_resumed, "copy_from": str(bf16), "keep_until": 9},
        (job(dataset, "fp16-mixed", multitask="pcgrad", pcgrad={"mode": "global", "order": "seeded"}), pcgrad),
    ])

    for run in (fp16, bf16, pcgrad):
        losses = train_losses(run)
        assert len(losses) == 24 and all(map(torch.isfinite, torch.tensor(losses)))
        assert sum(losses[-4:]) < 0.6 * sum(losses[:4]), f"{run.name} did not learn: {losses}"

    overflows = {r["step"]: r["overflow_steps"] for r in read_metrics(fp16) if "overflow_steps" in r}
    assert 0 < sum(overflows.values()) < 12, overflows
    assert all(overflows[s] == 0 for s in overflows if s > 9)  # the scale has settled by then
    assert sum(overflows[s] for s in overflows if s <= 9) > 0  # so a resumed run must restore the lowered scale
    # PCGrad sees the scaled per-task gradients; an overflow there skips the step the same way.
    assert all(r["overflow_steps"] in (0, 1) for r in read_metrics(pcgrad) if "overflow_steps" in r)

    for full, again in ((fp16, resumed), (bf16, bf16_resumed)):
        assert [r["resumed_from"] for r in read_metrics(again) if "resumed_from" in r] == [9]
        difference = max_difference(final_weights(full), final_weights(again))
        assert difference == 0.0, f"{full.name} run resumed at step 9 differs by {difference}"
    scaler = torch.load(sorted((fp16 / "checkpoints").glob("step-*"))[-1] / "training.pt", weights_only=True)["scaler"]
    assert scaler["scale"] < 2.0**OVERFLOWING_SCALE_POWER


def test_a_precision_the_device_cannot_run_is_refused_naming_the_field():
    assert unsupported_reason(torch.device("cpu"), "fp16-mixed") is None  # torch 2.13: CPU autocast + GradScaler
    with pytest.raises(UserError, match=r"training\.precision: .*no autocast for device type 'meta'"):
        require_precision(torch.device("meta"), "fp16-mixed")
    require_precision(torch.device("meta"), "fp32")  # fp32 needs nothing


def test_fp16_on_cpu_validates_and_the_driver_says_it_is_for_testing(tmp_path, capsys):
    spec = parse_spec(tiny_job(tmp_path, training={"precision": "fp16-mixed", "epochs": 1}))
    check_local_precision(spec)
    assert "fp16-mixed on CPU runs" in capsys.readouterr().out
    check_local_precision(parse_spec(tiny_job(tmp_path, training={"precision": "bf16-mixed", "epochs": 1})))
    assert capsys.readouterr().out == ""
