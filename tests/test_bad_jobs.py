"""Malformed job files, each rejected cleanly: `hepml validate` exits 2 with a line `FILE: field: message` that names
the field (or the line of a YAML error), never a traceback. A table of hand-made cases (types, ranges, NaN and
infinity, unknown keys at every level, enums, regexes, YAML syntax, non-UTF-8 and binary files, python tags, alias
bombs, deep nesting, duplicate keys, broken `extends`, absurd names), then hypothesis: random values at real field
paths and random bytes never crash the validator."""

import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from hepml_dist.cli import app
from hepml_dist.spec import JobSpec
from hepml_dist.spec.loader import MAX_YAML_VALUES

ROOT = Path(__file__).resolve().parents[1]
BASE = str(ROOT / "jobs" / "multipartau-quickstart.yaml")
runner = CliRunner()


def alias_bomb(levels: int = 9) -> str:
    """Nine lists of nine references to the list before: 9**9 values once expanded, a few hundred bytes on disk."""
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return f"extends: {BASE}\n" + "\n".join(lines) + "\n"


big_alias = alias_bomb()

# case: (file content: str, bytes, or None for the special cases below; text the error output must contain)
CASES = {
    "empty": ("", 'name: required field is missing'),
    "only_comment": ("# nothing\n", 'name: required field is missing'),
    "null": ("null\n", 'model: required field is missing'),
    "scalar": ("42\n", '(top level): a job file must be a mapping'),
    "string": ("just a string\n", '(top level): a job file must be a mapping'),
    "list_top": ("- a\n- b\n", '(top level): a job file must be a mapping'),
    "binary": (b"\x00\xff\xfe\x89PNG\r\n\x1a\n", '(file): not UTF-8 text'),
    "python_tag": ("!!python/object/apply:os.system ['echo hi']\n", 'could not determine a constructor for the tag'),
    "python_name": ("name: !!python/name:os.system\n", 'could not determine a constructor for the tag'),
    "alias_bomb": (big_alias, '(yaml): more than 100,000 values'),
    "deep_nesting": ("a: " + "[" * 2000 + "]" * 2000 + "\n", '(yaml): nested too deeply'),
    "tab_indent": ("name: x\n\tmodel: {}\n", 'line 2, column 1: YAML syntax error'),
    "dup_keys": (f"extends: {BASE}\nname: a\nname: b\n", "line 3, column 1: YAML syntax error: duplicate key 'name'"),
    "extends_list": ("extends: [a.yaml, b.yaml]\nname: x\n", "extends: base job 'a.yaml' not found"),
    "extends_int": ("extends: 5\n", 'extends: must be a file name or a list'),
    "extends_self": ("extends: SELF\nname: x\n", 'extends: cyclic extends'),
    "extends_dir": ("extends: /tmp\nname: x\n", "extends: base job '/tmp' not found"),
    "extends_binary": (f"extends: {sys.executable}\nname: x\n", "is not usable (the problem above)"),
    "name_empty": (f"extends: {BASE}\nname: ''\n", 'name: String should match pattern'),
    "name_slash": (f"extends: {BASE}\nname: ../../etc/passwd\n", 'name: String should match pattern'),
    "name_long": (f"extends: {BASE}\nname: {'x'*5000}\n", 'name: String should have at most 128 characters'),
    "name_list": (f"extends: {BASE}\nname: [a]\n", 'name: Input should be a valid string'),
    "lr_nan": (f"extends: {BASE}\noptim: {{lr: .nan}}\n", 'optim.lr: Input should be a finite number'),
    "lr_inf": (f"extends: {BASE}\noptim: {{lr: .inf}}\n", 'optim.lr: Input should be a finite number'),
    "lr_string": (f"extends: {BASE}\noptim: {{lr: fast}}\n", 'optim.lr: Input should be a valid number'),
    "lr_zero": (f"extends: {BASE}\noptim: {{lr: 0}}\n", 'optim.lr: Input should be greater than 0'),
    "wd_nan": (f"extends: {BASE}\noptim: {{weight_decay: .nan}}\n", 'optim.weight_decay: Input should be a finite number'),
    "clip_negative": (f"extends: {BASE}\noptim: {{clip_grad_norm: -1}}\n", 'optim.clip_grad_norm: Input should be greater than 0'),
    "betas_three": (f"extends: {BASE}\noptim: {{betas: [0.9, 0.99, 0.5]}}\n", 'optim.betas: Tuple should have at most 2 items'),
    "betas_out_of_range": (f"extends: {BASE}\noptim: {{betas: [1.5, 0.99]}}\n", 'optim.betas[0]: Input should be less than 1'),
    "batch_zero": (f"extends: {BASE}\ndata: {{batch_size: 0}}\n", 'data.batch_size: Input should be greater than or equal to 1'),
    "batch_float": (f"extends: {BASE}\ndata: {{batch_size: 2.5}}\n", 'data.batch_size: Input should be a valid integer'),
    "batch_huge": (f"extends: {BASE}\ndata: {{batch_size: 1e30}}\n", 'data.batch_size: Input should be a valid integer'),
    "max_length_negative": (f"extends: {BASE}\ndata: {{inputs: {{max_length: -3}}}}\n", 'data.inputs.max_length: Input should be greater than or equal to 1'),
    "epochs_zero": (f"extends: {BASE}\ntraining: {{epochs: 0}}\n", 'training.epochs: Input should be greater than or equal to 1'),
    "epochs_bool": (f"extends: {BASE}\ntraining: {{epochs: true}}\n", 'training.epochs: expected a number, not true'),
    "workers_zero": (f"extends: {BASE}\nparallel: {{num_workers: 0}}\n", 'parallel.num_workers: Input should be greater than or equal to 1'),
    "workers_negative": (f"extends: {BASE}\nparallel: {{num_workers: -2}}\n", 'parallel.num_workers:'),
    "gpus_negative": (f"extends: {BASE}\nparallel: {{gpus_per_worker: -1}}\n", 'parallel.gpus_per_worker: Input should be greater than or equal to 0'),
    "zero_stage_4": (f"extends: {BASE}\nparallel: {{strategy: deepspeed, zero_stage: 4}}\ntraining: {{multitask: sum}}\n", 'parallel.zero_stage: Input should be less than or equal to 3'),
    "accelerator_unknown": (f"extends: {BASE}\nparallel: {{accelerator: TPUv5}}\n", "parallel.accelerator: Input should be 'cpu'"),
    "precision_unknown": (f"extends: {BASE}\ntraining: {{precision: fp8}}\n", "training.precision: Input should be 'fp32'"),
    "tasks_empty": (f"extends: {BASE}\ntasks: []\n", 'tasks: List should have at least 1 item'),
    "tasks_mapping": (f"extends: {BASE}\ntasks: {{a: 1}}\n", 'tasks: Input should be a valid list'),
    "tasks_null": (f"extends: {BASE}\ntasks: null\n", 'tasks: Input should be a valid list'),
    "task_no_name": (f"extends: {BASE}\ntasks: [{{kind: binary}}]\ntraining: {{multitask: sum}}\n", 'tasks[0].name: required field is missing'),
    "task_kind_unknown": (f"extends: {BASE}\ntasks: [{{name: t, kind: ranking}}]\ntraining: {{multitask: sum}}\n", "tasks[0].kind: Input should be 'binary'"),
    "task_dup_names": (f"extends: {BASE}\ntasks: [{{name: t, kind: binary}}, {{name: t, kind: binary}}]\ntraining: {{multitask: sum}}\n", "tasks[1].name: task name 't' is used twice"),
    "task_weight_nan": (f"extends: {BASE}\ntasks: [{{name: t, kind: binary, weight: .nan}}]\ntraining: {{multitask: sum}}\n", 'tasks[0].weight: Input should be a finite number'),
    "task_weight_negative": (f"extends: {BASE}\ntasks: [{{name: t, kind: binary, weight: -1}}]\ntraining: {{multitask: sum}}\n", 'tasks[0].weight: Input should be greater than or equal to 0'),
    "task_unknown_key": (f"extends: {BASE}\ntasks: [{{name: t, kind: binary, colour: red}}]\ntraining: {{multitask: sum}}\n", "tasks[0].colour: unknown field 'colour'"),
    "freeze_bad_regex": (f"extends: {BASE}\ntraining: {{init_from: x, freeze: ['[unclosed']}}\n", 'training.freeze[0]: not a valid regular expression'),
    "init_modules_bad_regex": (f"extends: {BASE}\ntraining: {{init_from: x, init_modules: ['(?P<']}}\n", 'training.init_modules[0]: not a valid regular expression'),
    "protect_unknown_task": (f"extends: {BASE}\ntraining: {{pcgrad: {{protect: [nope]}}}}\n", "training.pcgrad.protect[0]: no task named 'nope'"),
    "phase_bad_regex": (f"extends: {BASE}\ntraining: {{phases: [{{start_epoch: 2, trainable: ['*bad']}}]}}\n", 'training.phases[0].trainable[0]: not a valid regular expression'),
    "unknown_top": (f"extends: {BASE}\nfoo: 1\n", "foo: unknown field 'foo'"),
    "unknown_model": (f"extends: {BASE}\nmodel: {{colour: red}}\n", 'model.colour: unknown field'),
    "unknown_data": (f"extends: {BASE}\ndata: {{colour: red}}\n", 'data.colour: unknown field'),
    "unknown_inputs": (f"extends: {BASE}\ndata: {{inputs: {{colour: red}}}}\n", 'data.inputs.colour: unknown field'),
    "unknown_optim": (f"extends: {BASE}\noptim: {{colour: red}}\n", 'optim.colour: unknown field'),
    "unknown_schedule": (f"extends: {BASE}\nschedule: {{colour: red}}\n", 'schedule.colour: unknown field'),
    "unknown_training": (f"extends: {BASE}\ntraining: {{colour: red}}\n", 'training.colour: unknown field'),
    "unknown_pcgrad": (f"extends: {BASE}\ntraining: {{pcgrad: {{colour: red}}}}\n", 'training.pcgrad.colour: unknown field'),
    "unknown_parallel": (f"extends: {BASE}\nparallel: {{colour: red}}\n", 'parallel.colour: unknown field'),
    "unknown_checkpoint": (f"extends: {BASE}\ncheckpoint: {{colour: red}}\n", 'checkpoint.colour: unknown field'),
    "unknown_tracking": (f"extends: {BASE}\ntracking: {{colour: red}}\n", 'tracking.colour: unknown field'),
    "unknown_cluster": (f"extends: {BASE}\ncluster: {{colour: red}}\n", 'cluster.colour: unknown field'),
    "section_is_list": (f"extends: {BASE}\noptim: [1, 2]\n", 'optim: Input should be a valid dictionary'),
    "section_is_string": (f"extends: {BASE}\ntraining: fast\n", 'training: Input should be a valid dictionary'),
    "family_unknown": (f"extends: {BASE}\nmodel: {{family: gnn}}\n", "model: unknown model family 'gnn'"),
    "family_int": (f"extends: {BASE}\nmodel: {{family: 3}}\n", 'model: unknown model family 3'),
    "embed_dims_empty": (f"extends: {BASE}\nmodel: {{embed_dims: []}}\n", 'model.embed_dims: List should have at least 1 item'),
    "heads_zero": (f"extends: {BASE}\nmodel: {{num_heads: 0}}\n", 'model.num_heads: Input should be greater than or equal to 1'),
    "dropout_2": (f"extends: {BASE}\nmodel: {{dropout: 2.0}}\n", 'model.dropout: Input should be less than 1'),
    "features_unknown": (f"extends: {BASE}\ndata: {{inputs: {{features: magic}}}}\n", "data.inputs.features: unknown feature set 'magic'"),
    "keep_best_unknown_mode": (f"extends: {BASE}\ncheckpoint: {{best_mode: sideways}}\n", "checkpoint.best_mode: Input should be 'min' or 'max'"),
    "keep_last_negative": (f"extends: {BASE}\ncheckpoint: {{keep_last: -1}}\n", 'checkpoint.keep_last:'),
    "tracking_mode_bad": (f"extends: {BASE}\ntracking: {{mode: telepathy}}\n", 'tracking.mode: Input should be'),
    "api_key_in_file": (f"extends: {BASE}\ntracking: {{api_key: abc123}}\n", "tracking.api_key: unknown field 'api_key'"),
    "eval_interval_zero": (f"extends: {BASE}\ntraining: {{eval_interval: 0}}\n", 'training.eval_interval:'),
    "grad_accum_zero": (f"extends: {BASE}\ntraining: {{grad_accum: 0}}\n", 'training.grad_accum:'),
    "seed_string": (f"extends: {BASE}\ntraining: {{seed: abc}}\n", 'training.seed: Input should be a valid integer'),
    "yaml_unclosed_quote": ("name: 'abc\n", 'YAML syntax error: found unexpected end of stream'),
    "yaml_bad_indent": ("name: x\n  model: 3\n bad: 4\n", 'line 2, column 8: YAML syntax error'),
    "yaml_colon": ("name: x: y\n", 'line 1, column 8: YAML syntax error'),
    "int_key": (f"extends: {BASE}\n1: 2\n", '[1]: Keys should be strings'),
    "null_key": (f"extends: {BASE}\n~: 2\n", 'None: Keys should be strings'),
    "huge_int": (f"extends: {BASE}\ntraining: {{seed: {10**400}}}\n", 'training.seed: Input should be less than'),
    "utf16": ("name: x\n".encode("utf-16"), '(file): not UTF-8 text'),
}


