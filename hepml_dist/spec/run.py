"""Spec of the run's bookkeeping: checkpoints, experiment tracking and where the job runs."""

from typing import Literal

from pydantic import Field

from hepml_dist.spec.base import Section


class CheckpointSpec(Section):
    """When checkpoints are written and which are kept."""

    interval: int | None = Field(None, ge=1)
    """Optimizer steps between checkpoints; None checkpoints at every evaluation."""
    keep_last: int = Field(2, ge=1)
    """Most recent checkpoints kept."""
    keep_best_by: str | None = "val_loss"
    """Validation metric whose best checkpoint is always kept; None keeps only the latest."""
    best_mode: Literal["min", "max"] = "min"
    """Whether lower or higher `keep_best_by` is better."""


class TrackingSpec(Section):
    """Experiment tracking. The Comet API key is read from COMET_API_KEY only; it never appears in a job file."""

    project: str = "hepml-dist"
    """Comet project name."""
    workspace: str | None = None
    """Comet workspace (None: the key's default)."""
    mode: Literal["online", "offline", "disabled"] = "online"
    """online if COMET_API_KEY is set (else falls back to an offline archive), offline, or disabled.
    A local metrics.jsonl is always written."""
    tags: list[str] = Field(default_factory=list)
    """Tags attached to the experiment."""
    tensorboard: bool = True
    """Write TensorBoard event files to RUN_DIR/tensorboard/ (scalars, `hepml evaluate`/`report` figures, the spec),
    so `tensorboard --logdir runs` shows every run; independent of `mode`."""


class SlurmSpec(Section):
    """Resources for `hepml slurm render/submit`; site profiles in cluster/sites fill the rest."""

    partition: str | None = None
    """SLURM partition."""
    account: str | None = None
    """SLURM account (project) charged."""
    qos: str | None = None
    """SLURM quality of service."""
    nodes: int = Field(1, ge=1)
    """Nodes in the allocation (one Ray node each)."""
    time: str = "01:00:00"
    """Wall-clock limit, HH:MM:SS or D-HH:MM:SS."""
    container_image: str | None = None
    """Apptainer image the Ray nodes and the training run in."""
    site: str | None = None
    """Site profile (a name in cluster/sites/ or a path) used by `hepml slurm` when --site is not given."""


class ClusterSpec(Section):
    """Where the job runs."""

    launcher: Literal["auto", "ray", "processes"] = "auto"
    """How the workers start. `ray`: Ray Train workers, on an embedded Ray or the cluster at `address`.
    `processes`: plain processes on this machine joined by torch.distributed over 127.0.0.1, without Ray: the first
    step comes 15 s sooner on a small machine (benchmarks/results.md); one machine only, no `hepml tune`, one whole
    GPU per worker or none. `auto`: `processes` where it can run the job, else `ray` (a cluster address given here,
    with --address or in $RAY_ADDRESS; `hepml tune`; shared GPUs); the run's log says which and why."""
    address: str = "local"
    """`local`: this machine (for Ray, an embedded Ray on 127.0.0.1, unless $RAY_ADDRESS names a cluster); otherwise
    the Ray cluster to join (`ray://host:10001`, `host:6379`, `auto`), with the Ray launcher."""
    storage_path: str | None = None
    """Directory (shared by all nodes) for run directories; None uses ./runs."""
    max_failures: int = Field(1, ge=-1)
    """Worker-group restarts from the last checkpoint after a worker fails (-1 = unlimited); done by Ray, or by the
    `processes` launcher (which does not restart after a UserError: bad data or settings fail the same way again)."""
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)
    """SLURM resources."""
