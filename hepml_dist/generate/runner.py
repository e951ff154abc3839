"""Run a generator over many work units, in parallel processes, and write the examples as a sharded dataset.

Units are handed to a pool of spawned worker processes (each builds its Pythia instances once) and written in
unit order through `DatasetWriter`, so the shards depend only on (process, events, seed, settings): the same seed
gives byte-identical shards with any number of workers.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, is_dataclass, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from hepml_dist.data.writer import DatasetWriter
from hepml_dist.errors import UserError
from hepml_dist.generate import get_process
from hepml_dist.generate.base import (
    Generator,
    Process,
    RunContext,
    check_columns,
    init_seed,
    unit_seeds,
    unit_sizes,
)
from hepml_dist.generate.pythia import check_settings


@dataclass
class GenerationReport:
    """What a run produced and how fast."""

    process: str
    events: int
    examples: int
    wall_seconds: float
    cpu_seconds: float  # summed over workers, generation only
    manifest: object

    @property
    def events_per_cpu_second(self) -> float:
        return self.events / max(self.cpu_seconds, 1e-9)


_WORKER: dict[str, Generator] = {}


def _start_worker(process_name: str, context: RunContext) -> None:
    _WORKER["generator"] = get_process(process_name).make(context)


def _run_unit(process_name: str, seed: int, unit: int, n_events: int) -> tuple[dict[str, np.ndarray], float]:
    process = get_process(process_name)
    start = time.process_time()
    columns = _WORKER["generator"].run(n_events, unit_seeds(seed, process.name, unit))
    check_columns(columns, process.schema, process.name)
    return columns, time.process_time() - start


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _progress():
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("events, {task.fields[examples]} examples"), TimeElapsedColumn(),
                    TimeRemainingColumn())


def generate_dataset(
    process: Process,
    events: int,
    out: str | os.PathLike,
    *,
    seed: int = 0,
    workers: int = 1,
    splits: Sequence[float] = (0.7, 0.1, 0.2),
    pythia_settings: Sequence[str] = (),
    overwrite: bool = False,
    show_progress: bool = True,
    options: Mapping[str, str] | None = None,
) -> GenerationReport:
    """Generate `events` collision events of `process` into the dataset directory `out`; `options` are the
    process's own (`Process.options`), values as typed on the command line."""
    if events < 1:
        raise UserError(f"--events {events}: need at least one event")
    if workers < 1:
        raise UserError(f"--workers {workers}: need at least one worker")
    if seed < 0:
        raise UserError(f"--seed {seed}: use a non-negative integer")
    _require_generator_packages()
    settings = tuple(pythia_settings)
    try:
        check_settings(settings)
    except ValueError as err:
        raise UserError(f"--pythia: {err}") from None
    sizes = unit_sizes(events, process.unit_events)
    workers = min(workers, len(sizes))
    parsed = _process_options(process, options or {})
    context = RunContext(init_seed(seed, process.name), settings, events, options=parsed)
    if process.prepare is not None:
        context = replace(context, prepared=process.prepare(context))
    meta = {
        "generator": {
            "process": process.name, "summary": process.summary, "events": events, "seed": seed,
            "unit_events": process.unit_events, "pythia_settings": list(settings), "example": process.example,
            "pythia": _pythia_version(), "classes": process.classes,
            **({"options": asdict(parsed)} if is_dataclass(parsed) else {}),
            **({"prepared": context.prepared} if context.prepared is not None else {}),
        }
    }
    writer = DatasetWriter(Path(out), schema=process.name, splits=splits, seed=seed,
                           chunk_size=process.chunk_size, chunks_per_shard=16, meta=meta, overwrite=overwrite)
    start, cpu, examples = time.perf_counter(), 0.0, 0
    progress = _progress() if show_progress else None
    try:
        if progress:
            progress.start()
        task = progress.add_task(process.name, total=events, examples=0) if progress else None
        for unit_events, (columns, unit_cpu) in zip(sizes, _units(process, sizes, seed, workers, context),
                                                    strict=True):
            writer.add(columns)
            cpu += unit_cpu
            examples += len(next(iter(columns.values())))
            if progress:
                progress.update(task, advance=unit_events, examples=examples)
    finally:
        if progress:
            progress.stop()
    manifest = writer.close()
    return GenerationReport(process.name, events, examples, time.perf_counter() - start, cpu, manifest)


def _process_options(process: Process, options: Mapping[str, str]):
    """The process's parsed options; a UserError for an option the process does not take."""
    for name in options:
        if name not in process.options:
            takes = (f"it takes only {', '.join('--' + o.replace('_', '-') for o in process.options)}"
                     if process.options else "it takes none of the process options")
            raise UserError(f"--{name.replace('_', '-')}: process {process.name} has no such option ({takes})")
    return process.configure(options) if process.configure is not None else None


def _units(process: Process, sizes: list[int], seed: int, workers: int, context: RunContext):
    """(columns, cpu seconds) of every unit, in unit order."""
    if workers == 1:
        _start_worker(process.name, context)
        for unit, n in enumerate(sizes):
            yield _run_unit(process.name, seed, unit, n)
        _WORKER.clear()
        return
    spawn = multiprocessing.get_context("spawn")  # no fork of a process holding rich's refresh thread
    with ProcessPoolExecutor(workers, mp_context=spawn, initializer=_start_worker,
                             initargs=(process.name, context)) as pool:
        pending: dict[int, Future] = {}
        submitted = 0
        try:
            for unit in range(len(sizes)):
                while submitted < len(sizes) and len(pending) < 2 * workers:
                    pending[submitted] = pool.submit(_run_unit, process.name, seed, submitted, sizes[submitted])
                    submitted += 1
                yield pending.pop(unit).result()
        except BrokenProcessPool:
            raise RuntimeError("a generator worker process died (out of memory, or see its traceback above)"
                               ) from None
        finally:
            for future in pending.values():
                future.cancel()


def _require_generator_packages() -> None:
    missing = [name for name in ("pythia8mc", "fastjet") if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(f"generating needs {' and '.join(missing)}: pip install 'hepml-dist[gen]' "
                        "(pythia8mc==8.317.2 has binary wheels; newer versions compile Pythia from source)")


def _pythia_version() -> str:
    try:
        return version("pythia8mc")
    except PackageNotFoundError:
        return "unknown"
