"""`hepml tune`: hyper-parameter searches with Ray Tune, each trial a normal `hepml train` run.

    hepml tune jobs/part-quickstart.yaml --space space.yaml --trials 16 [--metric val_loss --mode min]

space.yaml maps spec fields (any, by their dotted path) to a distribution:

    optim.lr: loguniform(1e-4, 3e-3)
    optim.weight_decay: uniform(0.0, 0.1)
    model.num_layers: choice([4, 6, 8])
    data.batch_size: randint(256, 1025)        # upper bound excluded, as in Ray Tune
    model.embed_dims: choice([[64, 64], [128, 128]])

How it runs (Ray Train V2 with Tune): each trial is a Tune trainable (`TrialRun`) that builds the trial's spec from
the job with the sampled values applied through the same machinery as `--set`, and launches an ordinary
TorchTrainer (`hepml_dist.train.launch`) for it: its own run directory (<tune dir>/trials/<job name>-<trial>),
checkpoints, metrics.jsonl and tracker entry. The workers' validation reports reach Tune through a Ray queue, so
ASHA can stop poor trials at the validation points (time axis: the optimizer step). A stopped trial checkpoints
and closes its tracker before its actor goes away.
The trainable itself reserves almost nothing (0.01 CPU): the workers' CPUs/GPUs are reserved by the inner
TorchTrainer, never at the Tune level, where Tune would hold them and the inner workers would wait forever.
Instead the number of concurrent trials is capped at what the cluster's CPUs and GPUs can run at once.
The best trial (by its last reported value of the metric) is written out as a complete job YAML.
"""

from __future__ import annotations

import ast
import json
import os
import queue
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import ray
import yaml
from ray import tune
from ray.train.v2.api.callback import UserCallback
from ray.tune.result import RESULT_DUPLICATE
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.util.queue import Empty, Queue

from hepml_dist import files, runs
from hepml_dist.errors import UserError
from hepml_dist.evaluate.plots import search_figure
from hepml_dist.spec import SpecError, dump_spec, load_job, parse_spec
from hepml_dist.spec.loader import apply_overrides
from hepml_dist.track.tracker import read_metrics
from hepml_dist.train.environment import choose_launcher
from hepml_dist.train.launch import launch, resolve_steps_per_epoch
from hepml_dist.train.ray_workers import start_ray
from hepml_dist.train.session import clear_stop, request_stop

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")
TRAINABLE_CPU = 0.01  # the trial driver only waits on its TorchTrainer
STOP_WAIT_S = 300  # how long a stopped trial waits for its run to checkpoint and exit (Tune force-kills at 600 s)


def parse_distribution(field: str, text: Any) -> tuple[str, list[Any]] | Any:
    """`loguniform(1e-4, 3e-3)` -> ("loguniform", [1e-4, 3e-3]); anything else is a fixed value."""
    if not isinstance(text, str) or "(" not in text:
        return ("fixed", [text])
    where = f"search space: {field}: {text}"
    try:
        node = ast.parse(text.strip(), mode="eval").body
    except SyntaxError:
        raise UserError(f"{where}: not an expression; write e.g. loguniform(1e-4, 3e-3) or choice([1, 2])") from None
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in DISTRIBUTIONS
            and not node.keywords):
        raise UserError(f"{where}: use one of {', '.join(f'{d}(...)' for d in DISTRIBUTIONS)}")
    try:
        args = [ast.literal_eval(a) for a in node.args]
    except ValueError:
        raise UserError(f"{where}: arguments must be plain numbers or lists") from None
    name = node.func.id
    if name == "choice":
        if len(args) != 1 or not isinstance(args[0], list) or not args[0]:
            raise UserError(f"{where}: choice takes one non-empty list, e.g. choice([1, 2])")
        return (name, args)
    if len(args) != 2 or not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args):
        raise UserError(f"{where}: {name} takes two numbers (low, high)")
    low, high = args
    if not low < high:
        raise UserError(f"{where}: the lower bound must be below the upper bound")
    if name == "loguniform" and low <= 0:
        raise UserError(f"{where}: loguniform needs positive bounds")
    if name == "randint" and not (isinstance(low, int) and isinstance(high, int)):
        raise UserError(f"{where}: randint takes integers (upper bound excluded)")
    return (name, args)


def load_space(path: Path) -> dict[str, tuple[str, list[Any]]]:
    if not Path(path).is_file():
        raise UserError(f"--space {path}: no such file")
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as err:
        raise UserError(f"--space {path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"--space {path}: expected a mapping of spec fields to distributions, "
                        "e.g. `optim.lr: loguniform(1e-4, 3e-3)`")
    return {str(field): parse_distribution(str(field), text) for field, text in raw.items()}


def representative(dist: tuple[str, list[Any]]) -> list[Any]:
    """Values that every sample resembles (bounds, every choice), to validate the space before any trial."""
    name, args = dist
    if name == "choice":
        return list(args[0])
    if name == "fixed":
        return list(args)
    if name == "randint":
        return [args[0], args[1] - 1]
    return list(args)


