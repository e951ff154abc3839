"""Every shipped quickstart (ParT, MultiParTau, AOT, MLPF) end to end as a user runs it: tiny data from the real
generator (`hepml data generate`), a few dozen steps of `hepml train JOB --set ...` on the embedded Ray, `hepml
evaluate`, `hepml report --no-track`. The report holds its family's sections and baseline and no other family's; one
number of each is recomputed here from the stored predictions; a ParT run whose test data lack a column of the
jet-class baseline stops with exit 2 before any work. (OmniJet-alpha's tau fine-tune is tested on its own.)"""

import json
import math
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import roc_auc_score
from train_helpers import ray_session  # noqa: F401
from typer.testing import CliRunner

from hepml_dist.cli import app
from hepml_dist.data.manifest import read_manifest
from hepml_dist.data.reader import iter_shard_chunks
from hepml_dist.evaluate.baseline import JET_QUANTITIES
from hepml_dist.evaluate.report import load_predictions

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

# Shrinks every quickstart to seconds: one worker, no loader processes, no trackers, one validation batch (and one
# validation, at the last step: eval_interval = the steps of the run).
COMMON = ["parallel.num_workers=1", "data.loader_workers=0", "data.val_steps=1", "tracking.mode=disabled",
          "schedule.warmup_steps=2"]
SECTIONS_OF_OTHER_FAMILIES = {"jet_class", "tau_id", "charge", "decay_mode", "kinematics", "signal",
                              "signal_significance", "existence", "particle_class", "mlpf-response", "mlpf-particles",
                              "baseline"}


def generate(process: str, events: int, out: Path, seed: int) -> Path:
    made = runner.invoke(app, ["data", "generate", process, "--events", str(events), "--out", str(out),
                               "--seed", str(seed), "--workers", "1"])
    assert made.exit_code == 0, made.output
    return out


def class_counts(data: Path, split: str, label: str) -> dict[int, int]:
    return {int(k): v for k, v in read_manifest(data).splits[split].class_counts[label].items() if int(k) >= 0}


def train_evaluate_report(job: str, data: Path, run_dir: Path, overrides: list[str], steps: int) -> None:
    """`hepml train` (embedded Ray, shared with the session), `hepml evaluate`, `hepml report --no-track`; prints the
    wall and this process's CPU seconds of each (the Ray workers train in processes of their own)."""
    sets = [f"data.{s}={data / s}" for s in ("train", "val", "test")] + COMMON + overrides
    commands = {
        "train": ["train", str(ROOT / "jobs" / job), "--run-dir", str(run_dir), "--plain",
                  *[arg for value in sets for arg in ("--set", value)]],
        "evaluate": ["evaluate", str(run_dir)],
        "report": ["report", str(run_dir), "--no-track"],
    }
    seconds = []
    for name, command in commands.items():
        wall, cpu = time.perf_counter(), time.process_time()
        done = runner.invoke(app, command)
        assert done.exit_code == 0, done.output
        if name == "train":
            assert f"finished at step {steps}" in done.output, done.output
        seconds.append(f"{name} {time.perf_counter() - wall:.1f} s (cpu {time.process_time() - cpu:.1f} s)")
    print(f"{job}: " + ", ".join(seconds))


def anchors(page: str) -> list[str]:
    """The report's sections, by the anchors of their headings, in page order."""
    return re.findall(r'<h2 id="([^"]+)">', page)


def summary_columns(page: str) -> list[str]:
    header = re.search(r"<tr><th>metric \(test split\)</th>(.*?)</tr>", page).group(1)
    return re.findall(r"<th>(.*?)</th>", header)


def summary_cell(page: str, metric: str, column: int) -> str:
    row = re.search(rf"<tr><td>{re.escape(metric)}</td>(.*?)</tr>", page).group(1)
    return re.findall(r"<td[^>]*>([^<]*)</td>", row)[column]


def check_sections(page: str, expected: list[str]) -> None:
    found = anchors(page)
    assert found == ["summary", "facts", *expected], found
    assert not (SECTIONS_OF_OTHER_FAMILIES - set(expected)) & set(found)


