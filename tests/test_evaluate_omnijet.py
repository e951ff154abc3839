"""OmniJet-alpha evaluation as its users judge it: the tokenizer's codebook usage, perplexity and resolution, and
the backbone's generated jets against real ones (1-Wasserstein distances with a truth-vs-truth floor), each number
recomputed independently from a tiny tokenizer and backbone trained here; the report sections draw from the stored
results; runs of the wrong stage are refused with a UserError."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from hepml_dist.cli import app
from hepml_dist.data.manifest import read_manifest
from hepml_dist.data.reader import iter_shard_chunks
from hepml_dist.data.writer import DatasetWriter
from hepml_dist.errors import UserError
from hepml_dist.evaluate.omnijet_generation import (
    check_generation_inputs,
    compare,
    generation_evaluation,
    generation_sections,
    halves,
)
from hepml_dist.evaluate.omnijet_tokenizer import check_tokenizer_inputs, tokenizer_evaluation, tokenizer_sections
from hepml_dist.evaluate.report_facts import Run
from hepml_dist.omnijet.generate import load_chain, sample_constituents
from hepml_dist.omnijet.observables import observables, select
from hepml_dist.omnijet.preprocess import constituent_features, physical_constituents
from hepml_dist.omnijet.tokenize import tokenize_dataset
from hepml_dist.runs import load_trained, resolve_checkpoint, write_run_spec
from hepml_dist.spec import load_job
from hepml_dist.train.loop import train_loop_per_worker
from test_models_omnijet import make_jets, shrink

ROOT = Path(__file__).resolve().parents[1]
CODEBOOK, LENGTH = 48, 24


# tiny runs of the shipped jobs through the training engine (in this process, no Ray): 2 x 40 steps, validated
ENGINE = ["parallel.num_workers=1", "parallel.accelerator=cpu", "parallel.gpus_per_worker=0", "tracking.mode=disabled",
          "data.steps_per_epoch=40", "data.val_steps=2", "training.eval_interval=40",
          "training.log_interval=20", "data.loader_workers=0", "data.batch_size=64", f"data.inputs.max_length={LENGTH}",
          "optim.lr=3e-3"]


def _train(job: str, data: Path, run_dir: Path, extra: list[str] = ()) -> Path:
    """`hepml train`'s worker loop on a shrunken job; returns the run directory (spec.yaml written as by the CLI)."""
    paths = [f"data.{s}={data / s}" for s in ("train", "val", "test")]
    spec = shrink(load_job(ROOT / "jobs" / job, [*paths, *ENGINE, *extra]), codebook=CODEBOOK, length=LENGTH)
    train_loop_per_worker({"spec": spec.model_dump(mode="json"), "run_dir": str(run_dir)})
    write_run_spec(run_dir, spec)
    return run_dir


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """Jets -> a tokenizer run -> token shards -> a backbone run, both trained 80 steps by the engine."""
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("omnijet")
    with DatasetWriter(tmp / "jets", schema="jets-test", splits=(0.5, 0.1, 0.4), chunk_size=64, chunks_per_shard=2) as writer:
        writer.add(make_jets(1000, max_constituents=LENGTH, seed=3))  # all fit: loader = preprocess.py
    tok_run = _train("omnijet-tokenizer.yaml", tmp / "jets", tmp / "tok", ["training.epochs=2", "schedule.warmup_steps=2"])
    tokenize_dataset(tok_run, tmp / "jets", tmp / "tokens", LENGTH, batch_size=256)
    gpt_run = _train("omnijet-pretrain.yaml", tmp / "tokens", tmp / "gpt", ["training.steps=80"])
    return {"tmp": tmp, "tok": resolve_checkpoint(tok_run), "gpt": resolve_checkpoint(gpt_run), "jets": tmp / "jets",
            "tok_run": tok_run, "gpt_run": gpt_run}