def to_tune(dist: tuple[str, list[Any]]):
    name, args = dist
    if name == "fixed":
        return args[0]
    if name == "choice":
        return tune.choice(args[0])
    return getattr(tune, name)(*args)


def override(field: str, value: Any) -> str:
    """A `--set` line for a sampled value (JSON is YAML, so lists and floats survive exactly)."""
    return f"{field}={json.dumps(value)}"


def trial_spec(base: dict[str, Any], config: dict[str, Any], name: str, source: str):
    sets = [override(k, v) for k, v in config.items()] + [override("name", name)]
    return parse_spec(apply_overrides(base, sets, source=source), source=source)


def check_space(base: dict[str, Any], space: dict[str, tuple[str, list[Any]]], source: str) -> None:
    """Every field exists and every representative value gives a valid spec (clear errors before Ray starts)."""
    for field, dist in space.items():
        for value in representative(dist):
            try:
                trial_spec(base, {field: value}, "space-check", source)
            except SpecError as err:
                problems = "; ".join(f"{p.path}: {p.message}" for p in err.problems)
                raise UserError(f"search space: {field} = {value!r} gives an invalid job ({problems})") from None


def total_steps(spec) -> int | None:
    t = spec.training
    if t.steps:
        return t.steps
    if t.epochs and spec.data.steps_per_epoch:
        return t.epochs * spec.data.steps_per_epoch // t.grad_accum
    return None


def max_concurrent(spec, trials: int) -> int:
    """Trials that fit at once: each needs num_workers x (cpus, gpus) per worker, reserved by its TorchTrainer."""
    p = spec.parallel
    resources = ray.cluster_resources()
    fits = int((resources.get("CPU", 0) - trials * TRAINABLE_CPU) // max(p.num_workers * p.cpus_per_worker, 1e-9))
    if p.gpus_per_worker > 0:
        fits = min(fits, int(resources.get("GPU", 0) // (p.num_workers * p.gpus_per_worker)))
    if fits < 1:
        raise UserError(f"one trial needs {p.num_workers} worker(s) x {p.cpus_per_worker} CPU"
                        + (f" + {p.gpus_per_worker} GPU" if p.gpus_per_worker else "")
                        + f", more than the Ray cluster has ({resources}); lower parallel.num_workers")
    return max(1, min(trials, fits))


def run_tune(job: Path, space_file: Path, *, trials: int, metric: str = "val_loss", mode: str = "min",
             overrides: Sequence[str] = (), concurrent: int | None = None, scheduler: str = "asha",
             out: Path | None = None, tune_dir: Path | None = None, seed: int = 0,
             address: str | None = None) -> dict[str, Any]:
    """Run the search; returns {"trials": [...], "best": {...}, "best_job": path}."""
    base_spec = runs.absolute_paths(load_job(job, list(overrides)))  # trials run in other working directories
    base = base_spec.model_dump(mode="json")
    space = load_space(space_file)
    check_space(base, space, str(job))
    if base_spec.data.val is None:
        raise UserError(f"{job}: data.val is not set; a search needs a validation metric ({metric}) per trial")
    if base_spec.cluster.launcher == "processes":
        raise UserError(f"{job}: cluster.launcher is {base_spec.cluster.launcher}; hepml tune runs its trials on Ray "
                        "Train (their scheduling and early stopping are Ray's): --set cluster.launcher=ray")
    tune_dir = Path(tune_dir or runs.default_run_dir(base_spec).with_name(f"{base_spec.name}-tune")).resolve()
    tune_dir.mkdir(parents=True, exist_ok=True)
    out = Path(out or tune_dir / "best.yaml")

    started = start_ray(base_spec, choose_launcher(base_spec, address, tune=True).address)  # or $RAY_ADDRESS
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"  # reports at checkpoint-only steps carry no metric
    source, name = str(job), base_spec.name
    trials_dir = tune_dir / "trials"

    try:
        limit = concurrent or max_concurrent(base_spec, trials)
        steps = total_steps(resolve_steps_per_epoch(runs.absolute_paths(base_spec)))
        if scheduler == "asha":
            grace = min(base_spec.training.eval_interval, steps or base_spec.training.eval_interval)
            schedule = ASHAScheduler(time_attr="step", max_t=steps or 10**9, grace_period=grace, reduction_factor=2)
        else:
            schedule = FIFOScheduler()
        trainable = tune.with_parameters(TrialRun, base=base, source=source, name=name,
                                         trials_dir=trials_dir)
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"CPU": TRAINABLE_CPU}),
            param_space={field: to_tune(dist) for field, dist in space.items()},
            tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=trials, scheduler=schedule,
                                        search_alg=BasicVariantGenerator(random_state=seed, max_concurrent=limit)),
            # the runs write their own checkpoints; Tune has nothing to save for a trial
            run_config=tune.RunConfig(name="tune", storage_path=str(tune_dir), verbose=0,
                                      checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False)),
        )
        grid = tuner.fit()
    finally:
        if started:
            ray.shutdown()

    rows = summarise(grid, metric, name, trials_dir)
    ranked = [r for r in rows if isinstance(r["value"], float)]
    if not ranked:
        errors = "; ".join(f"{r['name']}: {r['error']}" for r in rows if r.get("error"))
        raise UserError(f"no trial reported {metric} ({errors or 'see ' + str(tune_dir)}); check the job trains "
                        "and validates (`hepml train`), and that --metric names a validation metric")
    best = (min if mode == "min" else max)(ranked, key=lambda r: r["value"])
    best_spec = trial_spec(base, best["config"], f"{name}-tuned", source)
    header = (f"# best of {len(rows)} trials of `hepml tune {job}` by {metric} ({mode}): {best['value']:.6g}\n"
              f"# trial {best['name']}, run dir {best['run_dir']}\n"
              + "".join(f"# {line}\n" for line in (override(k, v) for k, v in best["config"].items())))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    files.write_text(Path(out), header + dump_spec(best_spec))
    files.write_json(tune_dir / "trials.json", {"metric": metric, "mode": mode, "best": best["name"], "trials": rows},
                     default=str)
    plot = plot_search(rows, metric, mode, {f for f, (kind, _) in space.items() if kind == "loguniform"}, tune_dir)
    return {"trials": rows, "best": best, "best_job": str(out), "tune_dir": str(tune_dir), "plot": str(plot)}


