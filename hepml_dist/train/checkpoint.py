"""Saving and resuming training: checkpoints assembled by every rank, and the random-number states of each rank.

A checkpoint folder (layout and reading: hepml_dist.runs) is filled in a hidden temporary folder: every rank writes
its own part (DeepSpeed shards), then rank 0 writes spec.yaml, model.pt, training.pt and state.json, renames the
folder into place, updates best.json and prunes old checkpoints. state.json records the step, epoch, phase, data
position, validation metrics and every rank's RNG state, so a resumed run continues exactly.
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
from hepml_dist.spec import JobSpec
from hepml_dist.train.distributed import gather_to_rank0
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
    if ctx.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    ctx.barrier()
    engine.save_shards(tmp)
    ctx.barrier()  # every rank's shard files are complete
    model_state = engine.full_state_dict(tmp)
    rngs = gather_to_rank0(capture_rng(), ctx.world_size)
    if ctx.rank == 0:
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
    ctx.barrier()


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
