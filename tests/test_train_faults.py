"""Faults: a worker killed mid-run (Ray restarts the group, training continues from the last checkpoint and ends
at the right step), non-finite losses (a clear error naming step and task, or skipped batches), and a run
directory that holds a different job."""

import threading
import time

import psutil
import pytest
from train_helpers import ray_session, tiny_job, write_jet_dataset  # noqa: F401

from hepml_dist.errors import UserError
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

    def kill_after_checkpoint():
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            steps = [r["step"] for r in read_metrics(run_dir) if "train_loss" in r]
            if steps and steps[-1] >= 15:  # the step-10 checkpoint is on disk
                victim = ray_train_workers()[-1]
                killed.append(victim.pid)
                victim.kill()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_after_checkpoint, daemon=True)
    watcher.start()
    result = launch(spec, run_dir=run_dir, progress=False)
    watcher.join()
    assert killed, "the run ended before a worker could be killed"
    assert result.finished and result.step == 120
    resumed = [r["resumed_from"] for r in read_metrics(run_dir) if "resumed_from" in r]
    assert len(resumed) == 1 and resumed[0] >= 10 and resumed[0] % 10 == 0
    steps = [r["step"] for r in read_metrics(run_dir) if "train_loss" in r]
    assert steps == list(range(1, 121))  # every step once: the records after the checkpoint were replaced


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
