"""Trackers: where rank 0 sends parameters, metrics and figures.

`LocalTracker` writes RUN_DIR/metrics.jsonl (always), `CometTracker` writes to Comet: online when COMET_API_KEY is
set in the environment, otherwise an offline archive under RUN_DIR/comet/. Comet's environment probes (cloud
metadata, host IP, git patch, code upload) are switched off, so an offline run sends nothing anywhere. The API key is
read by comet_ml from the environment; this module never passes, logs or writes it.
"""

import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any, Protocol

import ray
import torch

from hepml_dist.spec import JobSpec

METRICS_FILE = "metrics.jsonl"
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
    """What the training loop and `hepml evaluate` log to."""

    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int | None = None) -> None: ...

    def log_figure(self, name: str, figure: Any, step: int | None = None) -> None: ...

    def close(self) -> None: ...


class NullTracker:
    """Ranks other than 0 log nothing."""

    def log_params(self, params: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int | None = None) -> None:
        pass

    def log_figure(self, name: str, figure: Any, step: int | None = None) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of RUN_DIR/metrics.jsonl (a torn last line from a crash is ignored)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class LocalTracker:
    """RUN_DIR/metrics.jsonl (one JSON object per log call), params.json and plots/*.png."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None):
        self.run_dir = Path(run_dir)
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
        record = {"step": step, "epoch": epoch, "time": round(time.time(), 3), **metrics}
        self._file.write(json.dumps(record, default=float) + "\n")

    def log_figure(self, name: str, figure: Any, step: int | None = None) -> None:
        plots = self.run_dir / "plots"
        plots.mkdir(exist_ok=True)
        figure.savefig(plots / f"{name}.png", dpi=120, bbox_inches="tight")

    def close(self) -> None:
        self._file.close()


class CometTracker:
    """One Comet experiment per run; on resume the online experiment is continued through its saved key."""

    def __init__(self, experiment: Any, online: bool):
        self.experiment, self.online = experiment, online

    @classmethod
    def create(cls, spec: JobSpec, run_dir: str | Path) -> "CometTracker":
        for key, value in COMET_QUIET_ENV.items():
            os.environ.setdefault(key, value)
        import comet_ml  # ~1 s to import, and runs with tracking.mode disabled never need it

        folder = Path(run_dir) / COMET_DIR
        folder.mkdir(parents=True, exist_ok=True)
        key_file = folder / COMET_KEY_FILE
        online = spec.tracking.mode == "online" and bool(os.environ.get("COMET_API_KEY"))
        experiment = None
        if online:
            try:
                previous = json.loads(key_file.read_text())["key"] if key_file.is_file() else None
                names = dict(project_name=spec.tracking.project, workspace=spec.tracking.workspace)
                if previous:
                    experiment = comet_ml.ExistingExperiment(previous_experiment=previous, **names, **COMET_QUIET_ARGS)
                else:
                    experiment = comet_ml.Experiment(**names, **COMET_QUIET_ARGS)
                key_file.write_text(json.dumps({"key": experiment.get_key(), "online": True}))
            except Exception as err:  # no network or a bad key: keep the run going with an archive
                print(f"[hepml] Comet online failed ({type(err).__name__}: {err}); writing an offline archive instead")
                online, experiment = False, None
        if experiment is None:
            experiment = comet_ml.OfflineExperiment(
                project_name=spec.tracking.project,
                workspace=spec.tracking.workspace,
                offline_directory=str(folder),
                **COMET_QUIET_ARGS,
            )
        experiment.set_name(spec.name)
        if spec.tracking.tags:
            experiment.add_tags(list(spec.tracking.tags))
        return cls(experiment, online)

    def log_params(self, params: dict[str, Any]) -> None:
        self.experiment.log_parameters(params)

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int | None = None) -> None:
        self.experiment.log_metrics(metrics, step=step, epoch=epoch)

    def log_figure(self, name: str, figure: Any, step: int | None = None) -> None:
        self.experiment.log_figure(figure_name=name, figure=figure, step=step)

    def close(self) -> None:
        self.experiment.end()


class MultiTracker:
    """Fans every call out to several trackers."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def log_params(self, params: dict[str, Any]) -> None:
        for t in self.trackers:
            t.log_params(params)

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int | None = None) -> None:
        for t in self.trackers:
            t.log_metrics(metrics, step, epoch)

    def log_figure(self, name: str, figure: Any, step: int | None = None) -> None:
        for t in self.trackers:
            t.log_figure(name, figure, step)

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
    """The tracker of this process: nothing on ranks > 0; metrics.jsonl plus Comet (unless disabled) on rank 0.
    Logs the resolved spec and `info` (git commit, container image, ...) as parameters."""
    if rank != 0:
        return NullTracker()
    trackers: list[Tracker] = [LocalTracker(run_dir, resume_step)]
    if spec.tracking.mode != "disabled":
        trackers.append(CometTracker.create(spec, run_dir))
    tracker = MultiTracker(trackers)
    tracker.log_params({"spec": spec.model_dump(mode="json"), **(info or {})})
    return tracker
