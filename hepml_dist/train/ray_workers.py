"""Training workers as Ray Train workers (`cluster.launcher: ray`, or `auto` when the job needs Ray): an embedded
Ray on 127.0.0.1, or a cluster joined with `--address`.

`fit` runs a `TorchTrainer` whose `ScalingConfig` and `RunConfig` come from the spec; Ray Train starts the worker
group, sets the torch process group up (gloo on CPU, NCCL/RCCL on GPUs), restarts the group from the latest
checkpoint after a failure (`cluster.max_failures`), and each worker runs `train_loop_per_worker` with a context
that reports to Ray. Imported only when a run uses Ray: Ray Train takes seconds to import.
"""

import os
import sys
from pathlib import Path
from typing import Any

import ray
import ray.train
import ray.train.torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

from hepml_dist.spec import JobSpec
from hepml_dist.spec.parallel import ACCELERATORS, ParallelSpec
from hepml_dist.train.driver import ProgressBar, explain_failure, loop_config
from hepml_dist.train.environment import worker_env
from hepml_dist.train.loop import train_loop_per_worker
from hepml_dist.train.ray_setup import WORKER_SETUP_HOOK
from hepml_dist.train.session import WorkerContext
from hepml_dist.train.signals import StopOnSignals
from hepml_dist.train.startup import StartupClock

RAY_DIR = "ray"  # Ray Train's own bookkeeping inside the run directory


def ray_train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """What each Ray Train worker runs: the training loop, with Ray's rank, device and report."""
    context = ray.train.get_context()
    ctx = WorkerContext(context.get_world_rank(), context.get_world_size(), context.get_local_rank(),
                        ray.train.torch.get_device(), True, reporter=ray.train.report)
    return train_loop_per_worker(config, ctx)


def scaling_config(parallel: ParallelSpec):
    """Workers, GPUs and CPUs per worker, and the accelerator type to place them on."""
    use_gpu = parallel.gpus_per_worker > 0
    resources = {"CPU": parallel.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = parallel.gpus_per_worker
    types = [ACCELERATORS[a].ray_type for a in parallel.accelerators]
    # One type can be required; for a list of types (one vendor) placement is left to the cluster.
    accelerator_type = types[0] if len(types) == 1 else None
    return ScalingConfig(
        num_workers=parallel.num_workers, use_gpu=use_gpu, resources_per_worker=resources, accelerator_type=accelerator_type
    )


EMBEDDED_RAY_ENV = {
    # One machine that nobody drains: no preemption-watcher actor (a process of its own), no Prometheus metrics
    # of Ray Train (nothing scrapes an embedded Ray). Set only where unset, so a user can turn either back on.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_METRICS_ENABLED": "0",
}


def start_ray(spec: JobSpec, address: str | None) -> bool:
    """Join the cluster at `address`, or start an embedded Ray bound to 127.0.0.1. Returns whether we started it."""
    if ray.is_initialized():
        return False
    if address and address != "local":
        ray.init(address=address, log_to_driver=True)
        return False
    for name, value in EMBEDDED_RAY_ENV.items():  # read by the Train controller, which inherits our environment
        os.environ.setdefault(name, value)
    p = spec.parallel
    needed = p.num_workers * p.cpus_per_worker + 1  # + the Train controller
    ray.init(
        num_cpus=int(max(needed, os.cpu_count() or 1, 4)),
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        log_to_driver=True,
        configure_logging=True,
        logging_level="WARNING",
        runtime_env={"worker_process_setup_hook": WORKER_SETUP_HOOK},
    )
    return True


class _Trainer(TorchTrainer):
    """Ray Train's trainer without its Ctrl-C handler, which aborts the workers before they checkpoint: SIGINT is
    handled like SIGTERM (`StopOnSignals`); and without its Ray Data callback, since the shards are read by our own
    loader: that callback starts a DatasetManager actor and imports Ray Data into the controller and every worker,
    seconds of start-up on a small machine for nothing.

    On an embedded Ray (`embedded=True`) it also leaves out two actors that only matter on a shared, autoscaling
    cluster, each a process of its own that imports Ray Train and Ray Data (2.4-2.9 s of CPU each on a 2-core
    machine, on the start-up's critical path): the placement-group cleaner, which removes the workers' placement
    group if the controller dies (an embedded Ray goes away with the run), and the autoscaling coordinator, which
    tells an autoscaler what the workers need (an embedded Ray has one fixed node)."""

    def __init__(self, *args, embedded: bool = False, **kwargs):
        self.embedded = embedded
        super().__init__(*args, **kwargs)

    def _register_sigint_handler(self, controller) -> None:
        return None

    def _create_default_callbacks(self):
        callbacks = super()._create_default_callbacks()
        if not self.datasets:
            callbacks = [c for c in callbacks if not isinstance(c, DatasetsCallback)]
        if self.embedded:
            callbacks = [c for c in callbacks if not isinstance(c, PlacementGroupCleanerCallback)]
        return callbacks

    def _initialize_and_run_controller(self, **controller_init_kwargs):
        if self.embedded and type(controller_init_kwargs.get("scaling_policy")) is FixedScalingPolicy:
            controller_init_kwargs["scaling_policy"] = FixedSizeOnOneMachine(self.scaling_config)
        return super()._initialize_and_run_controller(**controller_init_kwargs)


class FixedSizeOnOneMachine(FixedScalingPolicy):
    """Ray Train's fixed-size policy without the autoscaling coordinator it registers the workers' resources with
    (an actor of Ray Data's): on an embedded Ray nothing scales, and the placement group alone asks for the CPUs."""

    def after_controller_start(self, train_run_context) -> None:
        return None

    def _maybe_send_resource_request(self) -> None:
        return None

    def _send_resource_request(self) -> None:
        return None

    def _cancel_resource_request(self) -> None:
        return None


def fit(spec: JobSpec, run_dir: Path, embedded: bool, progress: bool | None, callbacks: list | None,
        startup: StartupClock | None = None) -> str | None:
    """Run the worker group to its end; returns the signal that stopped it, if one did."""
    interactive = sys.stdout.isatty() if progress is None else progress
    trainer = _Trainer(
        ray_train_loop,
        embedded=embedded,
        train_loop_config=loop_config(spec, run_dir, interactive, startup),
        torch_config=TorchConfig(timeout_s=spec.parallel.collective_timeout_s),
        scaling_config=scaling_config(spec.parallel),
        run_config=RunConfig(
            name=RAY_DIR,
            storage_path=str(run_dir),
            failure_config=FailureConfig(max_failures=spec.cluster.max_failures),
            # Checkpoints are kept by the workers (last K + best, atomic folders); Ray only tracks reports.
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            worker_runtime_env={"env_vars": worker_env(spec, embedded)},
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,  # e.g. Tune's TuneReportCallback when a `hepml tune` trial runs this
        ),
    )
    with StopOnSignals(run_dir) as signals, ProgressBar(spec, run_dir, interactive):
        try:
            trainer.fit()
        except KeyboardInterrupt as err:  # a second signal; inside ray.get it arrives as a plain KeyboardInterrupt
            raise (signals.at_once or err) from None
        except Exception as err:  # noqa: BLE001 - turn worker errors we understand into clear messages
            raise explain_failure(err, spec.parallel) from None
    return signals.first


