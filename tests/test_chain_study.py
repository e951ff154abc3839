"""`hepml chain study`: the study table of 9 pretrain / fine-tune models from their metrics.json and metrics.jsonl,
on run directories made here in the formats `hepml evaluate` and the training loop write."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from hepml_dist import files
from hepml_dist.chain.study import parse_run_arguments, read_run, study_command, task_and_mode, write_study
from hepml_dist.errors import UserError
from hepml_dist.evaluate.metrics import number
from hepml_dist.track.tracker import LocalTracker

RNG = np.random.default_rng(7)


def tagging_metrics(split: str = "test", lower_bound: bool = False) -> dict[str, float]:
    auc, r50, r90 = RNG.uniform(0.9, 0.99), RNG.uniform(50, 500), RNG.uniform(5, 30)
    return {f"{split}_loss": 0.2, f"{split}_tau_id_loss": 0.2, f"{split}_tau_id_accuracy": RNG.uniform(0.8, 0.95),
            f"{split}_tau_id_auc": auc, f"{split}_tau_id_rejection_at_50": r50,
            f"{split}_tau_id_rejection_at_50_is_lower_bound": float(lower_bound),
            f"{split}_tau_id_rejection_at_90": r90, f"{split}_tau_id_rejection_at_90_is_lower_bound": 0.0}


def decaymode_metrics() -> dict[str, float]:
    return {"test_loss": 0.9, "test_decay_mode_loss": 0.9, "test_decay_mode_accuracy": RNG.uniform(0.6, 0.9),
            "test_decay_mode_rejection_at_50_h_pi0": 12.0, "test_decay_mode_rejection_at_50_h_pi0_is_lower_bound": 0.0}


def kinematics_metrics() -> dict[str, float]:
    return {"test_loss": 0.01, "test_kinematics_loss": 0.01, "test_kinematics_response_median": RNG.uniform(0.95, 1.05),
            "test_kinematics_resolution": RNG.uniform(0.02, 0.2), "test_kinematics_log_pt_ratio_resolution": 7.0}


def make_run(run_dir: Path, metrics: dict[str, float] | None, val_losses: list[float] | None) -> Path:
    """A run directory as training (metrics.jsonl, through the local tracker) and `hepml evaluate` (metrics.json)
    leave it; None: that file is missing."""
    run_dir.mkdir(parents=True)
    if val_losses is not None:
        tracker = LocalTracker(run_dir)
        for i, loss in enumerate(val_losses):
            step = 10 * (i + 1)
            tracker.log_metrics({"train_loss": 5.0 + i, "lr": 1e-3}, step=step, epoch=0)
            tracker.log_metrics({"val_loss": loss, "val_tau_id_loss": loss}, step=step, epoch=0)
        tracker.close()
        test_tracker = LocalTracker(run_dir, fields={"evaluation": "test"})
        test_tracker.log_metrics({"val_loss": 123.0}, step=10 * len(val_losses))  # an evaluation record: not a curve
        test_tracker.close()
    if metrics is not None:
        files.write_json(run_dir / "metrics.json", {"checkpoint": str(run_dir / "checkpoints/step-30"), "split": "test",
                                                    "examples": {"t": 100}, "metrics": metrics})
    return run_dir


def markdown_table(text: str) -> dict[tuple[str, str], dict[str, str]]:
    """The first markdown table of study.md as {(task cell, metric): {mode: cell}}."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) != len(header) or cells[0] == "run":
            break
        rows[(cells[0], cells[1])] = dict(zip(header[2:], cells[2:]))
    return rows