def test_the_engine_validates_tokenizer_and_backbone_runs_with_their_summed_metrics(chain):
    """The per-task Collector cannot score these stages (no per-example truth for the tokenizer, 50 classes per
    token for the backbone): validation adds up the family's summed metrics instead."""
    records = {name: [json.loads(line) for line in (chain[name] / "metrics.jsonl").read_text().splitlines()]
               for name in ("tok_run", "gpt_run")}
    validated = {name: [r for r in rows if "val_loss" in r] for name, rows in records.items()}
    assert [r["step"] for r in validated["tok_run"]] == [40, 80] == [r["step"] for r in validated["gpt_run"]]
    last_tok, last_gpt = validated["tok_run"][-1], validated["gpt_run"][-1]
    assert 0 < last_tok["val_codebook_usage"] <= 1 and 1 < last_tok["val_codebook_perplexity"] <= CODEBOOK
    assert last_tok["val_reconstruction_mse_part_pt"] > 0 and last_tok["val_loss"] > 0
    assert 0 < last_gpt["val_next_token_accuracy"] < 1
    assert last_gpt["val_next_token_loss"] < validated["gpt_run"][0]["val_next_token_loss"]


def test_hepml_evaluate_and_report_of_tokenizer_and_backbone_runs(chain):
    """`hepml evaluate` stores each stage's evaluation in metrics.json (evaluate/families/omnijet.py) and `hepml
    report` shows it in the stage's own section, next to the training curves and nothing else."""
    runner = CliRunner()
    for name, key, anchor in (("tok_run", "omnijet_tokenizer", "omnijet-tokenizer"),
                              ("gpt_run", "omnijet_generation", "omnijet-generation")):
        evaluated = runner.invoke(app, ["evaluate", str(chain[name])])
        assert evaluated.exit_code == 0, evaluated.output
        stored = json.loads((chain[name] / "metrics.json").read_text())
        assert stored["checkpoint"].endswith("step-00000080") and stored[key]["metrics"].items() <= stored["metrics"].items()
        # the stage's loss on the split, summed over its examples (the per-task Collector keeps none for it)
        task = "reconstruction" if key == "omnijet_tokenizer" else "next_token"
        test_jets = read_manifest(chain["jets"]).splits["test"].examples
        assert stored["metrics"]["test_loss"] > 0 and 0 < stored["examples"][task] <= test_jets
        reported = runner.invoke(app, ["report", str(chain[name]), "--no-track"])
        assert reported.exit_code == 0, reported.output
        page = (chain[name] / "report.html").read_text()
        assert re.findall(r'<h2 id="([^"]+)">', page) == ["summary", "facts", "training", anchor]
        if key == "omnijet_tokenizer":
            book = stored[key]["codebook"]
            assert f"{book['used']:,} of {CODEBOOK:,} codes used" in page and f"{book['perplexity']:,.1f}" in page
        else:
            real = read_manifest(chain["jets"]).splits["test"].examples  # fewer than twice the family's 2000 jets
            assert stored[key]["generated_jets"] == real // 2 and stored[key]["real_jets"] == 2 * (real // 2)
            assert f"{stored['metrics']['test_w1_floor_jet_mass']:.4g}" in page


def _split_columns(dataset: Path, split: str) -> dict[str, np.ndarray]:
    """Every jet of a split, read straight from its shards."""
    manifest = read_manifest(dataset)
    shapes = {name: info.shape for name, info in manifest.columns.items()}
    chunks = [c for shard in manifest.splits[split].shards
              for _, c in iter_shard_chunks(dataset / shard.path, shapes=shapes)]
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


class _Figures:
    """`hepml report`'s figure sink, minus the tracker: counts what was drawn."""

    def __init__(self):
        self.names = []

    def png(self, figure, name):
        import matplotlib.pyplot as plt

        plt.close(figure)
        self.names.append(name)
        return "cG5n"


def _run(path: Path, key: str, stored: dict) -> Run:
    return Run(path, None, {key: json.loads(json.dumps(stored))}, [], {}, {}, path, stored["split"])


