"""The training workers' environment, whichever launcher starts them, and the fork server of the `processes`
launcher, which has to start in it. Imports neither torch nor Ray: `hepml train` starts the fork server as soon as
it has read the job, so that the server imports torch and the training loop on one core while the driver imports
its own modules on the other (hepml_dist.train.commands).
"""

import multiprocessing
import multiprocessing.forkserver
import os

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
