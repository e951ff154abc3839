"""Checks `hepml train` makes before it starts anything: a job that cannot run here fails at once, clearly."""

import torch
from typer.testing import CliRunner

from hepml_dist.cli import app


def test_job_asking_for_gpus_this_machine_lacks_fails_before_starting(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    run_dir = tmp_path / "run"
    # multipartau.yaml: 1 worker x 1 A100 (an embedded Ray would wait for it forever)
    result = CliRunner().invoke(app, ["train", "jobs/multipartau.yaml", "--run-dir", str(run_dir)])
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "parallel:" in text and "GPU(s), and this machine has 0" in text
    assert "--set parallel.accelerator=cpu --set parallel.gpus_per_worker=0" in text
    assert not run_dir.exists()  # nothing written for a job that never started


def test_local_data_that_does_not_resolve_fails_before_ray_starts_naming_the_field(tmp_path, monkeypatch):
    from data_helpers import write_jets

    import hepml_dist.train.ray_workers as ray_workers

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a job whose data cannot be read")

    monkeypatch.setattr(ray_workers, "start_ray", no_ray)
    data = tmp_path / "jets"
    write_jets(data, 120)
    cpu = ["--set", "parallel.accelerator=cpu", "--set", "parallel.gpus_per_worker=0"]
    cases = [
        (["--set", f"data.train={tmp_path / 'missing' / 'train'}"], "data.train:", "does not exist"),
        (["--set", f"data.train={data / 'train'}", "--set", f"data.val={data / 'val' / 'nothing-*.tar'}"],
         "data.val:", "matches no shard"),
        (["--set", f"data.train={data}"], "data.train:", "is a dataset root"),
    ]
    # data.test is not read by training (it may not exist yet): a run with only that missing gets past the check
    cases_past = ["--set", f"data.train={data / 'train'}", "--set", f"data.val={data / 'val'}",
                  "--set", f"data.test={tmp_path / 'later' / 'test'}"]
    result = CliRunner().invoke(app, ["train", "jobs/multipartau-quickstart.yaml", "--run-dir", str(tmp_path / "r"),
                                      *cpu, *cases_past])
    assert isinstance(result.exception, AssertionError) and "Ray was started" in str(result.exception), result.output
    for overrides, field, problem in cases:
        run_dir = tmp_path / "run"
        result = CliRunner().invoke(app, ["train", "jobs/multipartau-quickstart.yaml", "--run-dir", str(run_dir),
                                          *cpu, *overrides])
        text = " ".join(result.output.split())
        assert result.exit_code == 2, result.output
        assert field in text and problem in text, text
        assert not run_dir.exists()


def test_progress_bar_follows_metrics_jsonl_with_step_loss_rate_and_eta(tmp_path):
    import io
    import json
    import time

    from rich.console import Console

    from hepml_dist.spec import load_job
    from hepml_dist.train.driver import ProgressBar

    spec = load_job("jobs/aot-quickstart.yaml", ["training.epochs=2", "data.steps_per_epoch=50"])
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=160)
    with ProgressBar(spec, tmp_path, enabled=True, console=console) as bar:
        with (tmp_path / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": 30, "epoch": 0, "train_loss": 0.4321, "jets_per_s": 1234.0}) + "\n")
        deadline = time.monotonic() + 10
        while bar.progress.tasks[0].completed != 30 and time.monotonic() < deadline:
            time.sleep(0.1)
        task = bar.progress.tasks[0]
        assert (task.completed, task.total) == (30, 100)
        assert task.fields["info"] == "epoch 1  loss 0.4321  1234 events/s"  # AOT counts events, not jets
        # a record caught half-written is read whole at a later poll, not skipped
        record = json.dumps({"step": 60, "epoch": 1, "train_loss": 0.2, "jets_per_s": 99.0}) + "\n"
        with (tmp_path / "metrics.jsonl").open("a") as f:
            f.write(record[:20])
            f.flush()
            time.sleep(1.2)  # more than two polls of the bar
            f.write(record[20:])
        deadline = time.monotonic() + 10
        while bar.progress.tasks[0].completed != 60 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert bar.progress.tasks[0].completed == 60
    assert "30/100" in screen.getvalue() and "events/s" in screen.getvalue()
    # without a terminal: no bar (the workers' plain log lines are the progress)
    with ProgressBar(spec, tmp_path, enabled=False) as off:
        assert not hasattr(off, "progress")


def test_startup_record_holds_each_phase_between_consecutive_marks_and_the_total():
    import time

    from hepml_dist.train.startup import PHASES, StartupClock

    clock = StartupClock({"start": 100.0, "cli": 101.5, "plan": 102.0, "ray": 104.0})
    worker_side = StartupClock(clock.marks)  # as the train loop config carries it to rank 0
    for phase, at in zip(list(PHASES)[3:], (110.0, 110.25, 110.5, 111.0, 112.0)):
        worker_side.marks[phase] = at
    record = worker_side.record()
    assert record == {"startup/cli_s": 1.5, "startup/plan_s": 0.5, "startup/ray_s": 2.0, "startup/workers_s": 6.0,
                      "startup/model_s": 0.25, "startup/data_s": 0.25, "startup/engine_s": 0.5,
                      "startup/first_step_s": 1.0, "startup/total_s": 12.0}
    assert clock.marks == {"start": 100.0, "cli": 101.5, "plan": 102.0, "ray": 104.0}  # the driver's copy is unchanged
    # a run without Ray (cluster.launcher processes) has no `ray` mark: its workers phase starts at `plan`
    without_ray = StartupClock({"start": 100.0, "cli": 101.5, "plan": 102.0, "workers": 105.0})
    assert without_ray.record()["startup/workers_s"] == 3.0
    started = StartupClock.from_process_start().marks["start"]  # this process's start, from the OS
    assert 0 < time.time() - started < 24 * 3600


def test_cpu_workers_get_one_malloc_arena_unless_the_user_chose(monkeypatch):
    """Ray Train's training thread would otherwise get its own arena, whose heaps are unmapped and mapped again
    every step (hepml_dist/train/driver.py); GPU workers keep glibc's default; a user's own value wins."""
    from hepml_dist.spec import load_job
    from hepml_dist.train.environment import worker_env

    cpu = load_job("multipartau-quickstart.yaml")
    gpu = load_job("multipartau.yaml")
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert worker_env(cpu, embedded=True)["MALLOC_ARENA_MAX"] == "1"
    assert "MALLOC_ARENA_MAX" not in worker_env(gpu, embedded=True)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert worker_env(cpu, embedded=True)["MALLOC_ARENA_MAX"] == "4"


def test_embedded_ray_starts_no_cluster_only_actors_but_a_cluster_keeps_them(monkeypatch):
    """On an embedded Ray the trainer leaves out the placement-group cleaner and the autoscaling coordinator (each
    a process importing Ray Train and Ray Data); joining a cluster keeps both. Ray Data's callback is left out
    either way (no datasets)."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

    from hepml_dist.train.ray_workers import FixedSizeOnOneMachine, _Trainer

    def kinds(trainer):
        return {type(c) for c in trainer._create_default_callbacks()}

    scaling = ScalingConfig(num_workers=2)
    embedded = _Trainer(lambda: None, scaling_config=scaling, embedded=True)
    cluster = _Trainer(lambda: None, scaling_config=scaling, embedded=False)
    assert PlacementGroupCleanerCallback not in kinds(embedded) and DatasetsCallback not in kinds(embedded)
    assert PlacementGroupCleanerCallback in kinds(cluster) and DatasetsCallback not in kinds(cluster)

    seen = []
    monkeypatch.setattr(TorchTrainer, "_initialize_and_run_controller", lambda self, **kw: seen.append(kw))
    for trainer in (embedded, cluster):
        trainer._initialize_and_run_controller(scaling_policy=FixedScalingPolicy(scaling))
    assert type(seen[0]["scaling_policy"]) is FixedSizeOnOneMachine
    assert type(seen[1]["scaling_policy"]) is FixedScalingPolicy
    policy = seen[0]["scaling_policy"]
    policy.after_controller_start(None)  # registers nothing: no coordinator actor is created
    assert policy._coordinator_client is None
    assert policy.make_decision_for_non_running_worker_group().num_workers == 2


def test_embedded_worker_setup_quiets_ray_train_loggers_without_importing_ray_train():
    import subprocess
    import sys

    code = ("import sys, logging; from hepml_dist.train import ray_setup; ray_setup.quiet_embedded_ray_worker(); "
            "assert 'ray.train' not in sys.modules; "
            "from ray.train.v2._internal.execution import context; "
            "assert context.logger.level == logging.WARNING, context.logger.name; "  # set on the very logger
            "from ray.train.v2._internal.execution.controller import placement_group_cleaner as cleaner; "
            "assert cleaner.logger.level == logging.ERROR, cleaner.logger.name")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_complete_lines_waits_for_the_end_of_a_line_and_follows_a_file_cut_shorter(tmp_path):
    from hepml_dist.train.driver import complete_lines

    path = tmp_path / "metrics.jsonl"
    assert complete_lines(path, 0) == ([], 0)  # not written yet
    path.write_bytes(b'{"step": 1}\n{"st')
    lines, offset = complete_lines(path, 0)
    assert (lines, offset) == (['{"step": 1}'], 12)
    with path.open("ab") as f:
        f.write(b'ep": 2}\n')
    assert complete_lines(path, offset) == (['{"step": 2}'], 24)
    path.write_bytes(b'{"step": 1}\n')  # rewritten shorter: a restart dropped the records after its checkpoint
    lines, offset = complete_lines(path, 24)
    assert (lines, offset) == ([], 12)
    with path.open("ab") as f:
        f.write(b'{"step": 2}\n')
    assert complete_lines(path, offset) == (['{"step": 2}'], 24)
