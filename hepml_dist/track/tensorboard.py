"""`TensorBoardTracker`: event files in RUN_DIR/tensorboard/, so that `tensorboard --logdir runs` shows every run.

Scalars are tagged `<group>/<metric name>` with the metric's own name (as in metrics.jsonl) and the group its prefix
(`train`, `val`, `test`, `eval`; `run` for the rest: lr, grad_norm, throughput, epoch), so TensorBoard shows one
section per group. Figures (`hepml evaluate`, `hepml report`) go to the Images tab; the parameters (resolved spec,
provenance) as text and as hparams (flattened, `optim.lr`, ...) for the HParams tab.

A resumed run starts a new event file whose first event purges the steps after its checkpoint (TensorBoard drops
the old points of steps that are trained again), as metrics.jsonl drops their records.
"""

import json
from pathlib import Path
from typing import Any

from hepml_dist.errors import UserError
from hepml_dist.track.images import FigureAsImage, png_size
from hepml_dist.track.records import TENSORBOARD_DIR

try:
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams
except ImportError:  # the `tensorboard` package is missing: said when a run asks for TensorBoard, not on import
    Summary = SummaryWriter = hparams = None
RGBA = 4  # the colour space of matplotlib's PNGs, in TensorBoard's image summary

GROUPS = ("train", "val", "test", "eval")
FLUSH_SECONDS = 30  # how stale a live dashboard may be


def tag(metric: str) -> str:
    """The TensorBoard tag of a metric: `val_loss` -> `val/val_loss`, `lr` -> `run/lr`."""
    group = metric.split("_", 1)[0]
    return f"{group if group in GROUPS else 'run'}/{metric}"


def flat_params(tree: Any, prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested parameters as `a.b.c: value`, values TensorBoard's hparams accept (others as JSON text)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flat_params(value, f"{prefix}{key}."))
        return out
    value = tree if isinstance(tree, (bool, int, float, str)) else json.dumps(tree)
    return {prefix[:-1]: value}


class TensorBoardTracker(FigureAsImage):
    """Scalars, figures and parameters of one process into RUN_DIR/tensorboard/ (a new event file per process)."""

    def __init__(self, run_dir: str | Path, resume_step: int | None = None, hparam_metrics: tuple[str, ...] = ()):
        if SummaryWriter is None:
            raise UserError(
                "tracking.tensorboard is on, and the `tensorboard` package is not installed: install it "
                "(pip install tensorboard) or switch it off (--set tracking.tensorboard=false)")
        self.folder = Path(run_dir) / TENSORBOARD_DIR
        # purge_step: TensorBoard forgets the points of steps >= it written before (the steps trained again)
        purge = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=purge, flush_secs=FLUSH_SECONDS)
        self.hparam_metrics = hparam_metrics

    def log_params(self, params: dict[str, Any]) -> None:
        text = json.dumps(params, indent=1, default=str)
        self.writer.add_text("params", "\n".join("    " + line for line in text.splitlines()))  # a markdown code block
        flat = {key.removeprefix("spec."): value for key, value in flat_params(params).items()}
        for summary in hparams(flat, dict.fromkeys(tag(m) for m in self.hparam_metrics)):
            self.writer.file_writer.add_summary(summary)

    def log_metrics(self, metrics: dict[str, float], step: int, epoch: int | None = None) -> None:
        for name, value in metrics.items():
            if isinstance(value, (bool, int, float)):
                self.writer.add_scalar(tag(name), float(value), global_step=step)
        if epoch is not None:
            self.writer.add_scalar(tag("epoch"), float(epoch), global_step=step)

    def log_image(self, name: str, png: bytes, step: int | None = None) -> None:
        width, height = png_size(png)
        image = Summary.Image(height=height, width=width, colorspace=RGBA, encoded_image_string=png)
        self.writer.file_writer.add_summary(Summary(value=[Summary.Value(tag=name, image=image)]), global_step=step)

    def close(self) -> None:
        self.writer.close()
