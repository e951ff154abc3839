"""Faults survived with nothing lost: Ctrl-C (SIGINT) to `hepml train` checkpoints, shuts its embedded Ray down,
exits 130 and prints the command that resumes the run, which continues from that step; SIGTERM's handling (exit 143,
a second signal stops at once); a rank that stops answering fails the run within parallel.collective_timeout_s,
naming the rank that waited and the one that hung."""

import os
import pickle
import signal
import sys
import time
from pathlib import Path

import pytest
import ray
from train_helpers import (  # noqa: F401
    ctrl_c_at_step,
    left_running,
    ray_session,
    tiny_job,
    write_jet_dataset,
    write_job,
)
from typer.testing import CliRunner

from hepml_dist.cli import app
from hepml_dist.errors import UserError
from hepml_dist.runs import load_trained
from hepml_dist.spec import parse_spec
from hepml_dist.track.tracker import read_metrics
from hepml_dist.train import commands, driver, launch, ray_workers
from hepml_dist.train.distributed import CollectiveTimeoutError, naming_collective_timeouts
from hepml_dist.train.signals import StopOnSignals, StoppedAtOnce
from hepml_dist.train.session import STOP_FILE

HEPML = [sys.executable, "-m", "hepml_dist.cli"]
HUNG_AT = "rank1-hung-at"  # when the hung rank stopped answering (seconds since the epoch)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_jet_dataset(tmp_path_factory.mktemp("jets") / "data", examples=1500)


# ---- SIGTERM and SIGINT in the driver: the handler itself ----------------------------------------------------


def test_first_sigterm_asks_to_stop_and_a_second_stops_at_once(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StoppedAtOnce) as stopped, StopOnSignals(tmp_path) as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs in this thread between bytecodes
        assert (tmp_path / STOP_FILE).exists() and signals.first == "SIGTERM"
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's warning after that only asks again
        time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    assert stopped.value.exit_status == 143 and stopped.value.run_dir == tmp_path
    assert signals.received == ["SIGTERM", "SIGUSR1", "SIGTERM"]
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handlers are back


def test_second_ctrl_c_while_ray_waits_stops_at_once(tmp_path, monkeypatch):
    class WaitingInRay:
        def __init__(self, *args, **kwargs):
            pass

        def fit(self):
            try:
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
            except KeyboardInterrupt:
                raise KeyboardInterrupt from None  # what ray.get raises when a signal handler raised inside it

    monkeypatch.setattr(ray_workers, "_Trainer", WaitingInRay)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(StoppedAtOnce) as stopped:
        ray_workers.fit(parse_spec(tiny_job(tmp_path)), tmp_path, False, False, None)
    assert stopped.value.signal_name == "SIGINT" and stopped.value.exit_status == 130
    assert (tmp_path / STOP_FILE).exists() and signal.getsignal(signal.SIGINT) is before


def test_cli_exit_status_and_resume_command_after_a_stop(tmp_path, monkeypatch):
    run_dir = tmp_path / "my run"
    (run_dir / "checkpoints" / "step-00000012").mkdir(parents=True)
    for name in ("model.pt", "state.json"):
        (run_dir / "checkpoints" / "step-00000012" / name).write_text("{}")
    job = write_job(tmp_path / "job.yaml", tiny_job(tmp_path / "data"))
    runner = CliRunner()
    results = {
        "SIGTERM": launch.TrainResult(run_dir, 12, False, True, {}, "SIGTERM"),
        "SIGUSR1": launch.TrainResult(run_dir, 12, False, True, {}, "SIGUSR1"),
    }
    for name, expected in (("SIGTERM", 143), ("SIGUSR1", 0)):
        monkeypatch.setattr(launch, "launch", lambda spec, **kw: results[name])
        done = runner.invoke(commands.app, [str(job), "--address", "head:6379"])
        assert done.exit_code == expected, done.output
        assert f"stopped by {name} at step 12 (checkpoint written)" in done.output
        assert f"to resume: hepml train --resume '{run_dir}' --address head:6379" in done.output

    def second_signal(spec, **kw):
        raise StoppedAtOnce("SIGINT", tmp_path / "fresh")

    monkeypatch.setattr(launch, "launch", second_signal)
    done = runner.invoke(commands.app, [str(job)])
    assert done.exit_code == 130 and "no checkpoint yet: run the same command again" in done.output, done.output


# ---- Ctrl-C to `hepml train`: end to end ------------------------------------------------------------------------


