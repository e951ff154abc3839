"""The chain file: named stages (a training job, or a step such as `generate` or `tokenize`), what each needs, and
references between them (`${stages.pretrain.run_dir}`, `${stages.tokens.out}`), validated like a job file.

    name: omnijet-tau-quickstart
    set: [model.tokenizer.codebook_size=512]        # applied to every job stage, before the stage's own `set`
    stages:
      jets:      {step: generate, process: fcc-tau, events: 2000}
      tokenizer: {job: omnijet-tokenizer, set: {data.train: '${stages.jets.out}/train'}}
      tokens:    {step: tokenize, tokenizer: '${stages.tokenizer.run_dir}', data: '${stages.jets.out}'}

Every problem is reported as `file: stages.<stage>.<field>: message`, all at once, before anything runs: unknown
fields, unknown stages in `needs` or in a reference, a cycle (named), and (hepml_dist.chain.plan) a job that loads
another stage's weights with tensors of another shape. A reference implies a need.
"""

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError

from hepml_dist.errors import UserError
from hepml_dist.spec import SpecError
from hepml_dist.spec.loader import read_yaml

REFERENCE = re.compile(r"\$\{stages\.([A-Za-z0-9_-]+)\.([A-Za-z_]+)\}")
"""`${stages.<name>.<output>}`: an output of another stage, resolved to an absolute path."""
STAGE_NAME = r"^[A-Za-z0-9][A-Za-z0-9_-]*$"


class ChainError(UserError):
    """Problems of a chain file, one line each (`file: stages.<stage>.<field>: message`)."""

    def __init__(self, source: str, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("\n".join(f"{source}: {where}: {message}" for where, message in problems))


class _Base(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, allow_inf_nan=False)


class _Stage(_Base):
    needs: list[str] = Field(default_factory=list)
    """Stages that must finish before this one starts (stages named in references are added on their own)."""
    cpus: int | None = Field(None, ge=0)
    """CPU cores the stage occupies while it runs (default: a job's workers x cpus_per_worker, a step's own need);
    `hepml chain run` starts independent stages together only while their sum fits the machine."""
    gpus: int | None = Field(None, ge=0)
    """GPUs the stage occupies (default: a job's workers x gpus_per_worker, 0 for steps)."""


class JobStage(_Stage):
    """A training job, run as `hepml train JOB --run-dir DIR --set ...` (a rerun resumes it)."""

    job: str
    """The job file: a path relative to the chain file, or a job name looked up like `extends` (the chain file's
    folder, $HEPML_JOBS_PATH, the shipped jobs)."""
    set: list[str] | dict[str, Any] = Field(default_factory=list)
    """Overrides of this job, after the chain's `set`: `field.path=value` strings, or a mapping field.path -> value
    (a mapping value sets its fields one by one, like nested `--set`s; a list replaces the list)."""
    run_dir: str | None = None
    """Run directory (default: <workdir>/runs/<stage>); relative to the working directory."""


class GenerateStep(_Stage):
    """`hepml data generate PROCESS --events N --out OUT`: a dataset from Pythia 8 and a parametrised detector."""

    step: Literal["generate"]
    """Step kind."""
    process: str
    """Generator process (fcc-tau, jetclass-lite, jetclass2-lite, clic-events, events-met)."""
    events: int = Field(ge=1)
    """Collision events to generate."""
    seed: int = Field(0, ge=0)
    """Random seed of the generation."""
    fractions: str | None = None
    """Train, val and test fractions, e.g. `0.7,0.1,0.2` (default: the generator's)."""
    workers: int | None = Field(None, ge=1)
    """Generator processes (default: the stage's cpus, else 1)."""
    out: str | None = None
    """Dataset folder (default: <workdir>/data/<stage>)."""


class TokenizeStep(_Stage):
    """`hepml data tokenize TOKENIZER --data DATA --out OUT`: a jet dataset as OmniJet token shards."""

    step: Literal["tokenize"]
    """Step kind."""
    tokenizer: str
    """The trained tokenizer's run directory, usually `${stages.<tokenizer stage>.run_dir}`."""
    data: str
    """The jet dataset (folder with manifest.json) or one split folder of it."""
    max_length: int | None = Field(None, ge=3)
    """Tokens per jet (default: the tokenizer job's max_length)."""
    where: str | None = None
    """Keep only the jets where this expression of per-jet columns is true, e.g. `label_is_tau == 1`."""
    out: str | None = None
    """Token dataset folder (default: <workdir>/data/<stage>)."""


class EvaluateStep(_Stage):
    """`hepml evaluate RUN --split SPLIT`: RUN/metrics.json and plots."""

    step: Literal["evaluate"]
    """Step kind."""
    run: str
    """The run directory to evaluate, usually `${stages.<job stage>.run_dir}`."""
    split: Literal["train", "val", "test"] = "test"
    """Split to evaluate."""
    max_batches: int | None = Field(None, ge=1)
    """Evaluate at most this many batches."""


class ReportStep(_Stage):
    """`hepml report RUN --out OUT`: the HTML report of an evaluated run."""

    step: Literal["report"]
    """Step kind."""
    run: str
    """The evaluated run directory."""
    baseline: bool = False
    """Also train the report's baseline (a few seconds to minutes)."""
    out: str | None = None
    """HTML file (default: RUN/report.html)."""


class StudyStep(_Stage):
    """`hepml chain study STAGE=RUN_DIR ... --out OUT`: the page comparing the chain's evaluated job stages
    (hepml_dist.chain.study), each named by its stage (`<task>-<mode>`, e.g. `tagging-frozen`)."""

    step: Literal["study"]
    """Step kind."""
    stages: list[str] = Field(default_factory=list)
    """Job stages to compare (default: every job stage); each, and every evaluate step of one, is also a need."""
    out: str | None = None
    """Folder of the study page (default: <workdir>/study)."""


STEP_MODELS: dict[str, type[_Stage]] = {
    "generate": GenerateStep, "tokenize": TokenizeStep, "evaluate": EvaluateStep, "report": ReportStep,
    "study": StudyStep,
}
"""The step kinds a chain can name; their command lines are built in hepml_dist.chain.plan."""


def _stage_kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return "job" if isinstance(value, JobStage) else getattr(value, "step", None)
    if isinstance(value, dict):
        return "job" if "job" in value else value.get("step")
    return None


Stage = Annotated[
    Union[tuple(Annotated[m, Tag(k)] for k, m in {"job": JobStage, **STEP_MODELS}.items())],  # type: ignore[misc]
    Discriminator(_stage_kind),
]


class ChainSpec(_Base):
    """A chain file."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=128)
    """Chain name (letters, digits, `_.-`); names the default working directory chains/<name>."""
    description: str = ""
    """One line on what the chain makes."""
    workdir: str | None = None
    """Folder of the chain's state, logs and default outputs (default: chains/<name>, relative to the working
    directory; `--workdir` overrides)."""
    set: list[str] | dict[str, Any] = Field(default_factory=list)
    """Overrides applied to every job stage before the stage's own `set` (shared sizes keep shapes in agreement)."""
    stages: dict[Annotated[str, Field(pattern=STAGE_NAME)], Stage] = Field(min_length=1)
    """The stages by name, in any order: a job (`job:`) or a step (`step:` one of generate, tokenize, evaluate,
    report, study)."""


