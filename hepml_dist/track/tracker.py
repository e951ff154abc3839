"""Trackers: where rank 0 sends parameters, metrics and figures, and `hepml evaluate` / `hepml report` their results.

`LocalTracker` writes RUN_DIR/metrics.jsonl and plots/ (always), `TensorBoardTracker` RUN_DIR/tensorboard/
(tracking.tensorboard, on by default), `CometTracker` writes to Comet: online when COMET_API_KEY is set in the
environment, otherwise an offline archive under RUN_DIR/comet/. The experiment key is kept in
RUN_DIR/comet/experiment.json, so a resumed run and the evaluation of a run continue the same experiment (online:
`ExistingExperiment`; offline: an extra archive that `comet upload` appends to it). `RunningMark` keeps
RUN_DIR/running.json while training logs (`hepml runs` tells running from interrupted runs by it).
Comet's environment probes (cloud metadata, host IP, git patch, code upload) are switched off, so an offline run
sends nothing anywhere. The API key is read by comet_ml from the environment; this module never passes, logs or
writes it.
"""

import io
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Protocol

import ray
import torch

from hepml_dist import files
from hepml_dist.errors import UserError
from hepml_dist.extras import install_hint, is_installed, require
from hepml_dist.spec import JobSpec
from hepml_dist.track.records import EVALUATION_KEY, METRICS_FILE, RUNNING_FILE
from hepml_dist.track.records import read_metrics  # noqa: F401 - long read from here; it lives where torch is not needed
from hepml_dist.track.images import FigureAsImage
from hepml_dist.track.tensorboard import TensorBoardTracker

COMET_DIR = "comet"
COMET_KEY_FILE = "experiment.json"  # the experiment key (not a secret), to continue the experiment on resume

# Comet switches that keep it from probing the machine and the network (cloud metadata, host IP, git): an offline
# run sends nothing beyond loopback.
COMET_QUIET_ENV = {
    "COMET_AUTO_LOG_ENV_DETAILS": "false",
    "COMET_AUTO_LOG_ENV_HOST": "false",
    "COMET_AUTO_LOG_GIT_METADATA": "false",
    "COMET_AUTO_LOG_GIT_PATCH": "false",
    "COMET_ERROR_TRACKING_ENABLE": "false",
    "COMET_DISABLE_AUTO_LOGGING": "1",
}
COMET_QUIET_ARGS: dict[str, Any] = dict(
    log_code=False,
    log_graph=False,
    auto_param_logging=False,
    auto_metric_logging=False,
    parse_args=False,
    auto_output_logging=None,
    log_env_details=False,
    log_git_metadata=False,
    log_git_patch=False,
    log_env_gpu=False,
    log_env_host=False,
    log_env_cpu=False,
    display_summary_level=0,
)


class Tracker(Protocol):
    """What the training loop, `hepml evaluate` and `hepml report` log to. A figure (matplotlib) is drawn once and
    stored as a PNG image by each tracker (images.py); `log_image` takes an image drawn already."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int | None = None) -> None: ...

    def log_figure(self, name: str, figure: Any, step: int | None = None) -> None: ...

    def log_image(self, name: str, png: bytes, step: int | None = None) -> None: ...

    def close(self) -> None: ...


class NullTracker:
    """Ranks other than 0 log nothing."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int | None = None) -> None:
        pass

    def log_figure(self, name: str, figure: Any, step: int | None = None) -> None:
        pass

    def log_image(self, name: str, png: bytes, step: int | None = None) -> None:
        pass

    def close(self) -> None:
        pass


