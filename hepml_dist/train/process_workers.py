"""Training workers as plain processes on this machine, without Ray (`cluster.launcher: processes`).

Ray Train needs 15-19 s on a 2-core machine before the first line of a job runs: its controller and worker actors
start one after the other, and each imports Ray Train (benchmarks/results.md). Here a fork server, started as soon
as the job is known (`hepml train` starts it before it imports torch itself: hepml_dist.train.environment), imports
torch and the training loop once, while the driver imports its own modules, checks the job and plans the data. Each
worker is forked from it, joins a torch process group through a file store in a private folder (gloo over 127.0.0.1
on CPU; NCCL/RCCL with one GPU per worker: rank r on GPU r of those visible), and runs the same
`train_loop_per_worker` as under Ray.

Each worker writes its output to RUN_DIR/logs/worker-<rank>.log; the driver echoes new lines with the rank in
front, above the progress bar when one is shown. When a worker fails, the driver stops the others and starts the
group again from the latest checkpoint, up to `cluster.max_failures` times, as Ray would; not after a UserError
(bad data or settings fail the same way again). Ctrl-C reaches the driver, which asks the workers to checkpoint
through the run's stop file (the workers ignore SIGINT); SIGTERM or SIGUSR1 sent to a worker itself (SLURM signals
every process of a step) does the same. A worker kills itself when the driver is gone, even after a SIGKILL: it
holds the read end of a pipe whose only writer is the driver (the fork server cannot be relied on for this: it
lives as long as any process it forked).
"""

import itertools
import multiprocessing
import multiprocessing.connection
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.multiprocessing import get_context

from hepml_dist.errors import UserError
from hepml_dist.spec import JobSpec
from hepml_dist.train.driver import ProgressBar, complete_lines, explain_failure, loop_config
from hepml_dist.train.environment import processes_env
from hepml_dist.train.loop import train_loop_per_worker
from hepml_dist.train.session import WorkerContext, process_group_context
from hepml_dist.train.signals import StopOnSignals
from hepml_dist.train.startup import StartupClock

STOP_GRACE_S = 10.0
"""How long the other workers of a failed group get to exit before they are killed."""


def check_launch(spec: JobSpec, address: str | None, callbacks: list | None) -> None:
    """What the processes launcher cannot do, said before anything starts."""
    if address and address != "local":
        raise UserError(f"cluster.launcher processes runs the workers on this machine, without Ray, so it joins no "
                        f"cluster (address {address}); drop --address / cluster.address, or set cluster.launcher=ray")
    if callbacks:
        raise UserError("hepml tune runs its trials on Ray Train: set cluster.launcher=ray in the job")
    gpus = spec.parallel.gpus_per_worker
    if gpus not in (0, 1):
        raise UserError(f"parallel.gpus_per_worker {gpus:g}: the processes launcher gives each worker one whole GPU "
                        "or none; use 1 or 0, or cluster.launcher=ray to share GPUs between workers")


def fit(spec: JobSpec, run_dir: Path, progress: bool | None, startup: StartupClock | None = None) -> str | None:
    """Run the worker group to its end, restarting it after a failure; returns the signal that stopped it, if any."""
    interactive = sys.stdout.isatty() if progress is None else progress
    config = loop_config(spec, run_dir, interactive, startup)
    env = processes_env(spec)
    limit = spec.cluster.max_failures
    with StopOnSignals(run_dir) as signals, ProgressBar(spec, run_dir, interactive), \
            EchoedLogs(run_dir / "logs", spec.parallel.num_workers) as logs:
        for attempt in itertools.count():
            try:
                failures = run_group(spec, config, env, logs.paths)
            except KeyboardInterrupt as err:  # a second signal (StoppedAtOnce): the workers were killed
                raise (signals.at_once or err) from None
            if not failures:
                break
            error = WorkerGroupFailed(failures)
            retry = not any(isinstance(f, UserError) for f in failures.values()) and (limit < 0 or attempt < limit)
            if not retry or signals.first:
                raise explain_failure(error, spec.parallel) from None
            print(f"[hepml] {error}; starting the workers again from the latest checkpoint "
                  f"(restart {attempt + 1} of {'unlimited' if limit < 0 else limit}, cluster.max_failures)", flush=True)
    return signals.first


class WorkerGroupFailed(RuntimeError):
    """One or more workers failed; `worker_failures` maps each failed rank to its exception."""

    def __init__(self, failures: dict[int, BaseException]):
        self.worker_failures = failures
        lines = [f"rank {rank}: {type(f).__name__}: {str(f).strip().splitlines()[-1] if str(f).strip() else ''}"
                 for rank, f in sorted(failures.items())]
        super().__init__("worker group failed (" + "; ".join(lines) + ")")