def _flatten(overrides: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """{model.backbone: {embedding_dim: 64}} -> [("model.backbone.embedding_dim", 64)]: a mapping sets its fields one
    by one (the job's other fields in it stay); lists and empty mappings are values."""
    items = []
    for key, value in overrides.items():
        if isinstance(value, dict) and value:
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def override_strings(overrides: list[str] | dict[str, Any]) -> list[str]:
    """`set` as `--set` strings: a mapping's values are written so that YAML reads them back unchanged."""
    if isinstance(overrides, list):
        return [str(o) for o in overrides]
    out = []
    for key, value in _flatten(overrides):
        text = value if isinstance(value, str) and _reads_back(value) else yaml.safe_dump(
            value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()
        out.append(f"{key}={text}")
    return out


def _reads_back(text: str) -> bool:
    try:
        return yaml.safe_load(text) == text
    except yaml.YAMLError:
        return False


def _location(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for i, p in enumerate(loc) if not (i == 2 and loc[0] == "stages" and p in ("job", *STEP_MODELS))]
    return ".".join(parts) or "(top level)"


def _message(error: dict[str, Any]) -> str:
    if error["type"] == "extra_forbidden":
        return f"unknown field {error['loc'][-1]!r}"
    if error["type"] == "union_tag_not_found":
        return "a stage is `job: FILE` or `step: KIND`"
    if error["type"] == "union_tag_invalid":
        return f"unknown step {error['input'].get('step')!r}; steps: {', '.join(STEP_MODELS)}"
    if error["type"] == "missing":
        return "required field is missing"
    return error["msg"]


def read_chain(path: Path) -> ChainSpec:
    """Parse and validate a chain file; then check needs and references (every problem at once)."""
    source = str(path)
    try:
        data = read_yaml(Path(path))
    except SpecError as err:
        raise ChainError(source, [(p.path, p.message) for p in err.problems]) from None
    try:
        spec = ChainSpec.model_validate(data)
    except ValidationError as err:
        problems: dict[str, str] = {}
        for e in err.errors():
            problems.setdefault(_location(tuple(e["loc"])), _message(e))
        raise ChainError(source, list(problems.items())) from None
    check_graph(spec, source)
    return spec


def references(value: Any) -> list[tuple[str, str]]:
    """The (stage, output) pairs referred to anywhere in a value (strings, lists and mappings, keys included)."""
    if isinstance(value, str):
        return REFERENCE.findall(value)
    if isinstance(value, dict):
        return [r for k, v in value.items() for r in (*references(k), *references(v))]
    if isinstance(value, (list, tuple)):
        return [r for v in value for r in references(v)]
    return []


def _fields(stage: _Stage) -> dict[str, Any]:
    return {k: getattr(stage, k) for k in type(stage).model_fields}


def output_names(stage: _Stage) -> tuple[str, ...]:
    """What a stage makes, by the name a reference uses."""
    return ("run_dir",) if isinstance(stage, JobStage) else ("out",)


def all_needs(spec: ChainSpec, name: str) -> list[str]:
    """A stage's needs: `needs`, the stages it refers to, and a study's stages; in order, each once."""
    stage = spec.stages[name]
    found = [*stage.needs, *(ref for ref, _ in references(_fields(stage)))]
    if isinstance(stage, JobStage):  # the chain's `set` is part of every job stage
        found += [ref for ref, _ in references(spec.set) if ref != name]
    if isinstance(stage, StudyStep):
        compared = stage.stages or [n for n, s in spec.stages.items() if isinstance(s, JobStage)]
        evaluated = [n for n, s in spec.stages.items() if isinstance(s, EvaluateStep)
                     and any(ref in compared for ref, _ in references(s.run))]
        found += [*compared, *evaluated]
    return list(dict.fromkeys(found))


def check_graph(spec: ChainSpec, source: str) -> None:
    """Unknown stages in needs and references, references to outputs a stage does not make, and cycles."""
    problems: list[tuple[str, str]] = []
    known = list(spec.stages)
    for name, stage in spec.stages.items():
        for other in stage.needs:
            if other not in spec.stages:
                problems.append((f"stages.{name}.needs", f"unknown stage {other!r}; stages: {', '.join(known)}"))
        if isinstance(stage, StudyStep):
            for other in stage.stages:
                if not isinstance(spec.stages.get(other), JobStage):
                    problems.append((f"stages.{name}.stages", f"{other!r} is not a job stage of this chain"))
        for field, value in _fields(stage).items():
            for other, output in references(value):
                where = f"stages.{name}.{field}"
                if other not in spec.stages:
                    problems.append((where, f"${{stages.{other}.{output}}}: unknown stage {other!r}; "
                                            f"stages: {', '.join(known)}"))
                elif output not in output_names(spec.stages[other]):
                    problems.append((where, f"${{stages.{other}.{output}}}: stage {other!r} makes "
                                            f"{', '.join(output_names(spec.stages[other]))}, not {output!r}"))
                elif other == name:
                    problems.append((where, "a stage cannot use its own output"))
    for other, output in references(spec.set):
        if other not in spec.stages or output not in output_names(spec.stages[other]):
            problems.append(("set", f"${{stages.{other}.{output}}}: no stage {other!r} making {output!r}; "
                                    f"stages: {', '.join(known)}"))
    if problems:
        raise ChainError(source, problems)
    cycle = find_cycle(spec)
    if cycle:
        raise ChainError(source, [(f"stages.{cycle[0]}.needs", f"cycle in needs: {' -> '.join(cycle)}")])


def find_cycle(spec: ChainSpec) -> list[str] | None:
    """A cycle of needs as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for other in all_needs(spec, name):
            if state.get(other) == 1:
                return [*path[path.index(other):], other] if other in path else [name, other]
            if other in spec.stages and not state.get(other) and (found := visit(other, [*path, other])):
                return found
        state[name] = 2
        return None

    for name in spec.stages:
        if not state.get(name) and (found := visit(name, [name])):
            return found
    return None


def resolve(value: Any, outputs: dict[str, dict[str, str]]) -> Any:
    """A value with every `${stages.<name>.<output>}` replaced by that output's path."""
    if isinstance(value, str):
        return REFERENCE.sub(lambda m: outputs[m.group(1)][m.group(2)], value)
    if isinstance(value, dict):
        return {resolve(k, outputs): resolve(v, outputs) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, outputs) for v in value]
    return value


def resolved_stage(stage: _Stage, outputs: dict[str, dict[str, str]]) -> _Stage:
    """The stage with its references resolved (validated again: the values keep their types)."""
    return type(stage).model_validate(resolve(stage.model_dump(), outputs))
