"""`cluster.launcher: processes` (and `auto`, the default, which takes it on one machine): workers forked from a fork
server, without Ray. The same loop as under Ray (the weights equal a plain process group's, bit for bit), a killed
worker restarts the group from the latest checkpoint, a UserError is not retried, Ctrl-C checkpoints and leaves no
process behind, nothing outlives a killed driver, and what it cannot do is refused."""

import multiprocessing.forkserver
import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import psutil
import pytest
from train_helpers import (
    ctrl_c_at_step,
    final_weights,
    left_running,
    max_difference,
    run_without_ray,
    tiny_job,
    wait_for_step,
    write_jet_dataset,
    write_job,
)

from hepml_dist.errors import UserError
from hepml_dist.run_files import read_run_spec
from hepml_dist.spec import parse_spec
from hepml_dist.track.tracker import read_metrics
from hepml_dist.train import process_workers
from hepml_dist.train.environment import choose_launcher
from hepml_dist.train.launch import launch

pytestmark = pytest.mark.integration
HEPML = [sys.executable, "-m", "hepml_dist"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_jet_dataset(tmp_path_factory.mktemp("jets") / "data")


def processes_job(dataset, **overrides):
    return tiny_job(dataset, **{"cluster": {"launcher": "processes"}, "parallel": {"num_workers": 2},
                                "tracking": {"mode": "disabled"}, **overrides})


def test_processes_launcher_runs_the_same_loop_as_a_plain_process_group_without_ray(dataset, tmp_path):
    job = processes_job(dataset, training={"epochs": 2, "eval_interval": 8, "log_interval": 4, "seed": 7})
    result = launch(parse_spec(job), run_dir=tmp_path / "processes", progress=False)
    assert result.finished and result.step == 16
    run_without_ray([(dict(job, cluster={"launcher": "ray"}), tmp_path / "plain")], world=2)
    assert max_difference(final_weights(tmp_path / "processes"), final_weights(tmp_path / "plain")) == 0.0
    logs = tmp_path / "processes" / "logs"
    assert "step 16/16" in (logs / "worker-0.log").read_text()
    assert (logs / "worker-1.log").exists()
    assert not (tmp_path / "processes" / "ray").exists()  # no Ray Train bookkeeping: Ray never ran


def forked_workers() -> list[psutil.Process]:
    """The fork server's children: the training workers of the group that runs now."""
    server = multiprocessing.forkserver._forkserver._forkserver_pid
    return psutil.Process(server).children() if server else []


def test_a_killed_worker_restarts_the_group_from_the_latest_checkpoint(dataset, tmp_path):
    run_dir = tmp_path / "killed"
    spec = parse_spec(processes_job(
        dataset, training={"epochs": 3, "eval_interval": 40, "log_interval": 1, "seed": 7},
        data={"steps_per_epoch": 40}, checkpoint={"interval": 10, "keep_last": 3}, cluster={"launcher": "processes",
                                                                                           "max_failures": 1}))
    killed = []

    def kill_after_step_15():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            steps = [r["step"] for r in read_metrics(run_dir) if "train_loss" in r]
            if steps and steps[-1] >= 15 and forked_workers():
                victim = forked_workers()[-1]
                killed.append(victim.pid)
                victim.kill()
                return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_after_step_15, daemon=True)
    watcher.start()
    result = launch(spec, run_dir=run_dir, progress=False)
    watcher.join()
    assert killed, "no worker was killed"
    assert result.finished and result.step == 120
    resumed = [r["resumed_from"] for r in read_metrics(run_dir) if "resumed_from" in r]
    assert len(resumed) == 1 and resumed[0] >= 10 and resumed[0] % 10 == 0
    assert [r["step"] for r in read_metrics(run_dir) if "train_loss" in r] == list(range(1, 121))


def test_a_user_error_in_a_worker_is_not_retried_and_names_the_rank(dataset, tmp_path):
    job = processes_job(dataset, optim={"name": "sgd", "lr": 1e6}, cluster={"launcher": "processes", "max_failures": 3})
    with pytest.raises(UserError, match=r"non-finite loss at step \d+") as raised:
        launch(parse_spec(job), run_dir=tmp_path / "nan", progress=False)
    assert str(raised.value).startswith("worker 0: ")
    log = (tmp_path / "nan" / "logs" / "worker-0.log").read_text()
    assert log.count("NonFiniteLossError") >= 1 and "starting the workers again" not in log


