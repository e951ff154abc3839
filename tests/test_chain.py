"""Job chains (`hepml chain`): bad chain files are refused naming stage and field before anything runs, the plan
orders stages by their needs and references, `hepml data tokenize --where` makes a selected token set, and a tiny
chain (tokenizer -> tokenize -> pretrain -> frozen fine-tune) runs through `hepml chain run`, is skipped on rerun,
and its frozen model holds exactly the pretrained backbone."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from hepml_dist.chain.plan import ChainPlan, PlannedStage, plan_chain
from hepml_dist.chain.run import ChainRunner
from hepml_dist.chain.spec import ChainSpec, override_strings
from hepml_dist.cli import app
from hepml_dist.data.manifest import read_manifest
from hepml_dist.data.reader import iter_shard_chunks
from hepml_dist.data.writer import DatasetWriter
from hepml_dist.locations import shipped_jobs_dir
from hepml_dist.models import build_model
from hepml_dist.runs import latest_checkpoint, load_model_state, write_model_checkpoint
from hepml_dist.spec import load_job
from hepml_dist.train.loop import initial_model
from hepml_dist.train.session import process_group_context

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

# Every job stage of the tiny chain: a few steps of the smallest models, one CPU worker, no tracking.
TINY = {
    "model.tokenizer": {"codebook_size": 30, "hidden_dim": 16, "num_heads": 2, "num_blocks": 1, "dropout": 0.0,
                        "kmeans_iters": 2},
    "model.backbone": {"embedding_dim": 16, "num_heads": 2, "num_blocks": 1, "max_sequence_length": 16},
    "model.head": {"hidden_dim": 16, "num_blocks": 1, "num_heads": 2},
    "data.inputs.max_length": 16, "data.batch_size": 32, "data.steps_per_epoch": 3, "data.val_steps": 2,
    "data.loader_workers": 0, "training.epochs": 1, "training.eval_interval": 3, "training.log_interval": 1,
    "schedule.warmup_steps": 0,
    "parallel": {"num_workers": 1, "accelerator": "cpu", "gpus_per_worker": 0, "cpus_per_worker": 1},
    "tracking": {"mode": "disabled", "tensorboard": False},
}


def write_jets(out: Path, n: int = 600, width: int = 16, seed: int = 0) -> Path:
    """Jets with real constituents, a tau label, a decay mode and a target, in the shard format."""
    rng = np.random.default_rng(seed)
    count = rng.integers(3, width + 1, n)
    real = np.arange(width)[None, :] < count[:, None]
    jet_pt, jet_eta, jet_phi = rng.uniform(30, 60, n), rng.uniform(-1, 1, n), rng.uniform(-3, 3, n)
    z = np.where(real, rng.exponential(size=(n, width)), 0.0)
    pt = -np.sort(-z / z.sum(1, keepdims=True), axis=1) * jet_pt[:, None]
    eta, phi = jet_eta[:, None] + rng.normal(0, 0.1, (n, width)), jet_phi[:, None] + rng.normal(0, 0.1, (n, width))
    four = {"part_px": pt * np.cos(phi), "part_py": pt * np.sin(phi), "part_pz": pt * np.sinh(eta),
            "part_energy": pt * np.cosh(eta)}
    tau = rng.integers(0, 2, n)
    columns = {**{k: np.where(real, v, 0).astype(np.float32) for k, v in four.items()},
               "part_n": count.astype(np.int32), "jet_pt": jet_pt.astype(np.float32), "label_is_tau": tau,
               "label_decay_mode": np.where(tau == 1, rng.integers(0, 6, n), -1),
               "target_log_pt_ratio": np.where(tau == 1, rng.normal(0, 0.1, n), 0).astype(np.float32)}
    with DatasetWriter(out, schema="jets-test", splits=(0.6, 0.2, 0.2), seed=seed, chunk_size=64,
                       chunks_per_shard=2) as writer:
        writer.add(columns)
    return out


def tiny_chain(tmp_path: Path, jets: Path, **stages) -> Path:
    """tokenizer -> tokens -> pretrain -> tagging-frozen on `jets` (stages given replace or add to these)."""
    tokens = {f"data.{s}": f"${{stages.tokens.out}}/{s}" for s in ("train", "val", "test")}
    chain = {"name": "tiny", "set": TINY, "stages": {
        "tokenizer": {"job": "omnijet-tokenizer", "set": {"data.train": str(jets / "train"), "data.val": str(jets / "val")}},
        "tokens": {"step": "tokenize", "tokenizer": "${stages.tokenizer.run_dir}", "data": str(jets)},
        "pretrain": {"job": "omnijet-pretrain", "set": {**tokens, "training.steps": None,
                                                        "tasks.0.num_classes": 32}},
        "tagging-frozen": {"job": "omnijet-tau-tagging-frozen",
                           "set": {**tokens, "training.init_from": "${stages.pretrain.run_dir}"}},
        **stages}}
    path = tmp_path / "chain.yaml"
    path.write_text(yaml.safe_dump(chain, sort_keys=False))
    return path


def refused(tmp_path: Path, chain: Path) -> str:
    """Both validate and run exit 2 and leave nothing behind; returns the message."""
    work = tmp_path / "work"
    for verb in ("validate", "run"):
        result = runner.invoke(app, ["chain", verb, str(chain), "--workdir", str(work)])
        assert result.exit_code == 2, result.output
    assert not work.exists()  # nothing ran
    return result.output


@pytest.mark.parametrize("stages, where, words", [
    ({"pretrain": {"job": "omnijet-pretrain", "needs": ["tagging-frozen"]}},
     "stages.pretrain.needs", ["cycle", "pretrain -> tagging-frozen -> pretrain"]),
    ({"tokens": {"step": "tokenize", "tokenizer": "${stages.tokeniser.run_dir}", "data": "x"}},
     "stages.tokens.tokenizer", ["unknown stage 'tokeniser'"]),
    ({"tokens": {"step": "tokenize", "tokenizer": "${stages.tokenizer.out}", "data": "x"}},
     "stages.tokens.tokenizer", ["makes run_dir, not 'out'"]),
    ({"tokens": {"step": "tokenize", "tokenizer": "t", "data": "x", "wher": "label_is_tau == 1"}},
     "stages.tokens.wher", ["unknown field 'wher'"]),
    ({"extra": {"job": "omnijet-pretrain", "needs": ["nothing"]}}, "stages.extra.needs", ["unknown stage 'nothing'"]),
    ({"extra": {"step": "tokenise"}}, "stages.extra", ["unknown step 'tokenise'"]),
    ({"extra": {"job": "omnijet-pretrain", "set": ["optim.lrr=1"]}}, "stages.extra.set", ["optim.lrr"]),
])
def test_bad_chain_files_name_stage_and_field_and_nothing_runs(tmp_path, stages, where, words):
    output = refused(tmp_path, tiny_chain(tmp_path, tmp_path / "jets", **stages))
    line = next((line for line in output.splitlines() if where + ":" in line), None)
    assert line is not None, output
    assert all(w in output for w in words), output


def test_a_backbone_of_another_shape_than_the_pretraining_is_refused_before_anything_runs(tmp_path):
    chain = tiny_chain(tmp_path, tmp_path / "jets")
    data = yaml.safe_load(chain.read_text())
    data["stages"]["tagging-frozen"]["set"]["model.backbone.embedding_dim"] = 32
    chain.write_text(yaml.safe_dump(data))
    output = refused(tmp_path, chain)
    assert "stages.tagging-frozen.training.init_from" in output and "stage 'pretrain'" in output
    assert "backbone.embedding.weight (32, 16) in pretrain vs (32, 32) here" in output, output


def test_the_plan_orders_stages_by_needs_and_references_and_resolves_outputs(tmp_path):
    chain = tiny_chain(tmp_path, tmp_path / "jets", study={"step": "study", "stages": ["tagging-frozen"]},
                       evaluate={"step": "evaluate", "run": "${stages.tagging-frozen.run_dir}"})
    data = yaml.safe_load(chain.read_text())
    data["stages"] = dict(reversed(list(data["stages"].items())))  # the file's order does not matter
    chain.write_text(yaml.safe_dump(data, sort_keys=False))
    plan = plan_chain(chain, tmp_path / "work")
    names = [s.name for s in plan.stages]
    assert names.index("tokenizer") < names.index("tokens") < names.index("pretrain") < names.index("tagging-frozen")
    assert names.index("evaluate") < names.index("study")  # a study needs the evaluations of its stages
    frozen, tokens = plan.stage("tagging-frozen"), plan.stage("tokens")
    assert set(frozen.needs) == {"tokens", "pretrain"}  # references imply needs
    run_dir = str((tmp_path / "work/runs/tagging-frozen").resolve())
    assert frozen.outputs == {"run_dir": run_dir} and frozen.argv[:5] == ("hepml", "train", str(ROOT / "jobs/omnijet-tau-tagging-frozen.yaml"), "--run-dir", run_dir)
    assert f"training.init_from={tmp_path.resolve() / 'work/runs/pretrain'}" in frozen.argv
    assert "model.backbone.embedding_dim=16" in frozen.argv  # the chain's `set`, flattened into fields
    assert tokens.argv[:4] == ("hepml", "data", "tokenize", str(tmp_path.resolve() / "work/runs/tokenizer"))
    assert (frozen.cpus, frozen.gpus, tokens.cpus) == (1, 0, 1)
    assert plan.stage("study").argv[3] == f"tagging-frozen={run_dir}"
    assert plan.stage("evaluate").outputs == {"out": f"{run_dir}/metrics.json"}  # from the resolved reference
    assert plan.jobs["tagging-frozen"].training.init_from == str(tmp_path.resolve() / "work/runs/pretrain")
    overrides = override_strings({"a.b": "x: y", "c": [1, "2"], "d": {"e": None}, "f": "^backbone\\."})
    assert [o.partition("=")[0] for o in overrides] == ["a.b", "c", "d.e", "f"]  # mappings set field by field
    assert [yaml.safe_load(o.partition("=")[2]) for o in overrides] == ["x: y", [1, "2"], None, "^backbone\\."]


def test_tokenize_where_keeps_only_the_selected_jets(tmp_path):
    spec = load_job(ROOT / "jobs/omnijet-tokenizer.yaml", override_strings(TINY))
    torch.manual_seed(0)
    write_model_checkpoint(tmp_path / "tok/checkpoints/step-00000001", spec, build_model(spec).eval())
    jets = write_jets(tmp_path / "jets", n=300)
    command = ["data", "tokenize", str(tmp_path / "tok"), "--data", str(jets), "--out", str(tmp_path / "taus"),
               "--where", "label_is_tau == 1"]
    result = runner.invoke(app, command)
    assert result.exit_code == 0, result.output
    source, taus = read_manifest(jets), read_manifest(tmp_path / "taus")
    for split, info in taus.splits.items():
        assert info.examples == source.splits[split].class_counts["label_is_tau"]["1"] > 0
        labels = np.concatenate([c["label_is_tau"] for s in info.shards for _, c in iter_shard_chunks(taus.root / s.path)])
        assert (labels == 1).all() and len(labels) == info.examples
    assert taus.meta["where"] == "label_is_tau == 1"
    other = runner.invoke(app, [*command[:-1], "label_is_tau == 0"])  # another selection into the same folder
    assert other.exit_code == 2 and "label_is_tau == 1" in other.output
    unknown = runner.invoke(app, [*command[:-3], str(tmp_path / "x"), "--where", "is_tau == 1"])
    assert unknown.exit_code == 2 and "no per-jet column is_tau" in unknown.output


@pytest.mark.integration
def test_a_tiny_chain_runs_skips_on_rerun_and_keeps_the_pretrained_backbone_frozen(tmp_path):
    chain = tiny_chain(tmp_path, write_jets(tmp_path / "jets"))
    work = tmp_path / "work"
    result = runner.invoke(app, ["chain", "run", str(chain), "--workdir", str(work)])
    assert result.exit_code == 0, result.output + "".join(p.read_text()[-3000:] for p in (work / "logs").glob("*.log"))
    state = json.loads((work / "chain-state.json").read_text())["stages"]
    assert {n: s["state"] for n, s in state.items()} == dict.fromkeys(["tokenizer", "tokens", "pretrain", "tagging-frozen"], "done")
    assert all(s["duration_s"] > 0 and s["returncode"] == 0 for s in state.values())
    assert (work / "logs/pretrain.log").read_text().startswith("== ")

    pretrained = load_model_state(latest_checkpoint(work / "runs/pretrain"))
    frozen = load_model_state(latest_checkpoint(work / "runs/tagging-frozen"))
    backbone = [k for k in pretrained if k.startswith("backbone.")]
    assert backbone and all(torch.equal(pretrained[k], frozen[k]) for k in backbone)
    assert any(k.startswith("heads.") for k in frozen)
    # full fine-tuning starts from the same backbone: the model the training loop builds before its first step
    finetune = load_job(ROOT / "jobs/omnijet-tau-tagging-finetune.yaml",
                        [*override_strings(TINY), f"training.init_from={work / 'runs/pretrain'}", "training.epochs=40"])
    torch.manual_seed(1)
    start = initial_model(finetune, process_group_context()).state_dict()
    assert all(torch.equal(pretrained[k], start[k]) for k in backbone)

    again = runner.invoke(app, ["chain", "run", str(chain), "--workdir", str(work)])
    assert again.exit_code == 0 and again.output.count("finished earlier, skipped") == 4, again.output
    status = runner.invoke(app, ["chain", "status", str(chain), "--workdir", str(work), "--json"])
    rows = {r["stage"]: r for r in json.loads(status.stdout)}
    assert rows["tokens"]["headline"] == "600 examples" and rows["tagging-frozen"]["headline"].startswith("val_tau_id_auc")


@pytest.mark.parametrize("name, stages", [("omnijet-tau-quickstart", 26), ("omnijet-tau", 24)])
def test_the_shipped_chains_are_valid_and_ship_with_the_package(tmp_path, name, stages):
    path = shipped_jobs_dir() / "chains" / f"{name}.yaml"  # hepml_dist/_shipped/jobs -> jobs/
    assert "_shipped/jobs/chains/*.yaml" in (ROOT / "pyproject.toml").read_text()
    plan = plan_chain(path, tmp_path)
    assert len(plan.stages) == stages and plan.stages[-1].kind == "study"
    modes = {n: (j.training.init_from, j.training.freeze) for n, j in plan.jobs.items() if n.count("-") == 1}
    assert len(modes) == 9 and all(bool(init) == (not n.endswith("scratch")) for n, (init, _) in modes.items())
    assert plan.stage("tokens-tau").argv[-2:] == ("--where", "label_is_tau == 1")


def fake_stage(name: str, out: Path, needs=(), cpus=1, fail=False) -> PlannedStage:
    """A step that records when it ran and writes its completion marker (a manifest), or fails."""
    code = (f"import json, pathlib, sys, time; out = pathlib.Path({str(out)!r}); out.mkdir(parents=True); t = time.time(); "
            f"time.sleep(1.0); sys.exit(3) if {fail} else None; "
            "(out / 'times.json').write_text(json.dumps([t, time.time()])); (out / 'manifest.json').write_text('{}')")
    return PlannedStage(name, "generate", tuple(needs), (sys.executable, "-c", code), {"out": str(out)}, cpus, 0)


def fake_plan(tmp_path: Path, stages: list[PlannedStage]) -> ChainPlan:
    spec = ChainSpec.model_validate({"name": "fake", "stages": {"x": {"step": "generate", "process": "p", "events": 1}}})
    return ChainPlan(tmp_path / "chain.yaml", tmp_path / "work", spec, tuple(stages), {})


def test_independent_stages_run_together_only_when_their_cpus_fit_and_a_failure_blocks_what_needs_it(tmp_path):
    def times(name):
        return json.loads((tmp_path / name / "times.json").read_text())

    stages = [fake_stage("a", tmp_path / "a"), fake_stage("b", tmp_path / "b"),
              fake_stage("c", tmp_path / "c", needs=["a", "b"])]
    assert ChainRunner(fake_plan(tmp_path, stages), max_cpus=2).run()
    assert times("a")[0] < times("b")[1] and times("b")[0] < times("a")[1]  # a and b overlapped
    assert times("c")[0] >= max(times("a")[1], times("b")[1])  # c waited for both

    serial = [fake_stage(n, tmp_path / "serial" / n) for n in ("a", "b")]
    assert ChainRunner(fake_plan(tmp_path / "serial", serial), max_cpus=1).run()
    first, second = (json.loads((tmp_path / "serial" / n / "times.json").read_text()) for n in ("a", "b"))
    assert second[0] >= first[1]  # one CPU: one after the other

    broken = [fake_stage("a", tmp_path / "f" / "a", fail=True), fake_stage("b", tmp_path / "f" / "b", needs=["a"]),
              fake_stage("c", tmp_path / "f" / "c")]
    assert not ChainRunner(fake_plan(tmp_path / "f", broken), max_cpus=1).run()
    state = json.loads((tmp_path / "f" / "work" / "chain-state.json").read_text())["stages"]
    assert {n: s["state"] for n, s in state.items()} == {"a": "failed", "b": "blocked", "c": "done"}
    assert state["a"]["returncode"] == 3 and not (tmp_path / "f" / "b").exists()
