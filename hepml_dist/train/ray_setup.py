"""Set-up of every worker process of an embedded Ray (`worker_process_setup_hook`): a module of its own, so that
the controller and helper processes import nothing but this."""

import logging

from ray.train.v2._internal.execution import context as train_context


def quiet_embedded_ray_worker() -> None:
    """Run in every worker process of the embedded Ray. Ray Train's placement-group cleaner asks the state API
    whether the controller lives; without a dashboard (not started here: nothing to serve on a laptop) the query
    fails and it warns every few seconds, thousands of lines per run. It still cleans up when the driver dies.
    Each rank also logs every `ray.train.report` in full ("Reporting training result N: TrainingReport(...)"),
    which repeats the validation line rank 0 already prints."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)  # that module names its logger by path
