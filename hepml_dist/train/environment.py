"""The training workers' environment, whichever launcher starts them; which launcher that is (`cluster.launcher`,
`auto` resolved here); and the fork server of the `processes` launcher, which has to start in that environment.
Imports neither torch nor Ray: `hepml train` starts the fork server as soon as it has read the job, so that the
server imports torch and the training loop on one core while the driver imports its own modules on the other
(hepml_dist.train.commands).
"""

import multiprocessing
import multiprocessing.forkserver
import os
import sys
from typing import NamedTuple

from hepml_dist.spec import JobSpec

WORKER_ENV = {
    # Comet must not probe the machine or the network (see track/tracker.py).
    "COMET_AUTO_LOG_ENV_DETAILS": "false",
    "COMET_AUTO_LOG_ENV_HOST": "false",
    "COMET_AUTO_LOG_GIT_METADATA": "false",
    "COMET_AUTO_LOG_GIT_PATCH": "false",
    "COMET_ERROR_TRACKING_ENABLE": "false",
    "PYTHONUNBUFFERED": "1",
}


def worker_env(spec: JobSpec, embedded: bool) -> dict[str, str]:
    env = dict(WORKER_ENV)
    if spec.parallel.accelerators == ["cpu"]:
        env["DS_ACCELERATOR"] = "cpu"
        env["OMP_NUM_THREADS"] = str(max(1, int(spec.parallel.cpus_per_worker)))
        # Ray Train runs the loop in a thread of its own, which gets a glibc malloc arena of its own: 64 MiB heaps
        # that are unmapped when a step frees its activations and mapped again by the next step. With one arena
        # the step's memory stays on the main heap (tuned by hepml_dist.data.handover.tune_malloc). Measured on a
        # ParT CPU worker: munmap 2,871 -> 249 and madvise 1,672 -> 0 calls in 6 s (benchmarks/results.md).
        env["MALLOC_ARENA_MAX"] = os.environ.get("MALLOC_ARENA_MAX", "1")
    if not embedded and os.environ.get("COMET_API_KEY"):
        # Workers of an embedded Ray inherit it; on a cluster it travels in the runtime environment (memory only).
        env["COMET_API_KEY"] = os.environ["COMET_API_KEY"]
    return env


LOOPBACK_ENV = {"GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
"""The `processes` launcher's workers talk over 127.0.0.1 only; set where unset."""
FORK_SERVER_PRELOAD = ["hepml_dist.train.loop", "torch._dynamo"]
"""What the fork server imports once for every worker: the loop (torch, the models, the loader), and torch._dynamo,
which the first optimizer of every worker would otherwise import (`torch.optim.Optimizer.__init__` is wrapped in
`torch._disable_dynamo`), about 1.3 s each."""


def processes_env(spec: JobSpec) -> dict[str, str]:
    """The environment of the `processes` launcher's workers: they inherit the driver's, as on an embedded Ray."""
    return {**worker_env(spec, embedded=True), **{k: os.environ.get(k, v) for k, v in LOOPBACK_ENV.items()}}


def start_fork_server(spec: JobSpec) -> None:
    """Start the fork server now (it imports FORK_SERVER_PRELOAD in the background), in the workers' environment:
    glibc and OpenMP read theirs when a process starts. One server serves every run of this driver process; a
    second call does nothing."""
    env = processes_env(spec)
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        multiprocessing.set_forkserver_preload(FORK_SERVER_PRELOAD)
        multiprocessing.forkserver.ensure_running()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class LauncherChoice(NamedTuple):
    """The launcher that runs a job, the Ray cluster it joins, and why, for the run's log."""

    name: str
    """`ray` or `processes`."""
    address: str | None
    """The Ray cluster to join; None: this machine (an embedded Ray, or the processes launcher)."""
    reason: str


def choose_launcher(spec: JobSpec, address: str | None = None, *, tune: bool = False) -> LauncherChoice:
    """The launcher of `spec` (`cluster.launcher`). `auto` takes the processes launcher wherever it can run the job,
    since its first step comes 15 s sooner and its steps run faster on a small machine (benchmarks/results.md), and
    Ray otherwise: for a cluster (`--address`, `cluster.address`, or $RAY_ADDRESS, which Ray itself would follow),
    for `hepml tune`, for GPUs shared between workers, or when this process already runs Ray."""
    given = address if address and address != "local" else None
    given = given or (spec.cluster.address if spec.cluster.address != "local" else None)
    launcher = spec.cluster.launcher
    if launcher == "processes":
        return LauncherChoice("processes", given, "cluster.launcher processes")  # check_launch refuses an address
    cluster = given or os.environ.get("RAY_ADDRESS") or None
    if launcher == "ray":
        return LauncherChoice("ray", cluster, "cluster.launcher ray")
    gpus = spec.parallel.gpus_per_worker
    ray_reasons = [
        (cluster, f"a Ray cluster to join ({cluster})"),
        (tune, "hepml tune runs its trials on Ray Train"),
        (gpus not in (0, 1), f"parallel.gpus_per_worker {gpus:g} shares GPUs between workers"),
        ("ray" in sys.modules and sys.modules["ray"].is_initialized(), "Ray already runs in this process"),
    ]
    for applies, reason in ray_reasons:
        if applies:
            return LauncherChoice("ray", cluster, f"cluster.launcher auto: {reason}")
    return LauncherChoice("processes", None, "cluster.launcher auto: one machine, no Ray cluster")