@pytest.mark.integration
def test_ctrl_c_checkpoints_stops_ray_and_prints_a_resume_command(ray_session, dataset, tmp_path):  # noqa: F811
    run_dir = tmp_path / "run"
    job = write_job(tmp_path / "job.yaml", tiny_job(
        dataset, data={"steps_per_epoch": 25}, tracking={"mode": "disabled"},
        training={"epochs": 2, "eval_interval": 25, "log_interval": 1, "seed": 7}))
    # The driver sees a signal when Ray's wait next checks for one, every second by default: longer than the 46 steps
    # left after step 4 take on an idle machine.
    env = {**os.environ, "RAY_get_check_signal_interval_milliseconds": "50"}
    stopped = ctrl_c_at_step([*HEPML, "train", str(job), "--run-dir", str(run_dir)], run_dir, tmp_path / "train.log",
                             env=env)
    assert stopped.step < 50
    spec, model = load_trained(run_dir)
    assert spec.name == "tiny" and sum(p.numel() for p in model.parameters()) > 0
    assert any("raylet" in command for command in stopped.started.values())
    left = left_running(stopped.started, grace_s=0.0)
    assert not left, f"processes of the stopped run still running: {left}"

    assert stopped.resume[:3] == ["hepml", "train", "--resume"]
    # continued by the other launcher (a checkpoint does not depend on it), in this process: no second Ray start
    resumed = CliRunner().invoke(app, [*stopped.resume[1:], "--set", "cluster.launcher=processes", "--plain"])
    assert resumed.exit_code == 0, resumed.output
    assert "launcher processes" in resumed.output and "finished at step 50" in resumed.output
    assert [r["resumed_from"] for r in read_metrics(run_dir) if "resumed_from" in r] == [stopped.step]


# ---- a rank that stops answering ------------------------------------------------------------------------------


def loop_with_rank1_hanging_at_step4(config):
    """Ray's training loop, except that rank 1 never enters the step-flags all-reduce of step 4: a rank stuck in its
    forward or its data (a stuck file system, a GPU fault) while the others wait for it."""
    import ray.train

    from hepml_dist.train import step as step_module

    if ray.train.get_context().get_world_rank() == 1:
        all_reduce, calls = step_module.StepFlags.all_reduce, []

        def hanging(self, device):
            calls.append(1)
            if len(calls) == 4:
                Path(config["run_dir"], HUNG_AT).write_text(str(time.time()))
                time.sleep(3600)
            return all_reduce(self, device)

        step_module.StepFlags.all_reduce = hanging  # this worker process only
    from hepml_dist.train.ray_workers import ray_train_loop  # the worker's own, unpatched module

    return ray_train_loop(config)


@pytest.mark.integration
def test_hung_rank_fails_the_run_in_the_timeout_naming_it(ray_session, dataset, tmp_path, monkeypatch):  # noqa: F811
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    monkeypatch.setattr(ray_workers, "ray_train_loop", loop_with_rank1_hanging_at_step4)
    spec = parse_spec(tiny_job(
        dataset, parallel={"num_workers": 2, "collective_timeout_s": 8}, cluster={"max_failures": 0},
        tracking={"mode": "disabled"}, training={"epochs": 3, "eval_interval": 20, "log_interval": 1, "seed": 7},
        data={"steps_per_epoch": 20}))
    with pytest.raises(UserError) as failed:
        launch.launch(spec, run_dir=tmp_path / "hung", progress=False)
    failed_after = time.time() - float((tmp_path / "hung" / HUNG_AT).read_text())
    message = str(failed.value)
    assert "collective timed out after step 3: rank(s) 0 waited 8 s" in message, message
    assert "rank(s) 1 never joined: likely hung. Check the node of rank 1" in message, message
    assert 8 <= failed_after < 40, failed_after  # the timeout, plus Ray stopping the worker group


def test_timeout_explanation_names_waiting_and_silent_ranks():
    spec = parse_spec(tiny_job(Path("/data"), parallel={"num_workers": 4, "collective_timeout_s": 30}))
    error = type("WorkerGroupError", (Exception,), {})()
    error.worker_failures = {
        2: pickle.loads(pickle.dumps(CollectiveTimeoutError(2, 41, 30))),  # as it comes back from a worker
        0: RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 30000ms for recv operation"),
    }
    message = str(driver.explain_failure(error, spec.parallel))
    assert message.startswith("collective timed out after step 41: rank(s) 0, 2 waited 30 s")
    assert "rank(s) 1, 3 never joined: likely hung" in message
    error.worker_failures.update({1: error.worker_failures[0], 3: error.worker_failures[0]})
    assert "every rank did" in str(driver.explain_failure(error, spec.parallel))


def test_a_timed_out_collective_names_this_rank_and_the_step():
    step = 6
    with pytest.raises(CollectiveTimeoutError, match=r"rank 3 waited 30 s in a collective after step 6"):
        with naming_collective_timeouts(3, 30, lambda: step):
            raise RuntimeError("Application timeout caused pair closure")
    with pytest.raises(ValueError), naming_collective_timeouts(3, 30, lambda: step):
        raise ValueError("not a timeout")