def discriminant(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """log(p1 / p0) of a binary task's stored predictions, computed here."""
    if "log_probs" in arrays:
        log_probs = arrays["log_probs"].astype(np.float64)
        return log_probs[:, 1] - log_probs[:, 0]
    return np.log(arrays["scores"][:, 1].astype(np.float64)) - np.log(arrays["scores"][:, 0].astype(np.float64))


def split_labels(data: Path, label: str) -> np.ndarray:
    """The label column of the test split, read straight from its shards."""
    return np.concatenate([arrays[label] for shard in sorted((data / "test").glob("*.tar"))
                           for _, arrays in iter_shard_chunks(shard, columns=[label])])


# ----------------------------------------------------------------------------------------------------------------------
# ParT (JetClass): jet-class confusion and the jet-class trees


@pytest.fixture(scope="module")
def part_run(ray_session, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("part")
    data = generate("jetclass-lite", 300, root / "jets", seed=3)  # ~280 jets, every class in every split's test
    assert set(class_counts(data, "test", "label_jet_class")) == set(range(5))
    train_evaluate_report("part-quickstart.yaml", data, root / "run", [
        "data.batch_size=16", "data.steps_per_epoch=10", "training.epochs=2", "training.eval_interval=20",
        "training.log_interval=5"], steps=20)
    return root, data


def test_part_report_has_the_jet_class_sections_and_trees(part_run):
    root, _ = part_run
    page = (root / "run" / "report.html").read_text()
    check_sections(page, ["training", "jet_class", "baseline"])
    assert "jet_class: confusion matrix" in page and summary_columns(page) == ["transformer", "baseline"]
    assert "<code>HistGradientBoostingClassifier</code> of the jet class" in page
    # JetClass jets keep up to 128 candidates and jetclass-lite stores no substructure: the page says so
    assert "from the stored candidates (no substructure):" in page and "at most the stored 20" not in page
    assert "tau ID on all jets" not in page and "expected significance" not in page  # no tau or event baseline
    _, meta = load_predictions(root / "run" / "baseline" / "predictions-test.npz")
    assert meta["key"]["kind"] == "jet-class"
    assert meta["quantities"] == list(JET_QUANTITIES)  # jetclass-lite stores no substructure (docs/generators.md)


def test_part_accuracies_match_the_stored_predictions(part_run):
    root, data = part_run
    run_dir = root / "run"
    page = (run_dir / "report.html").read_text()
    labels = split_labels(data, "label_jet_class")
    baseline, _ = load_predictions(run_dir / "baseline" / "predictions-test.npz")
    arrays = baseline["arrays"]["jet_class"]
    assert sorted(arrays["label"].tolist()) == sorted(labels.tolist())  # every test jet, nothing else
    correct = arrays["scores"].argmax(axis=1) == arrays["label"]
    assert summary_cell(page, "jet_class: accuracy", 1).startswith(f"{100 * correct.mean():.2f} [")
    transformer, _ = load_predictions(run_dir / "predictions-test.npz")
    arrays = transformer["arrays"]["jet_class"]
    correct = arrays["scores"].argmax(axis=1) == arrays["label"]
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert metrics["test_jet_class_accuracy"] == pytest.approx(correct.mean())
    assert summary_cell(page, "jet_class: accuracy", 0).startswith(f"{100 * correct.mean():.2f} [")


def test_part_report_of_test_data_without_a_baseline_column_exits_2_before_any_work(part_run, tmp_path):
    root, data = part_run
    test_data = tmp_path / "jets"  # the same test jets, but converted without the jet mass
    shutil.copytree(data, test_data)
    manifest = json.loads((test_data / "manifest.json").read_text())
    del manifest["columns"]["jet_mass"]
    (test_data / "manifest.json").write_text(json.dumps(manifest))
    run_dir = tmp_path / "run"
    shutil.copytree(root / "run", run_dir)
    shutil.rmtree(run_dir / "baseline")  # what the report made: gone, to see that the refused report makes nothing
    (run_dir / "predictions-test.npz").unlink()
    (run_dir / "report.html").unlink()
    spec = yaml.safe_load((run_dir / "spec.yaml").read_text())
    spec["data"]["test"] = str(test_data / "test")
    (run_dir / "spec.yaml").write_text(yaml.safe_dump(spec))

    result = runner.invoke(app, ["report", str(run_dir), "--no-track"])
    assert result.exit_code == 2, result.output
    assert "family part" in result.output and "jet-class baseline" in result.output
    assert "['jet_mass']" in result.output and "--no-baseline" in result.output
    for made in ("predictions-test.npz", "report.html", "baseline"):
        assert not (run_dir / made).exists(), made  # refused before any work

    result = runner.invoke(app, ["report", str(run_dir), "--no-track", "--no-baseline"])
    assert result.exit_code == 0, result.output
    page = (run_dir / "report.html").read_text()
    check_sections(page, ["training", "jet_class"])
    assert summary_columns(page) == ["transformer"] and not (run_dir / "baseline").exists()


# ----------------------------------------------------------------------------------------------------------------------
# MultiParTau: tau ID ROC, decay mode, charge, kinematics and the tau trees


@pytest.fixture(scope="module")
def multipartau_run(ray_session, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("multipartau")
    data = generate("fcc-tau", 200, root / "taus", seed=2)  # ~420 jets
    assert set(class_counts(data, "test", "label_is_tau")) == {0, 1}
    assert set(class_counts(data, "test", "label_charge")) == {0, 1}
    assert len(class_counts(data, "test", "label_decay_mode")) >= 4  # "other" (0.3 % of taus) may be absent
    train_evaluate_report("multipartau-quickstart.yaml", data, root / "run", [
        "data.batch_size=32", "data.steps_per_epoch=8", "training.epochs=2", "training.eval_interval=16",
        "training.log_interval=4"], steps=16)
    return root, data


def test_multipartau_report_has_the_tau_sections_and_trees(multipartau_run):
    root, _ = multipartau_run
    page = (root / "run" / "report.html").read_text()
    check_sections(page, ["training", "tau_id", "charge", "decay_mode", "kinematics", "baseline"])
    for title in ("tau_id: tau vs jet ROC", "charge: accuracy", "decay_mode: confusion matrix",
                  "kinematics: pT response and resolution"):
        assert f">{title}</h2>" in page, title
    assert summary_columns(page) == ["transformer", "baseline", "reco jet"]
    assert "tau ID on all jets" in page and "of the jet class" not in page and "expected significance" not in page
    assert "at most the stored 20" in page  # fcc-tau stores the 20 leading candidates
    _, meta = load_predictions(root / "run" / "baseline" / "predictions-test.npz")
    assert meta["key"]["kind"] == "tau" and meta["key"]["tasks"] == ["tau_id", "charge", "decay_mode", "kinematics"]


def test_multipartau_tau_id_auc_matches_sklearn_on_the_stored_predictions(multipartau_run):
    root, data = multipartau_run
    run_dir = root / "run"
    page = (run_dir / "report.html").read_text()
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    transformer, _ = load_predictions(run_dir / "predictions-test.npz")
    arrays = transformer["arrays"]["tau_id"]
    assert sorted(arrays["label"].tolist()) == sorted(split_labels(data, "label_is_tau").tolist())
    auc = roc_auc_score(arrays["label"], discriminant(arrays))
    assert metrics["test_tau_id_auc"] == pytest.approx(auc, abs=1e-9)
    assert summary_cell(page, "tau_id: AUC", 0) == f"{auc:.5f}"
    baseline, _ = load_predictions(run_dir / "baseline" / "predictions-test.npz")
    arrays = baseline["arrays"]["tau_id"]
    assert summary_cell(page, "tau_id: AUC", 1) == f"{roc_auc_score(arrays['label'], discriminant(arrays)):.5f}"


# ----------------------------------------------------------------------------------------------------------------------
# AOT: expected significance and the event trees


@pytest.fixture(scope="module")
def aot_run(ray_session, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("aot")
    data = generate("events-met", 600, root / "events", seed=5)  # ~190 selected events
    assert set(class_counts(data, "test", "label_process")) == {0, 1, 2, 3}  # ZH and the three backgrounds
    train_evaluate_report("aot-quickstart.yaml", data, root / "run", [
        "data.batch_size=16", "data.steps_per_epoch=8", "training.epochs=2", "training.eval_interval=16",
        "training.log_interval=4"], steps=16)
    return root, data


def test_aot_report_has_the_significance_section_and_event_trees(aot_run):
    root, _ = aot_run
    page = (root / "run" / "report.html").read_text()
    check_sections(page, ["training", "signal", "signal_significance"])  # the trees are described in the section
    assert summary_columns(page) == ["transformer", "baseline"]
    assert "HistGradientBoostingClassifier on 28 quantities per event" in page  # 4 event features + 4 x 6
    assert "jet_pt" not in page and "tau ID on all jets" not in page and "of the jet class" not in page
    _, meta = load_predictions(root / "run" / "baseline" / "predictions-test.npz")
    assert meta["key"]["kind"] == "events"


def test_aot_significance_and_weighted_auc_by_hand(aot_run):
    root, data = aot_run
    run_dir = root / "run"
    page = (run_dir / "report.html").read_text()
    evaluation = json.loads((run_dir / "metrics.json").read_text())
    events = read_manifest(data).splits["test"].examples
    assert evaluation["examples"] == {"signal": events}  # events, not their summed loss weights
    assert f"test split, {events:,} " in page
    metrics = evaluation["metrics"]
    s, b = metrics["test_signal_expected_signal"], metrics["test_signal_expected_background"]
    z = math.sqrt(2 * ((s + b) * math.log(1 + s / b) - s))
    assert metrics["test_signal_significance"] == pytest.approx(z, rel=1e-6)
    assert summary_cell(page, "signal: expected significance at 140 fb^-1", 0).startswith(f"{z:.3f} ")
    transformer, _ = load_predictions(run_dir / "predictions-test.npz")
    arrays = transformer["arrays"]["signal"]
    assert not np.all(arrays["weight"] == 1)  # backgrounds weighted by cross section
    auc = roc_auc_score(arrays["label"], discriminant(arrays), sample_weight=arrays["weight"])
    assert metrics["test_signal_auc"] == pytest.approx(auc, abs=1e-9)
    assert summary_cell(page, "signal: AUC", 0) == f"{auc:.5f}"


# ----------------------------------------------------------------------------------------------------------------------
# MLPF: jet and MET response against the rule-based particle flow, no trees


@pytest.fixture(scope="module")
def mlpf_run(ray_session, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("mlpf")
    data = generate("clic-events", 100, root / "clic", seed=1)  # ttbar and qq events
    train_evaluate_report("mlpf-quickstart.yaml", data, root / "run", [
        "data.batch_size=8", "data.steps_per_epoch=8", "training.epochs=2", "training.eval_interval=16",
        "training.log_interval=4"], steps=16)
    return root, data


def test_mlpf_report_has_the_response_sections_and_no_trees(mlpf_run):
    root, _ = mlpf_run
    page = (root / "run" / "report.html").read_text()
    check_sections(page, ["training", "existence", "particle_class", "mlpf-response", "mlpf-particles"])
    assert "MLPF: jet and MET response vs the rule-based particle flow" in page
    assert summary_columns(page) == ["transformer"]  # the rule-based PF is in the MLPF sections, not a model column
    assert "HistGradientBoosting" not in page and "gradient-boosted" not in page and "expected significance" not in page
    assert not (root / "run" / "baseline").exists()


def test_mlpf_numbers_match_the_stored_predictions_and_the_data(mlpf_run):
    root, data = mlpf_run
    run_dir = root / "run"
    evaluation = json.loads((run_dir / "metrics.json").read_text())
    transformer, _ = load_predictions(run_dir / "predictions-test.npz")
    arrays = transformer["arrays"]["existence"]
    auc = roc_auc_score(arrays["label"], discriminant(arrays))
    assert evaluation["metrics"]["test_existence_auc"] == pytest.approx(auc, abs=1e-9)
    assert summary_cell((run_dir / "report.html").read_text(), "existence: AUC", 0) == f"{auc:.5f}"
    # the per-process split counts the test events of each process, as the generator stored them
    process = split_labels(data, "gen_process")
    names = read_manifest(data).meta["generator"]["classes"]["gen_process"]
    per_process = evaluation["mlpf"]["per_process"]
    assert evaluation["mlpf"]["events"] == len(process)
    assert {name: p["events"] for name, p in per_process.items()} == {
        names[i]: int((process == i).sum()) for i in np.unique(process)}
    assert set(per_process) == {"ttbar", "qq"}


def test_hepml_train_records_where_its_start_up_went(part_run):
    """The `startup` record of metrics.jsonl: each phase from the process start to the first optimizer step."""
    from hepml_dist.track.records import read_metrics
    from hepml_dist.train.startup import PHASES

    root, _ = part_run
    found = [r for r in read_metrics(root / "run") if "startup/total_s" in r]
    assert len(found) == 1 and found[0]["step"] == 1
    phases = {k.split("/")[1][:-2]: v for k, v in found[0].items() if k.startswith("startup/") and k != "startup/total_s"}
    assert list(phases) == list(PHASES)
    assert all(v >= 0 for v in phases.values())
    assert abs(sum(phases.values()) - found[0]["startup/total_s"]) < 0.01
