"""Set-up of every worker process of an embedded Ray (`worker_process_setup_hook`): a module of its own, so that
the controller and helper processes import nothing but this (and not Ray Train: a prestarted worker that never
trains would pay a second of CPU for it)."""

import logging
import os

import ray

# Ray Train's worker context module names its logger by its file path.
TRAIN_CONTEXT_LOGGER = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
PLACEMENT_GROUP_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
# what `ray.init(runtime_env=...)` names to run `quiet_embedded_ray_worker` in every worker process
WORKER_SETUP_HOOK = f"{__name__}.quiet_embedded_ray_worker"


def quiet_embedded_ray_worker() -> None:
    """Run in every worker process of the embedded Ray.

    - Each rank logs every `ray.train.report` in full ("Reporting training result N: TrainingReport(...)"), which
      repeats the validation line rank 0 already prints.
    - Ray Train's placement-group cleaner asks the state API whether the controller lives; without a dashboard
      (not started here: nothing to serve on a laptop) the query fails and it warns every few seconds. `hepml
      train` starts no cleaner on its embedded Ray (ray_workers._Trainer), but `hepml tune`'s trials do: they join
      the Ray that `hepml tune` started. The cleaner still cleans up when its controller dies.
    """
    logging.getLogger(TRAIN_CONTEXT_LOGGER).setLevel(logging.WARNING)
    logging.getLogger(PLACEMENT_GROUP_CLEANER_LOGGER).setLevel(logging.ERROR)