def test_tokenizer_evaluation_matches_an_independent_computation(chain, tmp_path):
    result = tokenizer_evaluation(chain["tok"], "test", None, tmp_path / "plots")
    metrics = result["metrics"]

    # independent: every test jet from the shards, preprocessed by preprocess.py, through the tokenizer
    _, model = load_trained(chain["tok"])
    features, mask = constituent_features(_split_columns(chain["jets"], "test"), LENGTH)
    with torch.no_grad():
        codes = model.tokenize(torch.from_numpy(features), torch.from_numpy(mask))
        decoded = model.detokenize(codes, torch.from_numpy(mask)).numpy()
    used = codes.numpy()[mask]
    _, counts = np.unique(used, return_counts=True)
    p = counts / counts.sum()
    assert result["codebook"]["constituents"] == mask.sum()
    assert metrics["test_codebook_usage"] == pytest.approx(len(counts) / CODEBOOK)
    assert metrics["test_codebook_perplexity"] == pytest.approx(np.exp(-(p * np.log(p)).sum()), rel=1e-6)
    assert 1 < metrics["test_codebook_perplexity"] <= len(counts)

    given, rebuilt = physical_constituents(features, mask), physical_constituents(decoded, mask)
    expected = {
        "part_pt": rebuilt["part_pt"][mask] / given["part_pt"][mask] - 1,
        "part_etarel": rebuilt["part_etarel"][mask] - given["part_etarel"][mask],
        "part_phirel": rebuilt["part_phirel"][mask] - given["part_phirel"][mask],
    }
    for name, residual in expected.items():
        q25, median, q75 = np.percentile(residual, [25, 50, 75])
        assert metrics[f"test_resolution_{name}"] == pytest.approx(q75 - q25, rel=1e-3, abs=1e-5), name
        assert metrics[f"test_bias_{name}"] == pytest.approx(median, rel=1e-3, abs=1e-5), name
    # each reconstructed pT belongs to its own constituent: pairing it with another constituent's pT is far worse
    shuffled = np.random.default_rng(0).permutation(given["part_pt"][mask])
    unpaired = np.subtract(*np.percentile(rebuilt["part_pt"][mask] / shuffled - 1, [75, 25]))
    assert metrics["test_resolution_part_pt"] < 0.5 * unpaired
    hist = result["features"]["part_pt"]["distribution"]
    assert sum(hist["counts"]["input"]) == sum(hist["counts"]["reconstructed"]) == mask.sum()
    assert {p.name for p in (tmp_path / "plots").iterdir()} == {
        "omnijet_tokenizer_distributions.png", "omnijet_tokenizer_residuals.png", "omnijet_tokenizer_codebook.png"}
    print(f"tokenizer: usage {metrics['test_codebook_usage']:.3f}, perplexity {metrics['test_codebook_perplexity']:.1f} "
          f"of {CODEBOOK}, resolution pT {metrics['test_resolution_part_pt']:.3f}, "
          f"eta {metrics['test_resolution_part_etarel']:.4f}, phi {metrics['test_resolution_part_phirel']:.4f}")

    figures = _Figures()
    sections = tokenizer_sections(_run(tmp_path, "omnijet_tokenizer", result), figures)
    assert [s.anchor for s in sections] == ["omnijet-tokenizer"] and len(sections[0].images) == 3
    assert f"{result['codebook']['used']:,} of {CODEBOOK:,} codes used" in sections[0].table
    assert f"{metrics['test_resolution_part_etarel']:.4g}" in sections[0].table


def _w1(u: np.ndarray, v: np.ndarray) -> float:
    """1-Wasserstein distance from the empirical CDFs (integral of |F_u - F_v|), numpy only."""
    points = np.sort(np.concatenate([u, v]))
    cdf_u = np.searchsorted(np.sort(u), points[:-1], side="right") / len(u)
    cdf_v = np.searchsorted(np.sort(v), points[:-1], side="right") / len(v)
    return float(np.sum(np.abs(cdf_u - cdf_v) * np.diff(points)))