def run_group(spec: JobSpec, config: dict[str, Any], env: dict[str, str], logs: list[Path]) -> dict[int, BaseException]:
    """Start one worker per rank from the fork server and wait for all; returns {rank: exception} of those that failed.
    When one fails, the others get STOP_GRACE_S to notice (a collective with a dead rank errors) and are then killed."""
    world = spec.parallel.num_workers
    context = get_context("forkserver")
    rendezvous = Path(tempfile.mkdtemp(prefix="hepml-rendezvous-"))  # private (0700): the file store lives here
    processes, receivers, lifelines = [], [], []
    try:
        for rank in range(world):
            receive, send = context.Pipe(duplex=False)
            held, lifeline = context.Pipe(duplex=False)  # the driver never writes: its exit closes the pipe
            process = context.Process(target=worker_main, name=f"hepml-worker-{rank}", daemon=False,
                                      args=(rank, world, str(rendezvous / "store"), config, env, str(logs[rank]), send,
                                            held))
            process.start()
            send.close()
            held.close()
            processes.append(process)
            receivers.append(receive)
            lifelines.append(lifeline)
        return wait_for_workers(processes, receivers)
    finally:  # normal end, or a second Ctrl-C in the driver: no worker outlives the group
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join()
        for lifeline in lifelines:
            lifeline.close()
        shutil.rmtree(rendezvous, ignore_errors=True)


def wait_for_workers(processes: list, receivers: list) -> dict[int, BaseException]:
    failures: dict[int, BaseException] = {}
    first_failure = None
    running = dict(enumerate(processes))
    while running:
        multiprocessing.connection.wait([p.sentinel for p in running.values()], timeout=0.5)
        for rank, process in list(running.items()):
            if process.exitcode is None:
                continue
            del running[rank]
            outcome = _outcome(receivers[rank])
            if process.exitcode != 0 or outcome is None or outcome[0] != "ok":
                failures[rank] = _failure(outcome, process.exitcode)
                first_failure = first_failure or time.monotonic()
        if first_failure and running and time.monotonic() - first_failure > STOP_GRACE_S:
            for process in running.values():
                process.kill()
    return failures


def _outcome(receiver) -> tuple | None:
    """What the worker sent before it exited; None if it died first (killed, or crashed in C)."""
    try:
        return receiver.recv() if receiver.poll() else None
    except (EOFError, OSError):
        return None


def _failure(outcome: tuple | None, exitcode: int | None) -> BaseException:
    if outcome is not None and outcome[0] == "error":
        return outcome[1]
    if exitcode is not None and exitcode < 0:
        return RuntimeError(f"killed by {signal.Signals(-exitcode).name}")
    return RuntimeError(f"exited with status {exitcode} without a result")


def worker_main(rank: int, world: int, store: str, config: dict[str, Any], env: dict[str, str], log: str,
                results, lifeline) -> None:
    """A worker process: output to its log file, the process group, the training loop; the outcome to the driver."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the driver turns Ctrl-C into the stop file
    threading.Thread(target=_exit_when_the_driver_is_gone, args=(lifeline,), name="hepml-lifeline", daemon=True).start()
    _write_output_to(log)
    parallel = config["spec"]["parallel"]
    use_gpu = parallel["gpus_per_worker"] > 0
    os.environ.update(env)
    # what torchrun sets, and DeepSpeed reads
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    try:
        if use_gpu:
            torch.cuda.set_device(rank)
        else:
            torch.set_num_threads(max(1, int(parallel["cpus_per_worker"])))
        timeout = timedelta(seconds=parallel["collective_timeout_s"])
        dist.init_process_group("nccl" if use_gpu else "gloo", init_method=f"file://{store}", rank=rank,
                                world_size=world, timeout=timeout)
        ctx: WorkerContext = process_group_context(use_gpu)
        try:
            summary = train_loop_per_worker(config, ctx)
        finally:
            dist.destroy_process_group()
        results.send(("ok", summary))
    except BaseException as err:  # noqa: BLE001 - every failure goes to the driver, then the process exits non-zero
        traceback.print_exc()
        results.send(("error", _portable(err)))
        sys.stdout.flush()
        os._exit(1)


def _portable(err: BaseException) -> BaseException:
    """The exception itself when it survives pickling (UserError, CollectiveTimeoutError, ...), else its text."""
    try:
        return pickle.loads(pickle.dumps(err))
    except Exception:  # noqa: BLE001
        return RuntimeError("".join(traceback.format_exception(err)).strip())


def _exit_when_the_driver_is_gone(lifeline) -> None:
    """Block on the read end of the driver's lifeline; end of file means the driver exited: kill this worker (its
    loader processes follow: they watch their parent)."""
    try:
        lifeline.recv()
    except (EOFError, OSError):
        pass
    os.kill(os.getpid(), signal.SIGKILL)


def _write_output_to(log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout.reconfigure(line_buffering=True)
    sys.stderr.reconfigure(line_buffering=True)


class EchoedLogs:
    """RUN_DIR/logs/worker-<rank>.log for each rank, echoed to the driver's output as lines are completed."""

    def __init__(self, folder: Path, world: int, poll_s: float = 0.2):
        folder.mkdir(parents=True, exist_ok=True)
        self.paths = [folder / f"worker-{rank}.log" for rank in range(world)]
        self.offsets = [path.stat().st_size if path.exists() else 0 for path in self.paths]
        self.poll_s = poll_s
        self.done = threading.Event()

    def __enter__(self) -> "EchoedLogs":
        self.thread = threading.Thread(target=self._follow, name="hepml-worker-logs", daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        self.thread.join(timeout=5)
        self._echo()  # what the workers wrote last

    def _follow(self) -> None:
        while not self.done.wait(self.poll_s):
            self._echo()

    def _echo(self) -> None:
        for rank, path in enumerate(self.paths):
            lines, self.offsets[rank] = complete_lines(path, self.offsets[rank])
            for line in lines:
                print(f"(rank {rank}) {line}", flush=True)
