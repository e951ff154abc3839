"""Cross-field rules of the job spec: the checks that need more than one field, phrased for physicists.

Each rule looks at a validated JobSpec and yields (field path, message) for every problem it finds. The rules of
one model family are methods of that family's model spec (`attention_widths`, `check`), called from here.
"""

import re
from collections.abc import Callable, Iterator

from hepml_dist.spec.base import Finding
from hepml_dist.spec.data import FEATURE_SETS
from hepml_dist.spec.job import JobSpec
from hepml_dist.spec.parallel import ACCELERATORS
from hepml_dist.spec.tasks import LOSSES_FOR_KIND, PARTICLE_WEIGHT_TARGETS, TaskSpec

Rule = Callable[[JobSpec], Iterator[Finding]]
RULES: list[Rule] = []


def rule(fn: Rule) -> Rule:
    RULES.append(fn)
    return fn


def check_rules(spec: JobSpec) -> list[Finding]:
    return [finding for check in RULES for finding in check(spec)]


@rule
def run_length(spec: JobSpec) -> Iterator[Finding]:
    t = spec.training
    if (t.epochs is None) == (t.steps is None):
        yield "training.epochs", "set exactly one of training.epochs and training.steps"
    for i, phase in enumerate(t.phases):
        if t.epochs is not None and phase.start_epoch > t.epochs:
            yield f"training.phases[{i}].start_epoch", f"phase starts at epoch {phase.start_epoch} but the run has only {t.epochs} epochs"
        if t.epochs is None:
            yield f"training.phases[{i}]", "phases are defined in epochs; set training.epochs"


@rule
def pcgrad_needs_unsharded_gradients(spec: JobSpec) -> Iterator[Finding]:
    if spec.training.multitask != "pcgrad":
        return
    if len(spec.tasks) < 2:
        yield "training.multitask", "PCGrad resolves conflicts between task gradients and needs at least two tasks"
    if spec.parallel.strategy == "deepspeed" and spec.parallel.zero_stage > 1:
        yield (
            "training.multitask",
            f"PCGrad needs every rank to see whole per-task gradients, but ZeRO stage {spec.parallel.zero_stage} "
            "shards them; use parallel.zero_stage <= 1 or multitask: sum",
        )


@rule
def pcgrad_protects_real_tasks(spec: JobSpec) -> Iterator[Finding]:
    names = {t.name for t in spec.tasks}
    for i, name in enumerate(spec.training.pcgrad.protect):
        if name not in names:
            yield f"training.pcgrad.protect[{i}]", f"no task named {name!r} (tasks: {', '.join(sorted(names))})"


@rule
def one_accelerator_vendor(spec: JobSpec) -> Iterator[Finding]:
    vendors = {ACCELERATORS[a].vendor for a in spec.parallel.accelerators}
    if len(vendors) > 1:
        yield (
            "parallel.accelerator",
            f"one job cannot mix {' and '.join(sorted(spec.parallel.accelerators))}: NCCL (NVIDIA) and RCCL (AMD) "
            "cannot share one process group; submit two jobs, one per vendor",
        )
    on_cpu = vendors == {"cpu"}
    if on_cpu and spec.parallel.gpus_per_worker > 0:
        yield "parallel.gpus_per_worker", "GPUs requested but parallel.accelerator is cpu; name the GPU type (A100, MI250X, ...)"
    if not on_cpu and spec.parallel.gpus_per_worker == 0:
        yield "parallel.gpus_per_worker", f"accelerator {spec.parallel.accelerator} needs gpus_per_worker > 0 (usually 1)"


DEEPSPEED_OPTIMIZERS = ("adamw", "adam")


@rule
def deepspeed_settings(spec: JobSpec) -> Iterator[Finding]:
    p = spec.parallel
    if p.strategy == "deepspeed":
        if spec.training.multitask == "pcgrad" and p.zero_stage <= 1:
            yield "training.multitask", "PCGrad runs with parallel.strategy: ddp (DeepSpeed reduces gradients itself)"
        if spec.training.phases:
            yield "training.phases", "phased training runs with parallel.strategy: ddp"
        if spec.optim.name not in DEEPSPEED_OPTIMIZERS:
            yield "optim.name", f"with DeepSpeed use one of {', '.join(DEEPSPEED_OPTIMIZERS)} (got {spec.optim.name!r})"
        if spec.training.precision == "fp16-mixed" and p.accelerators == ["cpu"]:
            # DeepSpeed's CPU accelerator refuses it at initialize ("Type fp16 is not supported on your device").
            yield ("training.precision", "DeepSpeed has no fp16 on CPU; use bf16-mixed (or fp32) with DeepSpeed on "
                   "CPU, or parallel.strategy: ddp for fp16 with a GradScaler")
    if p.strategy != "deepspeed":
        if p.zero_stage:
            yield "parallel.zero_stage", "ZeRO stages need parallel.strategy: deepspeed"
        if p.offload != "none":
            yield "parallel.offload", "optimizer offload needs parallel.strategy: deepspeed"
    elif p.offload != "none" and p.zero_stage == 0:
        yield "parallel.offload", "optimizer offload needs ZeRO stage >= 1"


