"""What a generated process is: its stored columns, its work unit, and how a worker makes examples.

Generation is cut into *work units* of a fixed number of events. Unit u of a run with seed S always uses the same
random streams (derived from S, the process name and u), whichever worker runs it and whatever ran before it on
that worker, so the dataset depends on (process, events, seed) only, never on the number of workers.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from hepml_dist.generate.pythia import MAX_PYTHIA_SEED

Schema = dict[str, tuple[str, tuple[int, ...]]]  # column -> (numpy dtype name, shape of one example)


class Generator(Protocol):
    """Lives in one worker process; holds initialised Pythia instances between units."""

    def run(self, n_events: int, seeds: UnitSeeds) -> dict[str, np.ndarray]:
        """Generate one work unit of `n_events` collision events; return the stored columns of its examples."""


@dataclass(frozen=True)
class UnitSeeds:
    """Independent random streams for one work unit: one seed per Pythia instance, one numpy stream (detector)."""

    sequence: np.random.SeedSequence

    def pythia(self, instance: int) -> int:
        return int(self.sequence.spawn(instance + 1)[instance].generate_state(1)[0]) % MAX_PYTHIA_SEED

    def numpy(self) -> np.random.Generator:
        return np.random.default_rng(self.sequence.generate_state(4))


def unit_seeds(seed: int, process: str, unit: int) -> UnitSeeds:
    return UnitSeeds(np.random.SeedSequence(entropy=seed, spawn_key=(zlib.crc32(process.encode()), unit)))


def init_seed(seed: int, process: str) -> int:
    """Seed for Pythia's initialisation (phase-space maxima); the same in every worker of a run."""
    return int(np.random.SeedSequence(entropy=seed, spawn_key=(zlib.crc32(process.encode()),)).generate_state(1)[0]
               ) % MAX_PYTHIA_SEED


@dataclass(frozen=True)
class RunContext:
    """What every worker's generator is built from: the same in all workers of a run."""

    init_seed: int
    """Seed of Pythia's initialisation (phase-space maxima)."""
    settings: tuple[str, ...] = ()
    """Extra Pythia settings (`--pythia`), appended to every sample's own."""
    total_events: int = 0
    """Collision events of the whole run (for per-sample event counts, e.g. cross-section weights)."""
    prepared: Any = None
    """Result of `Process.prepare`, if the process has one."""
    options: Any = None
    """The process's own options (e.g. `--classes`, `--mass-range`) as its `configure` parsed them; None for a
    process without options."""


@dataclass(frozen=True)
class Process:
    """A generated dataset kind (`hepml data generate NAME`)."""

    name: str
    summary: str
    schema: Schema
    unit_events: int
    """Collision events per work unit (a few seconds of work: small enough to balance, large enough to vectorise)."""
    make: Callable[[RunContext], Generator]
    """Builds the generator of one worker process (once per worker)."""
    classes: dict[str, list[str]] = field(default_factory=dict)
    """Names of the classes of each label column (for manifests and plots)."""
    example: str = "jet"
    """What one stored example is: jet, event."""
    chunk_size: int = 1024
    """Examples per stored chunk (smaller for large examples, keeping shards around 100 MB)."""
    prepare: Callable[[RunContext], Any] | None = None
    """Work done once per run in the main process (e.g. cross sections); its result reaches `make` as
    `context.prepared`."""
    options: tuple[str, ...] = ()
    """Names of the process's own command-line options (`--mass-range` is `mass_range`); others are refused."""
    configure: Callable[[Mapping[str, str]], Any] | None = None
    """Parses the given options (a subset of `options`, values as typed) into `context.options`, defaults filled
    in; raises UserError naming a bad one. Called once per run in the main process. A dataclass result is
    recorded in the manifest."""


def unit_sizes(total_events: int, unit_events: int) -> list[int]:
    """Events of each work unit: full units, then the remainder."""
    full, rest = divmod(total_events, unit_events)
    return [unit_events] * full + ([rest] if rest else [])


def concat_shuffled(parts: list[dict[str, np.ndarray]], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Join the column blocks of one work unit and shuffle the rows, so every chunk mixes its processes/classes."""
    columns = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    order = rng.permutation(len(next(iter(columns.values()))))
    return {k: v[order] for k, v in columns.items()}


def empty_columns(schema: Schema) -> dict[str, np.ndarray]:
    return {name: np.zeros((0, *shape), dtype=dtype) for name, (dtype, shape) in schema.items()}


def check_columns(columns: dict[str, np.ndarray], schema: Schema, process: str) -> None:
    """Fail loudly if a generator returns columns that break the stored-column contract."""
    if set(columns) != set(schema):
        raise AssertionError(f"{process}: columns {sorted(set(columns) ^ set(schema))} differ from the schema")
    lengths = {len(v) for v in columns.values()}
    if len(lengths) != 1:
        raise AssertionError(f"{process}: columns have different lengths {lengths}")
    for name, (dtype, shape) in schema.items():
        value = columns[name]
        if value.dtype != np.dtype(dtype) or value.shape[1:] != shape:
            raise AssertionError(f"{process}: {name} is {value.dtype}{value.shape[1:]}, schema says {dtype}{shape}")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            raise AssertionError(f"{process}: {name} has non-finite values")