def test_nine_models_side_by_side_with_missing_ones_marked(tmp_path: Path) -> None:
    curves = {mode: sorted(RNG.uniform(0.1, 1.0, 3), reverse=True) for mode in ("scratch", "frozen", "finetune")}
    metrics = {"tagging-scratch": tagging_metrics(), "tagging-frozen": tagging_metrics(lower_bound=True),
               "tagging-finetune": tagging_metrics(), "decaymode-scratch": decaymode_metrics(),
               "decaymode-frozen": decaymode_metrics(), "kinematics-scratch": kinematics_metrics(),
               "kinematics-finetune": kinematics_metrics()}
    runs = {}
    for name in [f"{t}-{m}" for t in ("tagging", "decaymode", "kinematics") for m in ("scratch", "frozen", "finetune")]:
        runs[name] = tmp_path / "runs" / name
        if name == "decaymode-finetune":
            continue  # its stage never ran
        make_run(runs[name], metrics.get(name), None if name == "kinematics-finetune" else curves[task_and_mode(name)[1]])
    page = write_study(runs, tmp_path / "study", "OmniJet-alpha tau study")

    table = markdown_table((tmp_path / "study" / "study.md").read_text())
    auc = {m: metrics[f"tagging-{m}"]["test_tau_id_auc"] for m in ("scratch", "frozen", "finetune")}
    best = max(auc, key=auc.get)
    for mode, value in auc.items():
        cell = table[("tagging (`tau_id`)", "ROC AUC")][mode]
        assert cell == (f"**{number(value, 4)}**" if mode == best else number(value, 4))
    r50 = table[("tagging (`tau_id`)", "background rejection at 50 % signal efficiency")]
    assert r50["frozen"].strip("*") == ">= " + number(metrics["tagging-frozen"]["test_tau_id_rejection_at_50"], 3)
    assert ("tagging (`tau_id`)", "background rejection at 90 % signal efficiency") in table
    accuracy = table[("decaymode (`decay_mode`)", "accuracy")]
    assert accuracy["scratch"].strip("*") == number(metrics["decaymode-scratch"]["test_decay_mode_accuracy"], 4)
    assert accuracy["finetune"] == "missing"
    resolution = table[("kinematics (`kinematics`)", "response resolution (IQR / median)")]
    assert resolution["frozen"] == "not evaluated"
    lower = min(metrics[f"kinematics-{m}"]["test_kinematics_resolution"] for m in ("scratch", "finetune"))
    assert f"**{number(lower, 3)}**" in resolution.values()  # lower is better for a resolution
    assert ("kinematics (`kinematics`)", "response median") in table
    # only the headline metrics: no per-class rejection, no per-target duplicate
    assert not [key for key in table if "h_pi0" in key[1] or "log_pt_ratio" in key[1]]

    text = (tmp_path / "study" / "study.md").read_text()
    assert "run directory" in text and f"{runs['decaymode-finetune']} does not exist" in text
    assert f"no metrics.json in {runs['kinematics-frozen']}" in text
    assert "kinematics-finetune: no val_loss records" in text
    for task in ("tagging", "decaymode", "kinematics"):
        assert f"![{task}](curves-{task}.png)" in text and (tmp_path / "study" / f"curves-{task}.png").is_file()
    html = page.read_text()
    assert len(re.findall(r'src="data:image/png;base64,', html)) == 3 and "<img" in html and 'src="curves' not in html
    assert "missing" in html and "not evaluated" in html

    # the plotted curve: the training loop's val_loss records, not the training losses or the evaluation's
    frozen = read_run("tagging-frozen", runs["tagging-frozen"])
    assert frozen.curve == [(10 * (i + 1), loss) for i, loss in enumerate(curves["frozen"])]
    assert (frozen.task, frozen.mode, frozen.split) == ("tagging", "frozen", "test")


def test_the_command_takes_name_equals_run_dir(tmp_path: Path) -> None:
    make_run(tmp_path / "a", tagging_metrics(), [0.5, 0.4])
    app = typer.Typer()
    app.command()(study_command)
    result = CliRunner().invoke(app, [f"pretrained-frozen={tmp_path / 'a'}", "--out", str(tmp_path / "out"),
                                      "--title", "small study"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "study.html").is_file()
    assert (tmp_path / "out" / "study.md").read_text().startswith("# small study\n")
    with pytest.raises(UserError, match="NAME=RUN_DIR"):
        parse_run_arguments([str(tmp_path / "a")])
    with pytest.raises(UserError, match="both task 'baseline', mode 'run'"):
        write_study({"baseline": tmp_path / "a", "baseline-run": tmp_path / "a"}, tmp_path / "out2", "t")
    assert task_and_mode("omnijet-tau-tagging-finetune") == ("omnijet-tau-tagging", "finetune")
    assert task_and_mode("baseline") == ("baseline", "run")
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["split"] == "test"


def test_a_chain_file_names_the_runs_by_job_stage(tmp_path: Path) -> None:
    job = Path(__file__).resolve().parents[1] / "jobs/part-quickstart.yaml"
    chain = tmp_path / "study.yaml"
    chain.write_text(f"""\
name: small
description: scratch against frozen
stages:
  tagging-scratch: {{job: {job}}}
  tagging-frozen: {{job: {job}}}
  unrelated: {{job: {job}}}
  table: {{step: study, stages: [tagging-scratch, tagging-frozen], out: {tmp_path / 'table'}}}
""")
    scratch, frozen = tagging_metrics(), tagging_metrics()
    make_run(tmp_path / "work/runs/tagging-scratch", scratch, [0.6, 0.5])
    make_run(tmp_path / "work/runs/tagging-frozen", frozen, [0.4, 0.3])
    app = typer.Typer()
    app.command("study")(study_command)
    app.command("other")(lambda: None)  # two commands: the app takes the command's name, as `hepml chain` does
    result = CliRunner().invoke(app, ["study", str(chain), "--workdir", str(tmp_path / "work"),
                                      "--out", str(tmp_path / "table")])
    assert result.exit_code == 0, result.output
    text = (tmp_path / "table" / "study.md").read_text()
    assert text.startswith("# scratch against frozen\n") and "unrelated" not in text
    auc = markdown_table(text)[("tagging (`tau_id`)", "ROC AUC")]
    assert auc["scratch"].strip("*") == number(scratch["test_tau_id_auc"], 4)
    assert auc["frozen"].strip("*") == number(frozen["test_tau_id_auc"], 4)