class LocalTracker(FigureAsImage):
    """RUN_DIR/metrics.jsonl (one JSON object per log call, plus `fields` in each), params.json and plots/*.png."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None, fields: dict[str, Any] | None = None):
        self.run_dir = Path(run_dir)
        self.fields = fields or {}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / METRICS_FILE
        if resume_step is not None and path.is_file():
            # Steps after the checkpoint we resume from will be trained again: drop their old records.
            kept = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= resume_step]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, path)
        self._file = path.open("a", buffering=1)

    def log_params(self, params: dict[str, Any]) -> None:
        path = self.run_dir / "params.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(params, indent=1, default=str))
        os.replace(tmp, path)

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int | None = None) -> None:
        record = {"step": step, "epoch": epoch, "time": round(time.time(), 3), **self.fields, **metrics}
        self._file.write(json.dumps(record, default=float) + "\n")

    def log_image(self, name: str, png: bytes, step: int | None = None) -> None:
        path = self.run_dir / "plots" / f"{name}.png"  # a name `report/roc` goes to plots/report/roc.png
        path.parent.mkdir(parents=True, exist_ok=True)
        with files.replacing(path) as tmp:
            tmp.write_bytes(png)

    def close(self) -> None:
        self._file.close()


class RunningMark(NullTracker):
    """RUN_DIR/running.json while a training process logs to the run: written at the start, touched at every log
    call, removed at close (a killed process leaves it, with its pid and an old mtime: see records.py)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / RUNNING_FILE
        files.write_json(self.path, {"host": platform.node(), "pid": os.getpid(), "since": round(time.time(), 3)})

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int | None = None) -> None:
        self.path.touch()

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


class CometTracker(FigureAsImage):
    """One Comet experiment per run; on resume the online experiment is continued through its saved key."""

    def __init__(self, experiment: Any, online: bool):
        self.experiment, self.online = experiment, online

    @classmethod
    def create(cls, spec: JobSpec, run_dir: str | Path) -> "CometTracker":
        for key, value in COMET_QUIET_ENV.items():
            os.environ.setdefault(key, value)
        comet_ml = require("comet_ml")  # the `comet` extra; ~1 s to import, and disabled tracking never needs it
        folder = Path(run_dir) / COMET_DIR
        folder.mkdir(parents=True, exist_ok=True)
        key_file = folder / COMET_KEY_FILE
        previous = json.loads(key_file.read_text())["key"] if key_file.is_file() else None
        names = dict(project_name=spec.tracking.project, workspace=spec.tracking.workspace)
        online = spec.tracking.mode == "online" and bool(os.environ.get("COMET_API_KEY"))
        experiment = None
        if online:
            try:
                if previous:
                    experiment = comet_ml.ExistingExperiment(previous_experiment=previous, **names, **COMET_QUIET_ARGS)
                else:
                    experiment = comet_ml.Experiment(**names, **COMET_QUIET_ARGS)
            except Exception as err:  # no network or a bad key: keep the run going with an archive
                print(f"[hepml] Comet online failed ({type(err).__name__}: {err}); writing an offline archive instead")
                online, experiment = False, None
        if experiment is None:
            offline = dict(offline_directory=str(folder), **names, **COMET_QUIET_ARGS)
            # An experiment that exists (online, or in an earlier archive) is continued: `comet upload` of this
            # archive, after the first one, appends to it.
            experiment = (comet_ml.ExistingOfflineExperiment(previous_experiment=previous, **offline) if previous
                          else comet_ml.OfflineExperiment(**offline))
        if not previous:
            files.write_json(key_file, {"key": experiment.get_key(), "online": online})
        experiment.set_name(spec.name)
        if spec.tracking.tags:
            experiment.add_tags(list(spec.tracking.tags))
        return cls(experiment, online)

    def log_params(self, params: dict[str, Any]) -> None:
        self.experiment.log_parameters(params)

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int | None = None) -> None:
        self.experiment.log_metrics(metrics, step=step, epoch=epoch)

    def log_image(self, name: str, png: bytes, step: int | None = None) -> None:
        self.experiment.log_image(io.BytesIO(png), name=name, step=step)  # Comet's Graphics tab

    def close(self) -> None:
        self.experiment.end()