def test_generation_evaluation_matches_an_independent_computation(chain, tmp_path):
    result = generation_evaluation(chain["gpt"], "test", 150, 5, tmp_path / "plots")
    metrics, size = result["metrics"], result["generated_jets"]
    assert size == 150 and result["real_jets"] == 300

    # independent: the same sampled jets (same seed), the real test jets from the shards, the documented halves
    _, generator, _, tok = load_chain(chain["gpt"])
    generated = observables(sample_constituents(generator, tok, size, seed=5))
    features, mask = constituent_features(_split_columns(chain["jets"], "test"), LENGTH - 2)
    real = {**physical_constituents(features, mask), "mask": mask}
    index_a, index_b = halves(len(mask), size, 5)
    half_a, half_b = observables(select(real, index_a)), observables(select(real, index_b))
    for name in ("multiplicity", "jet_pt", "jet_mass"):  # equal sizes: W1 = mean |sorted u - sorted v|
        expected = np.mean(np.abs(np.sort(generated[name]) - np.sort(half_b[name])))
        assert metrics[f"test_w1_{name}"] == pytest.approx(expected, rel=1e-5), name
        floor = np.mean(np.abs(np.sort(half_a[name]) - np.sort(half_b[name])))
        assert metrics[f"test_w1_floor_{name}"] == pytest.approx(floor, rel=1e-5), name
    for name in ("part_pt", "part_etarel", "part_phirel"):  # one value per constituent: unequal sizes
        assert metrics[f"test_w1_{name}"] == pytest.approx(_w1(generated[name], half_b[name]), rel=1e-5), name
        assert metrics[f"test_w1_floor_{name}"] == pytest.approx(_w1(half_a[name], half_b[name]), rel=1e-5), name
    assert (tmp_path / "plots" / "omnijet_generation_distributions.png").is_file()
    print("generation W1 (generated / tokenizer round trip / floor): " + ", ".join(
        f"{n} {metrics[f'test_w1_{n}']:.3g} / {metrics[f'test_w1_tokenized_{n}']:.3g} / {metrics[f'test_w1_floor_{n}']:.3g}"
        for n in result["observables"]))

    figures = _Figures()
    sections = generation_sections(_run(tmp_path, "omnijet_generation", result), figures)
    assert [s.anchor for s in sections] == ["omnijet-generation"] and figures.names == ["omnijet_generation_distributions"]
    assert f"{metrics['test_w1_floor_jet_mass']:.4g}" in sections[0].table
    assert f"{metrics['test_w1_jet_mass']:.4g}" in sections[0].table


def test_a_perfect_generator_scores_at_the_floor_and_a_distorted_one_far_above():
    """Real jets as the "generated" sample sit at the floor's scale; the same jets with every constituent's pT
    doubled and its angles spread by 1.5 do not."""
    columns = make_jets(900, max_constituents=30, seed=11)
    features, mask = constituent_features(columns, 30)
    jets = {**physical_constituents(features, mask), "mask": mask}
    index_a, index_b = halves(600, 300, seed=2)
    perfect = select(jets, np.arange(600, 900))
    distorted = dict(perfect, part_pt=perfect["part_pt"] * 2, part_etarel=perfect["part_etarel"] * 1.5,
                     part_phirel=perfect["part_phirel"] * 1.5)
    good = compare(perfect, select(jets, index_a), select(jets, index_b))
    bad = compare(distorted, select(jets, index_a), select(jets, index_b))
    for name, entry in good.items():
        assert entry["w1_floor"] > 0, name
        assert entry["w1"] < 3 * entry["w1_floor"], (name, entry["w1"], entry["w1_floor"])
    for name in ("jet_pt", "jet_mass", "part_pt", "part_etarel", "part_phirel"):
        assert bad[name]["w1"] > 5 * bad[name]["w1_floor"], name
    assert bad["multiplicity"]["w1"] == good["multiplicity"]["w1"]  # the distortion keeps the constituents


def test_runs_of_the_wrong_stage_are_refused(chain, tmp_path):
    with pytest.raises(UserError, match="not an OmniJet tokenizer run .*stage=backbone"):
        tokenizer_evaluation(chain["gpt"], "test", None, tmp_path)
    with pytest.raises(UserError, match="not an OmniJet backbone run .*stage=tokenizer"):
        generation_evaluation(chain["tok"], "test", 20, 0, tmp_path)
    with pytest.raises(UserError, match="no tokenizer evaluation .*omnijet_tokenizer"):
        tokenizer_sections(Run(tmp_path, None, {}, [], {}, {}, tmp_path, "test"), _Figures())
    with pytest.raises(UserError, match="no generation evaluation .*omnijet_generation"):
        generation_sections(Run(tmp_path, None, {"omnijet_tokenizer": {}}, [], {}, {}, tmp_path, "test"), _Figures())
    assert not any(tmp_path.iterdir())  # refused before any work


