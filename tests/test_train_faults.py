"""Faults: a worker killed mid-run under DDP and under DeepSpeed ZeRO-1/2/3 (Ray restarts the group, training
continues from the last checkpoint and ends at the right step), non-finite losses (a clear error naming step and task, or skipped batches), and a run
directory that holds a different job."""

import threading
import time

import awkward as ak
import numpy as np
import psutil
import pytest
import torch
from train_helpers import ray_session, tiny_job, write_jet_dataset  # noqa: F401

from hepml_dist.data.stream import ShardStream
from hepml_dist.errors import UserError
from hepml_dist.inference.predict import predict
from hepml_dist.runs import latest_checkpoint, load_trained
from hepml_dist.spec import parse_spec
from hepml_dist.track.tracker import read_metrics
from hepml_dist.train.launch import launch
from hepml_dist.train.loop import NonFiniteLossError, train_loop_per_worker

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_jet_dataset(tmp_path_factory.mktemp("jets") / "data")


def ray_train_workers() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
            found.append(proc)
    return found


def kill_a_worker_after(run_dir, step: int, killed: list[int], timeout_s: float = 240) -> threading.Thread:
    """A watcher that kills the last Ray Train worker once the training log reaches `step`."""

    def watch():
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            steps = [r["step"] for r in read_metrics(run_dir) if "train_loss" in r]
            if steps and steps[-1] >= step:
                victim = ray_train_workers()[-1]
                killed.append(victim.pid)
                victim.kill()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


def assert_resumed_once_and_complete(run_dir, result, total: int, interval: int) -> None:
    assert result.finished and result.step == total
    resumed = [r["resumed_from"] for r in read_metrics(run_dir) if "resumed_from" in r]
    assert len(resumed) == 1 and resumed[0] >= interval and resumed[0] % interval == 0
    steps = [r["step"] for r in read_metrics(run_dir) if "train_loss" in r]
    assert steps == list(range(1, total + 1))  # every step once: the records after the checkpoint were replaced


def test_killed_worker_is_restarted_and_run_finishes(ray_session, dataset, tmp_path):  # noqa: F811
    run_dir = tmp_path / "killed"
    spec = parse_spec(tiny_job(
        dataset,
        parallel={"num_workers": 2},
        training={"epochs": 3, "eval_interval": 40, "log_interval": 1, "seed": 7},
        data={"steps_per_epoch": 40},
        checkpoint={"interval": 10, "keep_last": 3},
        tracking={"mode": "disabled"},
        cluster={"max_failures": 1},
    ))
    killed: list[int] = []
    watcher = kill_a_worker_after(run_dir, 15, killed)  # the step-10 checkpoint is on disk by then
    result = launch(spec, run_dir=run_dir, progress=False)
    watcher.join()
    assert killed, "the run ended before a worker could be killed"
    assert_resumed_once_and_complete(run_dir, result, 120, 10)


# ZeRO-1 (fp32) and ZeRO-3 (bf16, partitioned parameters); every stage's exact resume from its shards is in
# tests/test_train_engines.py, and the restart through Ray does not depend on the stage
@pytest.mark.parametrize("stage", [1, 3])
def test_deepspeed_on_ray_train_survives_a_killed_worker(ray_session, dataset, tmp_path, stage):  # noqa: F811
    """DeepSpeed ZeRO through the launcher `hepml train` uses (Ray Train, 2 CPU workers over gloo): a worker
    killed mid-run, the group restarted from the per-rank DeepSpeed shards, the run finished; ZeRO-3's weights,
    consolidated into model.pt, are what `hepml predict` runs."""
    run_dir = tmp_path / f"zero{stage}"
    spec = parse_spec(tiny_job(
        dataset,
        parallel={"num_workers": 2, "strategy": "deepspeed", "zero_stage": stage},
        training={"epochs": 2, "eval_interval": 20, "log_interval": 1, "seed": 7,
                  "precision": "fp32" if stage == 1 else "bf16-mixed"},
        data={"steps_per_epoch": 20},
        checkpoint={"interval": 10, "keep_last": 2},
        tracking={"mode": "disabled"},
        cluster={"max_failures": 1},
    ))
    killed: list[int] = []
    watcher = kill_a_worker_after(run_dir, 13, killed)
    result = launch(spec, run_dir=run_dir, progress=False)
    watcher.join()
    assert killed, "the run ended before a worker could be killed"
    assert_resumed_once_and_complete(run_dir, result, 40, 10)
    assert (latest_checkpoint(run_dir) / "deepspeed").is_dir()
    if stage == 3:
        out = tmp_path / "predictions.parquet"
        summary = predict(run_dir, [str(dataset / "test")], out)
        _, model = load_trained(run_dir)
        stream = ShardStream(spec.data, "test", rank=0, world_size=1, seed=0, training=False)
        with torch.no_grad():
            expected = np.concatenate([torch.softmax(model(b)["is_signal"], -1)[:, 1].numpy() for b in stream.batches(0)])
        got = ak.to_numpy(ak.from_parquet(out)["score_is_signal_sig"])
        assert summary["rows"] == len(expected)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_non_finite_loss_names_step_and_task(dataset, tmp_path):
    job = tiny_job(dataset, optim={"name": "sgd", "lr": 1e6}, tracking={"mode": "disabled"})
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step \d+ \(epoch \d+\) in task\(s\) (is_signal|size)"):
        train_loop_per_worker({"spec": parse_spec(job).model_dump(mode="json"), "run_dir": str(tmp_path / "nan")})