def test_ctrl_c_checkpoints_and_leaves_no_worker_behind(dataset, tmp_path):
    """Through `hepml train` with the default launcher, `auto`, which takes the processes launcher on one machine."""
    run_dir = tmp_path / "run"
    job = write_job(tmp_path / "job.yaml", processes_job(
        dataset, data={"steps_per_epoch": 25}, training={"epochs": 2, "eval_interval": 25, "log_interval": 1,
                                                        "seed": 7}, cluster={"launcher": "auto"}))
    stopped = ctrl_c_at_step([*HEPML, "train", str(job), "--run-dir", str(run_dir), "--plain"], run_dir,
                             tmp_path / "train.log",
                             env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert "[hepml] launcher processes (cluster.launcher auto: one machine, no Ray cluster)" in stopped.output
    assert read_run_spec(run_dir).cluster.launcher == "auto"  # chosen again on resume: `--address` would take Ray
    assert "(rank 0) [hepml] step 4/50" in stopped.output  # the workers' lines, echoed by the driver
    assert len(stopped.started) >= 3  # the fork server and two workers
    left = left_running(stopped.started)
    assert not left, f"processes of the stopped run still running: {left}"


def test_what_the_processes_launcher_cannot_do_is_refused_before_anything_starts(tmp_path):
    spec = parse_spec(tiny_job(tmp_path, cluster={"launcher": "processes"}))
    with pytest.raises(UserError, match="joins no cluster"):
        process_workers.check_launch(spec, "head:6379", None)
    with pytest.raises(UserError, match="hepml tune runs its trials on Ray Train"):
        process_workers.check_launch(spec, None, [object()])
    shared = parse_spec(tiny_job(tmp_path, cluster={"launcher": "processes"},
                                 parallel={"num_workers": 2, "gpus_per_worker": 0.5, "accelerator": "A100"}))
    with pytest.raises(UserError, match="gpus_per_worker 0.5"):
        process_workers.check_launch(shared, None, None)
    process_workers.check_launch(spec, "local", None)  # an embedded run is what it is for


def test_auto_takes_the_processes_launcher_unless_the_job_needs_ray(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_running = False  # earlier tests of this session may have left Ray running in this process
    monkeypatch.setitem(sys.modules, "ray", SimpleNamespace(is_initialized=lambda: ray_running))
    auto = parse_spec(tiny_job(tmp_path, cluster={"launcher": "auto"}, parallel={"num_workers": 2}))
    assert parse_spec({k: v for k, v in tiny_job(tmp_path).items() if k != "cluster"}).cluster.launcher == "auto"
    assert choose_launcher(auto) == ("processes", None, "cluster.launcher auto: one machine, no Ray cluster")
    assert choose_launcher(auto, "local").name == "processes"
    joined = choose_launcher(auto, "head:6379")
    assert joined[:2] == ("ray", "head:6379") and "a Ray cluster to join (head:6379)" in joined.reason
    in_spec = auto.model_copy(update={"cluster": auto.cluster.model_copy(update={"address": "auto"})})
    assert choose_launcher(in_spec)[:2] == ("ray", "auto")
    assert "hepml tune" in choose_launcher(auto, tune=True).reason
    shared = parse_spec(tiny_job(tmp_path, cluster={"launcher": "auto"},
                                 parallel={"num_workers": 2, "gpus_per_worker": 0.5, "accelerator": "A100"}))
    assert choose_launcher(shared)[0] == "ray" and "gpus_per_worker 0.5" in choose_launcher(shared).reason
    ray_running = True  # e.g. a notebook that called ray.init(): its Ray is used
    assert choose_launcher(auto) == ("ray", None, "cluster.launcher auto: Ray already runs in this process")
    # Ray itself follows $RAY_ADDRESS when no address is given, so `auto` and `ray` do as well; `processes` does not
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")
    assert choose_launcher(auto)[:2] == ("ray", "head:6379")
    assert choose_launcher(parse_spec(tiny_job(tmp_path)))[:2] == ("ray", "head:6379")
    assert choose_launcher(parse_spec(tiny_job(tmp_path, cluster={"launcher": "processes"})))[:2] == ("processes", None)
    assert choose_launcher(auto, "other:6379").address == "other:6379"  # an explicit address wins


def test_workers_and_the_fork_server_go_when_the_driver_is_killed(dataset, tmp_path):
    run_dir = tmp_path / "run"
    job = write_job(tmp_path / "job.yaml", processes_job(
        dataset, data={"steps_per_epoch": 25}, training={"epochs": 4, "eval_interval": 25, "log_interval": 1,
                                                        "seed": 7}))
    train = subprocess.Popen([*HEPML, "train", str(job), "--run-dir", str(run_dir), "--plain"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_step(run_dir, 2, train)
        started = {p.pid: " ".join(p.cmdline()) for p in psutil.Process(train.pid).children(recursive=True)}
        train.kill()  # SIGKILL: no clean-up of its own
        train.wait(timeout=10)
        left = left_running(started, grace_s=15)
        assert len(started) >= 3 and not left, f"left running after the driver was killed: {left}"
    finally:
        if train.poll() is None:
            os.killpg(train.pid, signal.SIGKILL)
