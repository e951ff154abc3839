"""The job spec: shipped jobs validate, bad inputs give exit 2 naming the field, `show` round-trips."""

import textwrap
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from typer.testing import CliRunner

from hepml_dist.cli import app
from hepml_dist.spec import JobSpec, SpecError, dump_spec, load_job, parse_spec
from hepml_dist.spec.loader import _models_in

ROOT = Path(__file__).resolve().parents[1]
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))
runner = CliRunner()

EXPECTED_JOBS = {
    "part-jetclass", "sophon", "multipartau",
    *(f"singlepartau-{t}" for t in ("tauid", "charge", "decaymode", "kinematics")),
    "omnijet-tokenizer", "omnijet-pretrain",
    *(f"omnijet-tau-{t}-{m}" for t in ("tagging", "kinematics", "decaymode") for m in ("scratch", "frozen", "finetune")),
    "mlpf-clic", "aot",
    "multipartau-quickstart", "part-quickstart", "omnijet-tau-quickstart", "mlpf-quickstart", "aot-quickstart",
}


def test_every_seed_model_has_a_job():
    assert EXPECTED_JOBS <= {p.stem for p in JOBS}


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.stem)
def test_shipped_job_validates_and_names_itself(job):
    spec = load_job(job)
    assert spec.name == job.stem


def test_validate_cli_accepts_all_jobs():
    result = runner.invoke(app, ["validate", *map(str, JOBS)])
    assert result.exit_code == 0, result.output
    assert f"{len(JOBS)} job(s) valid" in result.output


@pytest.mark.parametrize("job", JOBS, ids=lambda p: p.stem)
def test_show_output_validates_again(job, tmp_path):
    result = runner.invoke(app, ["show", str(job)])
    assert result.exit_code == 0, result.output
    resolved = tmp_path / "resolved.yaml"
    resolved.write_text(result.stdout)
    assert load_job(resolved) == load_job(job)


def test_jobs_table_lists_every_job():
    result = runner.invoke(app, ["jobs", str(ROOT / "jobs")])
    assert result.exit_code == 0, result.output
    for job in JOBS:
        assert job.stem in result.output


def test_published_numbers_reach_the_specs():
    part = load_job(ROOT / "jobs/part-jetclass.yaml")
    assert part.optim.name == "radam_lookahead" and part.optim.lr == 1e-3 and part.optim.betas == (0.95, 0.999)
    assert part.tasks[0].output_dim == 10
    sophon = load_job(ROOT / "jobs/sophon.yaml")
    assert sophon.tasks[0].output_dim == 188 and sophon.model.head.hidden == [512]
    assert sophon.model.use_pre_activation_pair and sophon.optim.lr == 5e-4  # extends part-jetclass, overrides these
    assert sum(len(g.labels) for g in sophon.data.reweight.groups) == 188
    tau = load_job(ROOT / "jobs/multipartau.yaml")
    assert [t.name for t in tau.tasks] == ["tau_id", "charge", "decay_mode", "kinematics"]
    assert tau.training.multitask == "pcgrad" and tau.task("kinematics").weight == 2.0
    assert tau.data.batch_size == 12288


def test_set_overrides_are_typed_and_validated():
    spec = load_job(ROOT / "jobs/part-quickstart.yaml", ["optim.lr=1e-4", "model.num_layers=3", "tracking.tags=[a, b]"])
    assert spec.optim.lr == pytest.approx(1e-4) and spec.model.num_layers == 3 and spec.tracking.tags == ["a", "b"]


def test_set_reaches_list_items_and_appends():
    spec = load_job(BASE, ["tasks.1.weight=3", "tasks.-1.loss=mse", "tracking.tags+=mine", "tracking.tags+=[x, y]"])
    base = load_job(BASE)
    assert [t.weight for t in spec.tasks] == [base.tasks[0].weight, 3.0, *[t.weight for t in base.tasks[2:]]]
    assert spec.tasks[-1].loss == "mse" and base.tasks[-1].loss != "mse"
    assert spec.tracking.tags == [*base.tracking.tags, "mine", "x", "y"]


def test_resume_applies_set_to_the_runs_own_spec_and_refuses_fixed_fields(tmp_path, monkeypatch):
    from hepml_dist.models import build_model
    from hepml_dist.runs import write_model_checkpoint, write_run_spec
    from hepml_dist.train import launch

    spec = load_job(BASE)
    run = tmp_path / "run"
    run.mkdir()
    write_run_spec(run, spec)
    write_model_checkpoint(run / "checkpoints" / "step-00000004", spec, build_model(spec), {"step": 4})
    launched = []
    monkeypatch.setattr(launch, "launch", lambda spec, **kw: launched.append(spec) or _Ended(kw["run_dir"]))
    ok = runner.invoke(app, ["train", "--resume", str(run), "--set", "training.epochs=9"])
    assert ok.exit_code == 0, ok.output
    assert launched[-1].training.epochs == 9 and launched[-1].name == spec.name

    monkeypatch.undo()  # the real launcher: it checks the resumed spec before starting anything
    refused = runner.invoke(app, ["train", "--resume", str(run), "--set", "model.num_layers=5"])
    assert refused.exit_code == 2 and "model.num_layers" in refused.output, refused.output
    assert "Traceback" not in refused.output