def write(path: Path, content) -> Path:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content.replace("SELF", str(path)))
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_job_exits_2_naming_file_and_field(case, tmp_path):
    content, expected = CASES[case]
    job = write(tmp_path / f"{case}.yaml", content)
    result = runner.invoke(app, ["validate", str(job)])
    assert result.exit_code == 2, result.output
    assert expected in result.output, result.output
    assert f"{job}: " in result.output and "1 of 1 job(s) invalid" in result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, (RecursionError, UnicodeError, MemoryError))


def test_there_are_at_least_sixty_hand_cases():
    assert len(CASES) >= 60
    assert MAX_YAML_VALUES < 9**9


# ---- hypothesis: random values at real field paths, random bytes ------------------------------------------------


def field_paths() -> list[tuple[str, ...]]:
    """Every (section, field) of the spec's sections, and the top-level fields."""
    paths = []
    for name, field in JobSpec.model_fields.items():
        paths.append((name,))
        annotation = field.annotation
        if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
            paths += [(name, sub) for sub in annotation.model_fields]
    return paths


scalars = st.one_of(st.none(), st.booleans(), st.integers(min_value=-10**30, max_value=10**30),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(field_paths()), value=values)
def test_random_values_at_real_fields_never_crash(tmp_path, path, value):
    override: dict = {}
    node = override
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value
    job = tmp_path / "random.yaml"
    job.write_text(yaml.safe_dump({"extends": BASE, **override}))
    result = runner.invoke(app, ["validate", str(job)])
    assert result.exit_code in (0, 2), (path, value, result.output, result.exception)
    if result.exit_code == 2:
        problems = [line for line in result.output.splitlines() if "job(s) invalid" not in line]
        assert problems and all(line.startswith(f"{job}: ") for line in problems), result.output


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(content=st.binary(max_size=200))
def test_random_bytes_are_refused_cleanly(tmp_path, content):
    job = tmp_path / "junk.yaml"
    job.write_bytes(content)
    result = runner.invoke(app, ["validate", str(job)])
    assert result.exit_code == 2, (content, result.output, result.exception)
    assert result.output.startswith(f"{job}: ")