class MultiTracker(FigureAsImage):
    """Fans every call out to several trackers."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log_params(self, params: dict[str, Any]) -> None:
        for t in self.trackers:
            t.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int | None = None) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step, epoch)

    def log_image(self, name: str, png: bytes, step: int | None = None) -> None:
        for t in self.trackers:
            t.log_image(name, png, step)

    def close(self) -> None:
        for t in self.trackers:
            t.close()


def git_commit(path: Path | None = None) -> str | None:
    """Commit of the hepml_dist source tree (HEPML_GIT_COMMIT wins, e.g. baked into a container)."""
    if os.environ.get("HEPML_GIT_COMMIT"):
        return os.environ["HEPML_GIT_COMMIT"]
    where = path or Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(where), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "-C", str(where), "status", "--porcelain", "-uno"], capture_output=True, text=True, timeout=5)
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def container_image(spec: JobSpec) -> str | None:
    for var in ("APPTAINER_CONTAINER", "SINGULARITY_CONTAINER", "HEPML_CONTAINER_IMAGE"):
        if os.environ.get(var):
            return os.environ[var]
    return spec.cluster.slurm.container_image


def run_info(spec: JobSpec) -> dict[str, Any]:
    """Provenance logged with every run: code version, container, library versions, host."""
    return {
        "git_commit": git_commit(),
        "container_image": container_image(spec),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "python": platform.python_version(),
        "driver_host": platform.node(),
    }


def make_tracker(
    spec: JobSpec,
    run_dir: str | Path,
    rank: int,
    *,
    resume_step: int | None = None,
    info: dict[str, Any] | None = None,
) -> Tracker:
    """The tracker of a training process: nothing on ranks > 0; on rank 0 metrics.jsonl, the running mark,
    TensorBoard (unless tracking.tensorboard is off) and Comet (unless disabled). Logs the resolved spec and `info`
    (git commit, container image, ...) as parameters."""
    if rank != 0:
        return NullTracker()
    trackers: list[Tracker] = [LocalTracker(run_dir, resume_step), RunningMark(run_dir)]
    tracker = MultiTracker(trackers + dashboards(spec, run_dir, resume_step))
    tracker.log_params({"spec": spec.model_dump(mode="json"), **(info or {})})
    return tracker


def make_results_tracker(spec: JobSpec, run_dir: str | Path, split: str) -> Tracker:
    """What `hepml evaluate` and `hepml report` log a run's results to: records in its metrics.jsonl marked with
    the evaluated split, figures in its plots/, its TensorBoard folder and its Comet experiment (continued)."""
    local = LocalTracker(run_dir, fields={EVALUATION_KEY: split})
    return MultiTracker([local, *dashboards(spec, run_dir)])


def dashboards(spec: JobSpec, run_dir: str | Path, resume_step: int | None = None) -> list[Tracker]:
    """TensorBoard and Comet, as the job's tracking section asks."""
    found: list[Tracker] = []
    if spec.tracking.tensorboard:
        watched = ("val_loss", *([spec.checkpoint.keep_best_by] if spec.checkpoint.keep_best_by else []))
        found.append(TensorBoardTracker(run_dir, resume_step, hparam_metrics=tuple(dict.fromkeys(watched))))
    if spec.tracking.mode != "disabled" and comet_wanted(spec):
        found.append(CometTracker.create(spec, run_dir))
    return found


def comet_wanted(spec: JobSpec) -> bool:
    """Whether to track to Comet: yes when comet_ml is installed. Without it (the `comet` extra) a job that only
    inherits the default mode tracks locally and says so; one that can upload (online, COMET_API_KEY set) stops."""
    if is_installed("comet_ml"):
        return True
    if spec.tracking.mode == "online" and os.environ.get("COMET_API_KEY"):
        raise UserError(f"tracking.mode online with COMET_API_KEY set: {install_hint('comet_ml')}; or "
                        "--set tracking.mode=disabled")
    print("[hepml] Comet is not installed (pip install 'hepml-dist[comet]'): tracking to metrics.jsonl and "
          "TensorBoard only", flush=True)
    return False
