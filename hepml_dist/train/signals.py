"""What `hepml train` does on SIGINT (Ctrl-C), SIGTERM and SIGUSR1: stop with a final checkpoint, nothing lost.

The first signal makes the driver write the run's stop file; at the next step every rank agrees to stop (the step
flags' all-reduce), writes a checkpoint and returns; the driver then shuts its embedded Ray down. The exit status
says why the run ended early, as a shell reports a process ended by that signal: 130 for SIGINT, 143 for SIGTERM
(`EXIT_STATUS`). SIGUSR1, SLURM's warning before the time limit, exits 0: the batch script requeues the job and the
next run resumes (cluster/slurm). A second SIGINT or SIGTERM stops at once, not waiting for the final checkpoint
(`StoppedAtOnce`); the run then resumes from its latest checkpoint.

Ray Train's own Ctrl-C handler (installed by `TorchTrainer.fit`) would abort the workers without a checkpoint;
`launch` switches it off, so these handlers decide.
"""

import signal
import threading
from pathlib import Path
from typing import Any

from hepml_dist.run_files import request_stop

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
EXIT_STATUS = {"SIGINT": 128 + signal.SIGINT, "SIGTERM": 128 + signal.SIGTERM, "SIGUSR1": 0}
"""`hepml train`'s exit status after a stop by each signal (the run is not finished, except after SIGUSR1, whose
sender resumes it)."""


class StoppedAtOnce(KeyboardInterrupt):
    """A second SIGINT/SIGTERM: the driver left without waiting for the workers' final checkpoint."""

    def __init__(self, signal_name: str, run_dir: Path):
        super().__init__(signal_name)
        self.signal_name, self.run_dir = signal_name, run_dir

    @property
    def exit_status(self) -> int:
        return EXIT_STATUS[self.signal_name]


class StopOnSignals:
    """While training runs: the first stop signal asks the workers of `run_dir` to checkpoint and stop; a SIGINT or
    SIGTERM after that raises `StoppedAtOnce` in the driver's main thread (a repeated SIGUSR1 only asks again).
    Handlers are installed from the main thread only (a `hepml tune` trial runs the launcher in a thread)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.received: list[str] = []
        self.previous: dict[int, Any] = {}
        # What the handler raised: inside Ray's wait it becomes a plain KeyboardInterrupt, which `launch` replaces.
        self.at_once: StoppedAtOnce | None = None

    @property
    def first(self) -> str | None:
        """The signal that stopped the run, if any."""
        return self.received[0] if self.received else None

    def _handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        self.received.append(name)
        if len(self.received) > 1 and signum != signal.SIGUSR1:
            self._restore()  # a third one gets the default behaviour, whatever the clean-up is doing
            print(f"[hepml] received {name} again: stopping at once, not waiting for the final checkpoint", flush=True)
            self.at_once = StoppedAtOnce(name, self.run_dir)
            raise self.at_once
        print(f"[hepml] received {name}: asking the workers to checkpoint and stop "
              "(send it again to stop at once)", flush=True)
        request_stop(self.run_dir)

    def _restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous = {}

    def __enter__(self) -> "StopOnSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