@rule
def embed_dims_divisible_by_heads(spec: JobSpec) -> Iterator[Finding]:
    for dim_path, dim, heads_path, heads in spec.model.attention_widths():
        if dim % heads:
            yield dim_path, f"model width {dim} is not divisible by {heads} attention heads ({heads_path})"


@rule
def tasks_consistent(spec: JobSpec) -> Iterator[Finding]:
    seen: set[str] = set()
    for i, task in enumerate(spec.tasks):
        where = f"tasks[{i}]"
        if task.name in seen:
            yield f"{where}.name", f"task name {task.name!r} is used twice"
        seen.add(task.name)
        if task.loss not in LOSSES_FOR_KIND[task.kind]:
            yield f"{where}.loss", f"loss {task.loss!r} does not fit a {task.kind} task; use one of {', '.join(LOSSES_FOR_KIND[task.kind])}"
        if task.regress_from == "particle_weights":
            yield from _particle_weights_fit(spec, task, where)
        if task.kind == "regression":
            if not task.targets:
                yield f"{where}.targets", "a regression task needs the list of its target names"
            if task.classes or task.num_classes:
                yield f"{where}.classes", "a regression task has targets, not classes"
            if task.target_weights is not None and len(task.target_weights) != len(task.targets or []):
                yield f"{where}.target_weights", f"{len(task.target_weights)} weights for {len(task.targets or [])} targets"
            continue
        if task.targets:
            yield f"{where}.targets", f"a {task.kind} task has classes, not regression targets"
        if task.classes is not None and len(set(task.classes)) != len(task.classes):
            yield f"{where}.classes", "class names must be unique"
        if task.classes is not None and task.num_classes is not None and len(task.classes) != task.num_classes:
            yield f"{where}.num_classes", f"num_classes is {task.num_classes} but {len(task.classes)} class names are listed"
        if task.kind == "binary":
            n = len(task.classes) if task.classes is not None else task.num_classes
            if n not in (None, 2):
                yield f"{where}.classes", f"a binary task has exactly 2 classes, got {n}; use kind: multiclass"
        elif task.classes is None and task.num_classes is None:
            yield f"{where}.classes", "a multiclass task needs `classes` (names) or `num_classes`"
        elif (task.num_classes or len(task.classes or [])) < 2:
            yield f"{where}.classes", "a multiclass task needs at least 2 classes"
    for i, task in enumerate(spec.tasks):
        if task.only_where and task.only_where == task.label_key:
            yield f"tasks[{i}].only_where", "a task cannot be restricted by its own label"


def _particle_weights_fit(spec: JobSpec, task: TaskSpec, where: str) -> Iterator[Finding]:
    if task.kind != "regression":
        yield f"{where}.regress_from", f"particle_weights is a way of regressing; this is a {task.kind} task"
    elif spec.model.family != "part":
        yield f"{where}.regress_from", "particle_weights needs a Particle Transformer (model.family: part)"
    unknown = [t for t in task.targets or [] if t not in PARTICLE_WEIGHT_TARGETS]
    if task.kind == "regression" and unknown:
        yield (f"{where}.targets", f"particle_weights cannot compute {', '.join(unknown)} from a sum of four-vectors; "
               f"it knows {', '.join(PARTICLE_WEIGHT_TARGETS)} (or use regress_from: class_token)")


@rule
def inputs_known(spec: JobSpec) -> Iterator[Finding]:
    name = spec.data.inputs.features
    if name not in FEATURE_SETS:
        yield "data.inputs.features", f"unknown feature set {name!r}; known: {', '.join(sorted(FEATURE_SETS))}"
    rw = spec.data.reweight
    if rw is not None:
        for var in rw.variables:
            if var not in rw.bins:
                yield "data.reweight.bins", f"no bin edges for reweighting variable {var!r}"
        for var, edges in rw.bins.items():
            if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
                yield f"data.reweight.bins.{var}", "bin edges must be at least two strictly increasing numbers"


@rule
def fine_tuning(spec: JobSpec) -> Iterator[Finding]:
    t = spec.training
    if t.freeze and not t.init_from:
        yield "training.freeze", "frozen modules would keep their random initial weights; set training.init_from"
    if t.init_modules and not t.init_from:
        yield "training.init_modules", "init_modules selects what to load from training.init_from, which is not set"
    named_patterns = [
        *((f"training.freeze[{i}]", p) for i, p in enumerate(t.freeze)),
        *((f"training.init_modules[{i}]", p) for i, p in enumerate(t.init_modules)),
        *((f"optim.lr_multipliers[{p!r}]", p) for p in spec.optim.lr_multipliers),
        *((f"training.phases[{i}].trainable[{j}]", p) for i, ph in enumerate(t.phases) for j, p in enumerate(ph.trainable)),
    ]
    for path, pattern in named_patterns:
        try:
            re.compile(pattern)
        except re.error as err:
            yield path, f"not a valid regular expression ({err}): {pattern!r}"


@rule
def model_family(spec: JobSpec) -> Iterator[Finding]:
    yield from spec.model.check(spec.tasks)