class _Ended:
    def __init__(self, run_dir):
        self.run_dir, self.step, self.finished, self.stopped = run_dir, 4, True, False


def test_every_field_is_documented_where_declared():
    undocumented = []
    seen: set[type] = set()

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, field in model.model_fields.items():
            if not field.description:
                undocumented.append(f"{model.__name__}.{name}")
            for sub in _models_in(field.annotation):
                walk(sub)

    walk(JobSpec)
    assert not undocumented


# ---- bad inputs: each must give exit status 2 and name the offending field -------------------------------

BASE = ROOT / "jobs" / "multipartau-quickstart.yaml"


def _job(tmp_path: Path, text: str, name: str = "bad.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).replace("BASE", str(BASE)).replace("JOBS", str(ROOT / "jobs")))
    return path


BAD_CASES = {
    # id: (job text or None, --set overrides, text that must appear in the error)
    "unknown_key": ("extends: BASE\noptim: {lrate: 0.1}\n", [], "optim.lrate: unknown field 'lrate'; did you mean 'lr'?"),
    "unknown_section": ("extends: BASE\ntrainer: {steps: 3}\n", [], "trainer: unknown field"),
    "wrong_type": ("extends: BASE\ndata: {batch_size: many}\n", [], "data.batch_size:"),
    "bad_enum": ("extends: BASE\nparallel: {strategy: horovod}\n", [], "parallel.strategy:"),
    "negative_lr": ("extends: BASE\noptim: {lr: -0.001}\n", [], "optim.lr: Input should be greater than 0"),
    "pcgrad_zero3": ("extends: BASE\ntraining: {multitask: pcgrad}\nparallel: {strategy: deepspeed, zero_stage: 3}\n", [], "training.multitask: PCGrad needs"),
    "mixed_vendors": ("extends: BASE\nparallel: {accelerator: [A100, MI250X], gpus_per_worker: 1}\n", [],
                      "parallel.accelerator: one job cannot mix A100 and MI250X"),
    "heads_not_dividing": ("extends: BASE\nmodel: {embed_dims: [64, 128, 66]}\n", [], "model.embed_dims: model width 66 is not divisible by 4"),
    "deepspeed_fp16_on_cpu": ("extends: BASE\ntraining: {precision: fp16-mixed, multitask: sum}\nparallel: {strategy: deepspeed, zero_stage: 2}\n",
                              [], "training.precision: DeepSpeed has no fp16 on CPU"),
    "fp16_scale_too_large": ("extends: BASE\ntraining: {precision: fp16-mixed, fp16_initial_scale_power: 99}\n", [],
                             "training.fp16_initial_scale_power: Input should be less than or equal to 64"),
    "class_count_mismatch": ("extends: BASE\ntasks:\n  - {name: dm, kind: multiclass, classes: [a, b, c], num_classes: 4}\ntraining: {multitask: sum}\n",
                             [], "tasks[0].num_classes: num_classes is 4 but 3 class names"),
    "binary_with_three_classes": ("extends: BASE\ntasks:\n  - {name: t, kind: binary, classes: [a, b, c]}\ntraining: {multitask: sum}\n",
                                  [], "tasks[0].classes: a binary task has exactly 2 classes"),
    "regression_without_targets": ("extends: BASE\ntasks:\n  - {name: r, kind: regression, loss: huber}\ntraining: {multitask: sum}\n",
                                   [], "tasks[0].targets: a regression task needs"),
    "loss_for_wrong_kind": ("extends: BASE\ntasks:\n  - {name: r, kind: regression, targets: [x], loss: ce}\ntraining: {multitask: sum}\n",
                            [], "tasks[0].loss: loss 'ce' does not fit a regression task"),
    "pcgrad_single_task": ("extends: BASE\ntraining: {multitask: pcgrad}\ntasks:\n  - {name: t, kind: binary}\n", [], "training.multitask: PCGrad resolves conflicts"),
    "unknown_family": ("extends: BASE\nmodel: {family: gnn}\n", [], "model: unknown model family 'gnn'"),
    "missing_data": ("name: x\nmodel: {family: aot}\ntasks: [{name: s, kind: binary}]\n", [], "data: required field is missing"),
    "missing_extends": ("extends: nowhere.yaml\nname: x\n", [], "extends: base job 'nowhere.yaml' not found"),
    "yaml_syntax": ("name: x\nmodel: {family: part\ntasks: []\n", [], "YAML syntax error"),
    "not_a_mapping": ("- just\n- a list\n", [], "(top level): a job file must be a mapping"),
    "bad_set_path": ("extends: BASE\n", ["optim.lrr=1e-3"], "optim.lrr: --set optim.lrr=1e-3: no such field; did you mean 'lr'?"),
    "bad_set_index": ("extends: BASE\n", ["tasks.9.weight=2"], "tasks.9: --set tasks.9.weight=2: no item 9 in a list of 4"),
    "bad_set_field_in_list": ("extends: BASE\n", ["tasks.0.wieght=2"], "tasks.0.wieght: --set tasks.0.wieght=2: no such field; did you mean 'weight'?"),
    "bad_set_append": ("extends: BASE\n", ["optim.lr+=1"], "optim.lr: --set optim.lr+=1: += appends to a list"),
    "bad_set_syntax": ("extends: BASE\n", ["optim.lr"], "an override looks like section.field=value"),
    "bad_set_value": ("extends: BASE\n", ["data.batch_size=-5"], "data.batch_size: Input should be greater than or equal to 1"),
    "zero_stage_without_deepspeed": ("extends: BASE\nparallel: {zero_stage: 2}\n", [], "parallel.zero_stage: ZeRO stages need"),
    "freeze_without_init": ("extends: BASE\ntraining: {freeze: ['^backbone']}\n", [], "training.freeze: frozen modules"),
    "bad_regex": ("extends: BASE\noptim: {lr_multipliers: {'(unclosed': 2}}\n", [], "optim.lr_multipliers['(unclosed']: not a valid regular expression"),
    "epochs_and_steps": ("extends: BASE\ntraining: {steps: 10}\n", [], "training.epochs: set exactly one of"),
    "unknown_feature_set": ("extends: BASE\ndata: {inputs: {features: magic}}\n", [], "data.inputs.features: unknown feature set 'magic'"),
    "duplicate_task": ("extends: BASE\ntasks:\n  - {name: t, kind: binary}\n  - {name: t, kind: binary}\n", [], "tasks[1].name: task name 't' is used twice"),
    "gpus_on_cpu": ("extends: BASE\nparallel: {gpus_per_worker: 1}\n", [], "parallel.gpus_per_worker: GPUs requested"),
    "omnijet_vocabulary": ("extends: JOBS/omnijet-pretrain.yaml\ntasks: [{name: next_token, kind: multiclass, label: tokens, num_classes: 8192}]\n",
                           [], "tasks[0].num_classes: next-token prediction over 8192 codes has 8194 classes"),
    "deepspeed_lookahead": ("extends: BASE\nparallel: {strategy: deepspeed, zero_stage: 1}\noptim: {name: radam_lookahead}\ntraining: {multitask: sum, phases: []}\n",
                            [], "optim.name: with DeepSpeed use one of adamw, adam"),
    "deepspeed_pcgrad": ("extends: BASE\ntraining: {multitask: pcgrad}\nparallel: {strategy: deepspeed, zero_stage: 1}\n", [], "training.multitask: PCGrad runs with parallel.strategy: ddp"),
    "pcgrad_protect_unknown": ("extends: BASE\ntraining: {multitask: pcgrad, pcgrad: {protect: [kinematic]}}\n", [], "training.pcgrad.protect[0]: no task named 'kinematic'"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_input_exits_2_and_names_the_field(case, tmp_path):
    text, overrides, expected = BAD_CASES[case]
    job = _job(tmp_path, text)
    args = ["validate", str(job)] + [a for o in overrides for a in ("--set", o)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert expected in result.output, result.output
    assert str(job) in result.output  # every line names the file
    assert "Traceback" not in result.output


def test_cyclic_extends(tmp_path):
    a = _job(tmp_path, "extends: b.yaml\nname: a\n", "a.yaml")
    _job(tmp_path, "extends: a.yaml\nname: b\n", "b.yaml")
    result = runner.invoke(app, ["validate", str(a)])
    assert result.exit_code == 2
    assert "cyclic extends: a.yaml -> b.yaml -> a.yaml" in result.output


def test_missing_job_file(tmp_path):
    result = runner.invoke(app, ["validate", str(tmp_path / "absent.yaml")])
    assert result.exit_code == 2
    assert "absent.yaml: (file): no such file" in result.output


def test_every_problem_is_reported_at_once(tmp_path):
    job = _job(tmp_path, "extends: BASE\noptim: {lr: -1, weight_decay: -1}\ndata: {batch_size: 0}\n")
    with pytest.raises(SpecError) as err:
        load_job(job)
    paths = {p.path for p in err.value.problems}
    assert {"optim.lr", "optim.weight_decay", "data.batch_size"} <= paths


def test_extends_deep_merges_and_replaces_lists(tmp_path):
    job = _job(tmp_path, "extends: BASE\nname: child\nmodel: {num_layers: 3}\ntracking: {tags: [x]}\n")
    child, base = load_job(job), load_job(BASE)
    assert child.model.num_layers == 3 and child.model.embed_dims == base.model.embed_dims
    assert child.tracking.tags == ["x"]


def test_parse_spec_rejects_what_load_rejects():
    data = yaml.safe_load(dump_spec(load_job(BASE)))
    data["parallel"]["accelerator"] = ["H100", "MI300X"]
    data["parallel"]["gpus_per_worker"] = 1
    with pytest.raises(SpecError, match="NCCL"):
        parse_spec(data)


def test_field_reference_doc_is_current():
    from hepml_dist.spec.reference import render

    doc = ROOT / "docs" / "job-reference.md"
    assert doc.read_text() == render(), "regenerate: python -m hepml_dist.spec.reference > docs/job-reference.md"
