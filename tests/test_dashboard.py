"""The local dashboard: TensorBoard event files beside metrics.jsonl (scalars, figures, parameters; a resumed run's
curves stay right), `hepml evaluate` sending its test metrics and figures to metrics.jsonl, TensorBoard and the run's
own Comet experiment, the `hepml runs` table (running, finished, stopped, failed, interrupted) and `hepml runs
compare`. Run directories are made by the real tracker and runs.py functions, not by training."""

import base64
import json
import os
import platform
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402
from tensorboard.plugins.hparams import plugin_data_pb2  # noqa: E402
from train_helpers import tiny_job, write_jet_dataset  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from hepml_dist import runs  # noqa: E402
from hepml_dist.cli import app  # noqa: E402
from hepml_dist.cli.lazy import load_command  # noqa: E402
from hepml_dist.errors import UserError  # noqa: E402
from hepml_dist.evaluate.report import Figures  # noqa: E402
from hepml_dist.models import build_model  # noqa: E402
from hepml_dist.spec import load_job, parse_spec  # noqa: E402
from hepml_dist.track import records, tensorboard  # noqa: E402
from hepml_dist.track.commands import RUNS_COMMANDS  # noqa: E402
from hepml_dist.track.compare import compare_figure, curves_of  # noqa: E402
from hepml_dist.track.tracker import make_results_tracker, make_tracker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "part-quickstart.yaml"  # 4 epochs x 50 steps; best by val_jet_class_accuracy (max)
runner = CliRunner()


def events(run_dir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(run_dir / records.TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0})
    accumulator.Reload()
    return accumulator


def scalars(accumulator: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, round(e.value, 6)) for e in accumulator.Scalars(tag)]


def job(name: str, *overrides: str):
    return load_job(JOB, [f"name={name}", "tracking.mode=disabled", *overrides])


def small_figure():
    figure, ax = plt.subplots(figsize=(3, 2))
    ax.plot([0, 1], [1, 0])
    return figure


# ----------------------------------------------------------------------------------------------------------------
# TensorBoard


