"""Saving and resuming training: checkpoints assembled by every rank, and the random-number states of each rank.

A checkpoint folder (layout and reading: hepml_dist.runs) is filled in a hidden temporary folder: every rank writes
its own part (DeepSpeed shards), then rank 0 writes spec.yaml, model.pt, training.pt and state.json, renames the
folder into place, updates best.json and prunes old checkpoints. state.json records the step, epoch, phase, data
position, validation metrics and every rank's RNG state, so a resumed run continues exactly.

A write that fails (a full disk, a quota, a vanished mount) must not leave the other ranks waiting forever in the
next collective, nor a half-written folder: after each writing phase the ranks agree on whether every write worked
(`agree_on_writes`), and if one failed, all of them stop with the same error; the temporary folder is removed and the
checkpoints already in place stay as they were, so the next start resumes from the last complete one.
"""

import base64
import io
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from hepml_dist import runs
from hepml_dist.errors import UserError
from hepml_dist.spec import JobSpec
from hepml_dist.train.distributed import all_sum, gather_to_rank0
from hepml_dist.train.engine import Engine
from hepml_dist.train.session import WorkerContext


@dataclass
class ResumePoint:
    """Where a run directory's latest complete checkpoint left off (`folder` None: a fresh start)."""

    folder: Path | None
    state: dict[str, Any]

    @classmethod
    def latest(cls, run_dir: Path) -> "ResumePoint":
        folder = runs.latest_checkpoint(run_dir)
        return cls(folder, runs.read_state(folder) if folder else {})

    @property
    def step(self) -> int:
        return int(self.state.get("step", 0))

    def restore(self, engine: Engine, ctx: WorkerContext) -> None:
        """Weights and training state into the engine, and this rank's RNG state (when the world size is unchanged)."""
        engine.load(self.folder)
        rngs = self.state.get("rng") or []
        if len(rngs) == ctx.world_size:
            restore_rng(rngs[ctx.rank])


def save_checkpoint(engine: Engine, spec: JobSpec, run_dir: Path, ctx: WorkerContext, step: int, epoch: int,
                    phase: int | None, position: dict | None, metrics: dict[str, float], finished: bool,
                    stopped: bool) -> None:
    """All ranks: assemble the checkpoint of `step` (see the module docstring)."""
    tmp = runs.temp_folder(run_dir, step)

    def prepare() -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)

    agree_on_writes(attempt(prepare) if ctx.rank == 0 else None, tmp, step, ctx)
    agree_on_writes(attempt(lambda: engine.save_shards(tmp)), tmp, step, ctx)  # every rank's shard files
    model_state = engine.full_state_dict(tmp)
    rngs = gather_to_rank0(capture_rng(), ctx.world_size)

    def commit() -> None:
        state = {
            "step": step,
            "epoch": epoch,
            "phase": phase,
            "finished": finished,
            "stopped": stopped,
            "data_position": position,
            "world_size": ctx.world_size,
            "strategy": spec.parallel.strategy,
            "metrics": metrics,
            "rng": rngs,
            "time": time.time(),
        }
        runs.write_checkpoint_files(tmp, spec, model_state, state, engine.train_state())
        folder = runs.commit_folder(tmp, runs.checkpoint_folder(run_dir, step))
        runs.update_best(run_dir, folder.name, metrics, spec.checkpoint.keep_best_by, spec.checkpoint.best_mode)
        runs.prune_checkpoints(run_dir, spec.checkpoint.keep_last)

    agree_on_writes(attempt(commit) if ctx.rank == 0 else None, tmp, step, ctx)


class CheckpointWriteError(UserError):
    """A checkpoint could not be written on some rank; every rank raises it, with that rank's reason."""


def attempt(write) -> str | None:
    """Run a writing step; the error it raised as text (None: it worked). torch.save reports a failed write (a
    full disk) as a RuntimeError from its zip writer, Python file writes as OSError."""
    try:
        write()
    except OSError as err:
        return f"{err.strerror or err}" + (f": {err.filename}" if err.filename else "")
    except (RuntimeError, UserError) as err:  # UserError: hepml_dist.files names the file it could not write
        return str(err).splitlines()[0]
    return None


def agree_on_writes(failure: str | None, tmp: Path, step: int, ctx: WorkerContext) -> None:
    """Every rank: stop together if any rank's write failed (one all-reduce, a barrier in the normal case)."""
    failed = all_sum(torch.tensor([float(failure is not None)], device=ctx.device)).item()
    if not failed:
        return
    reasons = [r for r in gather_to_rank0(failure, ctx.world_size) or [] if r]
    if ctx.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    where = f"rank {ctx.rank}: {failure}" if failure else "another rank failed to write its part"
    raise CheckpointWriteError(
        f"checkpoint of step {step} not written ({'; '.join(reasons) if reasons else where}). The checkpoints "
        f"already in {tmp.parent} are intact; free space (or fix the path) and run the same command again to "
        "resume from the latest of them"
    )


# ----------------------------------------------------------------------------------------------------------------
# RNG states travel in state.json as base64 text, one entry per rank.


def _tensor_to_text(t: torch.Tensor) -> str:
    buffer = io.BytesIO()
    torch.save(t, buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def _text_to_tensor(text: str) -> torch.Tensor:
    return torch.load(io.BytesIO(base64.b64decode(text)), weights_only=True)


def capture_rng() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": _tensor_to_text(torch.get_rng_state()),
        "numpy": json.dumps(_numpy_state()),
        "python": json.dumps(_python_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_tensor_to_text(s) for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(_text_to_tensor(state["torch"]))
    numpy_state = json.loads(state["numpy"])
    np.random.set_state((numpy_state[0], np.array(numpy_state[1], dtype=np.uint32), *numpy_state[2:]))
    version, internal, gauss = json.loads(state["python"])
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_text_to_tensor(s) for s in state["cuda"]])


def _numpy_state() -> list[Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return [name, keys.tolist(), pos, has_gauss, cached]


def _python_state() -> list[Any]:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]