def plot_search(rows: list[dict[str, Any]], metric: str, mode: str, log_fields: set[str], tune_dir: Path) -> Path:
    """search.png: every trial's validation curve (from its metrics.jsonl) and the metric against each field."""
    curves = {}
    for row in rows:
        records = read_metrics(row["run_dir"]) if Path(row["run_dir"]).is_dir() else []
        curves[row["name"]] = [(r["step"], r[metric]) for r in records if isinstance(r.get(metric), (int, float))]
    figure = search_figure(rows, curves, metric, mode, log_fields)
    path = tune_dir / "search.png"
    with files.replacing(path) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
    return path


class ReportsToQueue(UserCallback):
    """Runs in the Ray Train controller: forwards rank 0's reports to the trial through a Ray queue."""

    def __init__(self, reports: Queue):
        self.reports = reports

    def after_report(self, run_context, metrics, checkpoint):
        self.reports.put(dict(metrics[0]))

class TrialRun(tune.Trainable):
    """One trial: an ordinary training run (own run dir, checkpoints, metrics.jsonl, Comet entry) in a thread;
    each validation report of its workers is one Tune result.

    Tune ends a trial it stops (ASHA's cut, or max_t reached) by terminating this actor, which takes the
    run's Ray Train controller and workers with it. Left to that, a stopped trial lost whatever it was
    writing: its last checkpoint or its Comet archive (found empty in the tests). cleanup() therefore
    asks the run to checkpoint and exit (the STOP file that SIGTERM also uses) and waits for it.
    """

    def setup(self, config, base, source, name, trials_dir):
        spec = trial_spec(base, config, f"{name}-{self.trial_id}", source)
        self.run_dir = Path(trials_dir) / spec.name
        self.reports = Queue(actor_options={"num_cpus": 0})
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._train, args=(spec,), name="hepml-trial", daemon=True)
        self.thread.start()

    def _train(self, spec) -> None:
        try:
            launch(spec, run_dir=self.run_dir, progress=False, callbacks=[ReportsToQueue(self.reports)])
        except BaseException as err:  # noqa: BLE001 - raised in step(), in Tune's thread
            self.error = err

    def step(self) -> dict[str, Any]:
        while True:
            finished = not self.thread.is_alive()  # read before the queue: a finished run has put everything
            try:
                return self.reports.get(timeout=0.5)
            except (Empty, queue.Empty):
                if not finished:
                    continue
            if self.error is not None:
                raise self.error
            return {RESULT_DUPLICATE: True}  # the run finished: Tune keeps its last report as the result

    def cleanup(self) -> None:
        if self.thread.is_alive():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            request_stop(self.run_dir)
            self.thread.join(timeout=STOP_WAIT_S)
        clear_stop(self.run_dir)
        try:
            self.reports.shutdown()
        except ray.exceptions.RayError:
            pass


def summarise(grid, metric: str, name: str, trials_dir: Path) -> list[dict[str, Any]]:
    """One row per trial: its sampled config, its last reported value of the metric, its run directory."""
    rows = []
    for result in grid:
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
        value = (result.metrics or {}).get(metric)
        rows.append({
            "name": f"{name}-{trial_id}",
            "config": dict(result.config),
            "overrides": " ".join(override(k, v) for k, v in result.config.items()),
            "value": float(value) if isinstance(value, (int, float)) else None,
            "step": (result.metrics or {}).get("step"),
            "error": str(result.error).strip().splitlines()[-1] if result.error else None,
            "run_dir": str(trials_dir / f"{name}-{trial_id}"),
        })
    return rows
