"""The JobSpec: the one typed tree that describes a training job end to end."""

from typing import Annotated, Union, get_args

from pydantic import Field

from hepml_dist.spec.base import Section
from hepml_dist.spec.data import DataSpec
from hepml_dist.spec.model_aot import AotModelSpec
from hepml_dist.spec.model_mlpf import MlpfModelSpec
from hepml_dist.spec.model_omnijet import OmniJetModelSpec
from hepml_dist.spec.model_part import PartModelSpec
from hepml_dist.spec.optim import OptimSpec, ScheduleSpec
from hepml_dist.spec.parallel import ParallelSpec
from hepml_dist.spec.run import CheckpointSpec, ClusterSpec, TrackingSpec
from hepml_dist.spec.tasks import TaskSpec
from hepml_dist.spec.training import TrainingSpec

# The model families: one spec each, here; everything else (the registry, error messages) derives from this union.
ModelSpec = Annotated[
    Union[PartModelSpec, OmniJetModelSpec, MlpfModelSpec, AotModelSpec],
    Field(discriminator="family"),
]
MODEL_FAMILIES: tuple[str, ...] = tuple(m.model_fields["family"].default for m in get_args(get_args(ModelSpec)[0]))


class JobSpec(Section):
    """A complete training job. Load it with `hepml_dist.spec.load_job`, which also applies the cross-field rules."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=128)
    """Job name (letters, digits, `_.-`, at most 128); names the run directory and the experiment."""
    description: str = ""
    """One line on what the job trains and where its numbers come from."""
    model: ModelSpec
    """The architecture; `family` selects part, omnijet, mlpf or aot."""
    tasks: list[TaskSpec] = Field(min_length=1)
    """The prediction tasks, one output head each."""
    data: DataSpec
    """Shards, inputs and batching."""
    optim: OptimSpec = Field(default_factory=OptimSpec)
    """Optimizer."""
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    """Learning-rate schedule."""
    training: TrainingSpec = Field(default_factory=lambda: TrainingSpec(steps=1000))
    """Run length, precision, multi-task strategy, evaluation and fine-tuning."""
    parallel: ParallelSpec = Field(default_factory=ParallelSpec)
    """Workers, strategy and accelerators."""
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    """Checkpoint cadence and retention."""
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    """Experiment tracking."""
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    """Where the job runs."""

    def task(self, name: str) -> TaskSpec:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"job {self.name!r} has no task {name!r}")