def test_data_that_lack_what_the_evaluation_needs_are_named_before_any_work(chain, tmp_path):
    spec, _ = load_trained(chain["tok"])
    broken = tmp_path / "jets"
    shutil.copytree(chain["jets"], broken)
    manifest = json.loads((broken / "manifest.json").read_text())
    for column in ("part_px", "part_n"):
        del manifest["columns"][column]
    (broken / "manifest.json").write_text(json.dumps(manifest))
    spec = spec.model_copy(update={"data": spec.data.model_copy(update={"test": str(broken / "test")})})
    with pytest.raises(UserError, match=r"family omnijet \(tokenizer evaluation\).*\['part_px', 'part_n'\]"):
        check_tokenizer_inputs(spec, "test")

    gpt_spec, _ = load_trained(chain["gpt"])
    check_generation_inputs(gpt_spec, "test")  # the token data name their source jets, which are there
    tokens = tmp_path / "tokens"
    shutil.copytree(Path(gpt_spec.data.test).parent, tokens)
    manifest = json.loads((tokens / "manifest.json").read_text())
    manifest["source_files"] = [str(tmp_path / "gone")]
    (tokens / "manifest.json").write_text(json.dumps(manifest))
    moved = gpt_spec.model_copy(update={"data": gpt_spec.data.model_copy(update={"test": str(tokens / "test")})})
    with pytest.raises(UserError, match="family omnijet .*were made from .*gone, which no longer exists"):
        check_generation_inputs(moved, "test")


def test_omnijet_tau_tagger_report_has_the_tau_sections_and_trees_fitted_on_the_jets_behind_the_tokens(chain):
    """A fine-tuned OmniJet-alpha tau head is judged as MultiParTau is: tau ID ROC and the tau baseline. Its data are
    tokens, which keep no constituents: the trees read the jets the tokens were made from, the same test jets."""
    from hepml_dist.evaluate.report_facts import load_predictions

    tmp = chain["tmp"]
    made = CliRunner().invoke(app, ["data", "generate", "fcc-tau", "--events", "150", "--seed", "4", "--workers", "1",
                                    "--out", str(tmp / "fcc")])
    assert made.exit_code == 0, made.output
    tokenize_dataset(chain["tok_run"], tmp / "fcc", tmp / "fcc-tokens", LENGTH, batch_size=256)
    run = _train("omnijet-tau-quickstart.yaml", tmp / "fcc-tokens", tmp / "tau",
                 ["data.batch_size=32", "data.steps_per_epoch=8", "training.epochs=1", "training.eval_interval=8"])
    runner = CliRunner()
    for command in (["evaluate", str(run)], ["report", str(run), "--no-track"]):
        done = runner.invoke(app, command)
        assert done.exit_code == 0, done.output
    page = (run / "report.html").read_text()
    assert re.findall(r'<h2 id="([^"]+)">', page) == ["summary", "facts", "training", "tau_id", "baseline"]
    ours, _ = load_predictions(run / "predictions-test.npz")
    trees, meta = load_predictions(run / "baseline" / "predictions-test.npz")
    assert meta["key"]["kind"] == "tau"
    np.testing.assert_array_equal(ours["arrays"]["tau_id"]["label"], trees["arrays"]["tau_id"]["label"])
    assert len(trees["arrays"]["tau_id"]["label"]) == read_manifest(tmp / "fcc-tokens").splits["test"].examples
    # a tau-only token set (`--where`): the trees read the same selection of the source jets
    from hepml_dist.evaluate.families.jets import _read_tau_jets

    tokenize_dataset(chain["tok_run"], tmp / "fcc", tmp / "tau-tokens", LENGTH, batch_size=256, where="label_is_tau == 1")
    jets = _read_tau_jets(str(tmp / "tau-tokens" / "test"), "test")
    assert len(jets["label_is_tau"]) == read_manifest(tmp / "tau-tokens").splits["test"].examples > 0
    assert (jets["label_is_tau"] == 1).all()