def test_event_files_hold_scalars_figures_and_parameters(tmp_path):
    spec = job("tb")
    tracker = make_tracker(spec, tmp_path, rank=0, info={"git_commit": "abc123"})
    for step in (10, 20, 30):
        tracker.log_metrics({"train_loss": 1.0 / step, "lr": 1e-3}, step=step, epoch=0)
    tracker.log_metrics({"val_loss": 0.25, "val_jet_class_accuracy": 0.75}, step=30, epoch=0)
    tracker.close()
    results = make_results_tracker(spec, tmp_path, "test")
    figure = small_figure()
    results.log_metrics({"test_loss": 0.5}, step=30, epoch=0)
    results.log_figure("roc_jet_class", figure, step=30)
    results.close()
    plt.close(figure)

    found = events(tmp_path)
    assert scalars(found, "train/train_loss") == [(10, 0.1), (20, 0.05), (30, round(1 / 30, 6))]
    assert scalars(found, "run/lr") == [(s, 0.001) for s in (10, 20, 30)]
    assert scalars(found, "val/val_jet_class_accuracy") == [(30, 0.75)]
    assert scalars(found, "test/test_loss") == [(30, 0.5)]
    [image] = found.Images("roc_jet_class")
    assert image.step == 30 and image.encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"
    assert (image.width, image.height) == plt.imread(tmp_path / "plots" / "roc_jet_class.png").shape[1::-1]
    text = found.Tensors("params/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "abc123" in text and '"lr": 0.001' in text
    hparams = found.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["optim.lr"].number_value == pytest.approx(1e-3)
    assert start.hparams["model.family"].string_value == "part"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {"val/val_loss", "val/val_jet_class_accuracy"}


def test_a_resumed_run_replaces_the_points_after_its_checkpoint(tmp_path):
    spec = job("resumed")
    first = make_tracker(spec, tmp_path, rank=0)
    for step in (10, 20, 30, 40):
        first.log_metrics({"train_loss": float(step)}, step=step)
    first.close()
    resumed = make_tracker(spec, tmp_path, rank=0, resume_step=20)
    for step in (30, 40):
        resumed.log_metrics({"train_loss": -float(step)}, step=step)
    resumed.close()
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    expected = [(10, 10.0), (20, 20.0), (30, -30.0), (40, -40.0)]
    assert scalars(events(tmp_path), "train/train_loss") == expected
    assert [(r["step"], r["train_loss"]) for r in records.read_metrics(tmp_path)] == expected


def test_tensorboard_off_or_missing(tmp_path, monkeypatch):
    make_tracker(job("no-tb", "tracking.tensorboard=false"), tmp_path / "no-tb", rank=0).close()
    assert not (tmp_path / "no-tb" / "tensorboard").exists()
    monkeypatch.setattr(tensorboard, "SummaryWriter", None)  # as if the package were not installed
    with pytest.raises(UserError, match=r"`tensorboard` package is not installed.*tracking.tensorboard=false"):
        make_tracker(job("missing"), tmp_path / "missing", rank=0)


def test_report_figures_are_drawn_once_and_logged_by_name(tmp_path):
    spec = job("report")
    tracker = make_results_tracker(spec, tmp_path, "test")
    embedded = Figures(tracker, step=120).png(small_figure(), "tau_id_roc")
    tracker.close()
    saved = (tmp_path / "plots" / "report" / "tau_id_roc.png").read_bytes()
    assert base64.b64decode(embedded) == saved
    [image] = events(tmp_path).Images("report/tau_id_roc")
    assert image.step == 120 and image.encoded_image_string == saved


# ----------------------------------------------------------------------------------------------------------------
# hepml evaluate -> the run's trackers


def test_evaluate_logs_test_metrics_and_figures_to_every_tracker(tmp_path, monkeypatch):
    monkeypatch.setenv("COMET_OFFLINE_DIRECTORY", str(tmp_path / "elsewhere"))  # the tracker names its own folder
    from hepml_dist.evaluate.runner import evaluate_run

    data = write_jet_dataset(tmp_path / "data", examples=400, chunk_size=64, chunks_per_shard=2)
    spec = parse_spec(tiny_job(data, data={"batch_size": 50}))  # tracking.mode: offline
    run_dir = tmp_path / "run"
    training = make_tracker(spec, run_dir, rank=0)  # the training run's experiment and its key
    training.log_metrics({"train_loss": 0.7}, step=12, epoch=1)
    training.close()
    key = json.loads((run_dir / "comet" / "experiment.json").read_text())["key"]
    torch.manual_seed(0)
    runs.write_model_checkpoint(runs.checkpoint_folder(run_dir, 12), spec, build_model(spec),
                                {"step": 12, "epoch": 1, "finished": True})

    report = evaluate_run(run_dir, "test", max_batches=2)

    auc = report["metrics"]["test_is_signal_auc"]
    record = records.read_metrics(run_dir)[-1]
    assert record["evaluation"] == "test" and record["step"] == 12 and record["test_is_signal_auc"] == auc
    assert records.training_records(records.read_metrics(run_dir)) == records.read_metrics(run_dir)[:1]
    found = events(run_dir)
    assert scalars(found, "test/test_is_signal_auc") == [(12, round(auc, 6))]
    assert {"roc_is_signal", "confusion_is_signal", "response_size"} <= set(found.Tags()["images"])
    assert (run_dir / "plots" / "roc_is_signal.png").read_bytes()[:4] == b"\x89PNG"
    archives = {a.name for a in (run_dir / "comet").glob("*.zip")}
    [evaluation] = archives - {f"{key}.zip"}  # the training's archive, and the evaluation's
    assert f"{key}.zip" in archives and evaluation.startswith(f"{key}-")
    with zipfile.ZipFile(run_dir / "comet" / evaluation) as archive:
        experiment = json.loads(archive.read("experiment.json"))
        messages = archive.read("messages.json").decode()
    assert experiment["offline_id"] == key and experiment["resume_strategy"] == "get"  # appends to the run's
    assert '"test_is_signal_auc"' in messages and '"roc_is_signal"' in messages
    assert not (tmp_path / "elsewhere").exists()


# ----------------------------------------------------------------------------------------------------------------
# hepml runs


def fake_run(root: Path, name: str, *, last_step: int, checkpoint: dict | None = None, failure: str | None = None,
             keep_open: bool = False):
    """A run directory as training leaves it: spec.yaml, metrics.jsonl every 50 steps (validation every 100),
    a checkpoint (state.json as given, best.json) at the last validation."""
    spec = job(name, "tracking.tensorboard=false")
    run_dir = root / name
    run_dir.mkdir(parents=True)
    runs.write_run_spec(run_dir, spec)
    tracker = make_tracker(spec, run_dir, rank=0)
    for step in range(50, last_step + 1, 50):
        tracker.log_metrics({"train_loss": 10.0 / step}, step=step, epoch=(step - 1) // 50)
        if step % 100 == 0:
            metrics = {"val_loss": 5.0 / step, "val_jet_class_accuracy": 0.5 + step / 1000}
            tracker.log_metrics(metrics, step=step, epoch=(step - 1) // 50)
            if checkpoint is not None:
                folder = runs.write_model_checkpoint(runs.checkpoint_folder(run_dir, step), spec, torch.nn.Linear(1, 1),
                                                     {"step": step, **checkpoint})
                runs.update_best(run_dir, folder.name, metrics, "val_jet_class_accuracy", "max")  # as training does
    if failure:
        runs.record_failure(run_dir, failure)
    if not keep_open:
        tracker.close()
    return tracker


@pytest.fixture(scope="module")
def runs_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    fake_run(root, "finished", last_step=200, checkpoint={"finished": True})
    fake_run(root, "stopped", last_step=100, checkpoint={"stopped": True})
    fake_run(root, "failed", last_step=150, failure="non-finite loss at step 150 (epoch 2) in task(s) jet_class")
    fake_run(root / "sweep" / "trials", "interrupted", last_step=100, checkpoint={})
    running = fake_run(root, "running", last_step=100, checkpoint={"finished": True}, keep_open=True)
    for name in ("starting", "never-started"):  # launched: spec.yaml written, the workers not logging yet
        (root / name).mkdir()
        runs.write_run_spec(root / name, job(name))
    an_hour_ago = time.time() - 3600
    os.utime(root / "never-started" / "spec.yaml", (an_hour_ago, an_hour_ago))
    # a test evaluation of the finished run: not a training step, not a validation
    results = make_results_tracker(job("finished", "tracking.tensorboard=false"), root / "finished", "test")
    results.log_metrics({"test_loss": 9.0, "val_loss": 9.0}, step=400, epoch=7)
    results.close()
    yield root
    running.close()


def test_runs_table_says_where_each_run_stands(runs_root):
    result = runner.invoke(app, ["runs", str(runs_root), "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert {name: row["state"] for name, row in rows.items()} == {
        "failed": "failed", "finished": "finished", "running": "running", "stopped": "stopped",
        "sweep/trials/interrupted": "interrupted", "starting": "starting", "never-started": "interrupted"}
    finished = rows["finished"]
    assert (finished["family"], finished["step"], finished["total_steps"], finished["epoch"], finished["epochs"]) == \
        ("part", 200, 200, 4, 4)
    assert (finished["best_metric"], finished["best_value"], finished["best_step"]) == ("val_jet_class_accuracy", 0.7, 200)
    assert finished["last_val_loss"] == 5.0 / 200 and finished["started"][:2] == "20"
    assert rows["stopped"]["step"] == 100 and rows["stopped"]["epoch"] == 2
    failed = rows["failed"]
    assert failed["error"].startswith("non-finite loss") and failed["step"] == 150
    assert (failed["best_value"], failed["best_step"]) == (0.6, 100)  # no checkpoint: the best logged value

    table = runner.invoke(app, ["runs", str(runs_root)])
    assert table.exit_code == 0, table.output
    line = next(line for line in table.stdout.splitlines() if "sweep/trials/interrupted" in line)
    assert "interrupted" in line and "100/200" in line and "val_jet_class_accuracy 0.6 @100" in line
    assert "failed: non-finite loss at step 150" in table.stderr


def test_running_means_a_live_process_logs_to_the_run(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    mark = run_dir / records.RUNNING_FILE
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    mark.write_text(json.dumps({"host": platform.node(), "pid": int(gone.stdout)}))
    assert not records.training_in_progress(run_dir)  # killed without closing its tracker
    mark.write_text(json.dumps({"host": "another-node", "pid": 1}))
    assert records.training_in_progress(run_dir)
    assert not records.training_in_progress(run_dir, now=mark.stat().st_mtime + records.SILENT_AFTER_S + 1)


def test_runs_errors_and_an_empty_folder(tmp_path):
    missing = runner.invoke(app, ["runs", str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "no such folder" in missing.output
    empty = runner.invoke(app, ["runs", str(tmp_path)])
    assert empty.exit_code == 0 and "no run directories" in empty.stdout
    assert runner.invoke(app, ["runs", str(tmp_path), "--json"]).stdout.strip() == "[]"


def test_runs_table_imports_neither_torch_nor_plotting(runs_root):
    probe = ("import sys\nfrom hepml_dist.cli import app\ntry:\n    app(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print('HEAVY', sorted({m.split('.')[0] for m in sys.modules} & "
             "{'torch', 'ray', 'matplotlib', 'mplhep', 'comet_ml', 'tensorboard', 'sklearn'}))")
    out = subprocess.run([sys.executable, "-c", probe, "runs", str(runs_root)], capture_output=True, text=True,
                         timeout=60)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr
    assert "sweep/trials/interrupted" in out.stdout


def test_compare_draws_one_curve_per_run(runs_root, tmp_path):
    names = ["finished", "stopped", "failed"]
    out = tmp_path / "val.png"
    result = runner.invoke(app, ["runs", "compare", *names, "--root", str(runs_root), "--metric", "val_loss",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "val_loss of 3 runs" in result.stdout
    curves = curves_of([runs_root / n for n in names], "val_loss")
    assert curves["finished"] == ([100, 200], [0.05, 0.025])  # the evaluation's val_loss is not a point
    figure = compare_figure(curves, "val_loss")
    lines = figure.axes[0].get_lines()
    assert [line.get_label() for line in lines] == names
    assert [t.get_text() for t in figure.axes[0].get_legend().get_texts()] == names
    assert list(lines[1].get_xdata()) == [100]
    plt.close(figure)


def test_compare_names_what_is_missing(runs_root, tmp_path):
    result = runner.invoke(app, ["runs", "compare", str(runs_root / "stopped"), "--metric", "val_auc",
                                 "--out", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert "no `val_auc`" in result.output and "val_jet_class_accuracy" in result.output
    unknown = runner.invoke(app, ["runs", "compare", "nope", "--root", str(runs_root)])
    assert unknown.exit_code == 2 and "not a run directory" in unknown.output


def test_compare_help_line_matches_the_command():
    command = load_command("compare", RUNS_COMMANDS["compare"])
    assert command.help.splitlines()[0] == RUNS_COMMANDS["compare"].help
