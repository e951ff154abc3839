"""When the training loop logs, validates, checkpoints, reports to Ray and stops: one small decision per step.

Every rank computes the same `Due` from the step number and the all-reduced stop flag, so every rank runs the
validation, the checkpoint collectives and the Ray report (a barrier) the same number of times.
"""

from dataclasses import dataclass

from hepml_dist.spec.run import CheckpointSpec
from hepml_dist.spec.training import TrainingSpec


@dataclass(frozen=True)
class Due:
    """What to do after an optimizer step."""

    log: bool
    evaluate: bool
    checkpoint: bool
    stop: bool  # stop early (a stop request): checkpoint, report, return
    end: bool  # the last step of the run

    @property
    def report(self) -> bool:
        """Report to Ray Train: whenever there is something new (metrics or a checkpoint)."""
        return self.evaluate or self.checkpoint


class Cadence:
    """`at(step, stop_requested)` -> Due, from `training.log_interval`, `training.eval_interval` and
    `checkpoint.interval` (default: at every evaluation). The last step logs, validates and checkpoints; a stop
    request checkpoints at once."""

    def __init__(self, training: TrainingSpec, checkpoint: CheckpointSpec, total_steps: int, validates: bool):
        self.log_interval = training.log_interval
        self.eval_interval = training.eval_interval
        self.checkpoint_interval = checkpoint.interval or training.eval_interval
        self.total_steps = total_steps
        self.validates = validates

    def logs_at(self, step: int) -> bool:
        return step % self.log_interval == 0 or step >= self.total_steps

    def at(self, step: int, stop_requested: bool) -> Due:
        end = step >= self.total_steps
        return Due(
            log=self.logs_at(step),
            evaluate=self.validates and (step % self.eval_interval == 0 or end),
            checkpoint=step % self.checkpoint_interval == 0 or end or stop_requested,
            stop=stop_requested and not end,
            end=end,
        )