def test_non_finite_batches_are_skipped_when_asked(dataset, tmp_path):
    job = tiny_job(dataset, optim={"name": "sgd", "lr": 1e6}, tracking={"mode": "disabled"},
                   training={"nan_policy": "skip", "epochs": 1, "eval_interval": 8, "log_interval": 8, "seed": 7})
    result = train_loop_per_worker({"spec": parse_spec(job).model_dump(mode="json"), "run_dir": str(tmp_path / "skip")})
    assert result["step"] == 8
    assert sum(r.get("skipped_batches", 0) for r in read_metrics(tmp_path / "skip")) > 0


def test_skipping_non_finite_batches_stops_past_the_limit(dataset, tmp_path):
    job = tiny_job(dataset, optim={"name": "sgd", "lr": 1e6}, tracking={"mode": "disabled"},
                   training={"nan_policy": "skip", "nan_skip_limit": 2, "epochs": 1, "eval_interval": 8,
                             "log_interval": 8, "seed": 7})
    with pytest.raises(NonFiniteLossError, match=r"3 micro-batches skipped for non-finite losses \(training\."
                                                 r"nan_skip_limit = 2\); the last one: non-finite loss at step \d+"):
        train_loop_per_worker({"spec": parse_spec(job).model_dump(mode="json"), "run_dir": str(tmp_path / "limit")})


def test_run_directory_of_another_job_is_refused(dataset, tmp_path):
    from hepml_dist.models import build_model
    from hepml_dist.runs import write_model_checkpoint
    from hepml_dist.train.launch import check_resumable

    spec = parse_spec(tiny_job(dataset))
    write_model_checkpoint(tmp_path / "checkpoints" / "step-00000004", spec, build_model(spec), {"step": 4})
    assert check_resumable(spec.model_copy(update={"training": spec.training.model_copy(update={"epochs": 5})}), tmp_path) == 4
    changed = parse_spec(tiny_job(dataset, model={"embed_dims": [32, 32]}))
    with pytest.raises(UserError, match="model.embed_dims"):
        check_resumable(changed, tmp_path)


def disk_full_at_step_16(rank: int) -> None:
    """Rank 0's checkpoint writer fails with ENOSPC from the step-16 checkpoint on (run in each spawned rank)."""
    import errno

    from hepml_dist import runs

    real = runs.write_checkpoint_files

    def failing(folder, *args, **kwargs):
        if rank == 0 and int(folder.name.split("-")[1].split(".")[0]) >= 16:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.pt"))
        return real(folder, *args, **kwargs)

    runs.write_checkpoint_files = failing


def test_disk_full_while_checkpointing_stops_every_rank_and_keeps_what_was_written(dataset, tmp_path):
    import torch.multiprocessing as mp

    from hepml_dist.runs import list_checkpoints, load_trained
    from train_helpers import run_without_ray

    run_dir = tmp_path / "full-disk"
    job = tiny_job(dataset, parallel={"num_workers": 2}, tracking={"mode": "disabled"},
                   training={"epochs": 3, "eval_interval": 8, "log_interval": 4, "seed": 7})
    with pytest.raises(mp.ProcessRaisedException) as failed:
        run_without_ray([(job, run_dir)], setup=disk_full_at_step_16)  # both ranks stop: no hang in a collective
    text = str(failed.value)
    assert "CheckpointWriteError" in text and "checkpoint of step 16 not written" in text
    assert [p.name for p in list_checkpoints(run_dir)] == ["step-00000008"]  # the earlier one, intact
    assert not list((run_dir / "checkpoints").glob(".step-*"))  # no half-written folder left behind
    load_trained(run_dir / "checkpoints" / "step-00000008")
    run_without_ray([(job, run_dir)])  # space freed: the same command resumes and finishes
    assert [r["resumed_from"] for r in read_metrics(run_dir) if "resumed_from" in r] == [8]
    assert [p.name for p in list_checkpoints(run_dir)][-1] == "step-00000024"
