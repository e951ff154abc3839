"""Sophon end to end on generated jets: jobs/sophon-quickstart.yaml (188 classes, flat pT/m_SD sampling) trains a
few steps, then jobs/sophon-xbs-finetune.yaml starts from it for X -> bs vs QCD (tiny sizes, 2 gloo processes)."""

from pathlib import Path

import pytest
import torch

from hepml_dist.data.reweight import compute_weights
from hepml_dist.generate import get_process
from hepml_dist.generate.runner import generate_dataset
from hepml_dist.runs import resolve_checkpoint
from hepml_dist.spec import load_job

from train_helpers import final_weights, run_without_ray

ROOT = Path(__file__).resolve().parents[1]
BACKBONE = ("embed.", "pair_embed.", "blocks.", "pathways.")
TINY = ["data.batch_size=16", "data.steps_per_epoch=2", "data.val_steps=null", "data.shuffle_buffer=64",
        "data.loader_workers=0", "data.inputs.max_length=32", "training.epochs=1", "training.eval_interval=2",
        "training.log_interval=1", "checkpoint.keep_last=1"]


def splits(folder: Path) -> list[str]:
    return [f"data.{s}={folder / s}" for s in ("train", "val", "test")]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Sophon's classes (weights computed for the quickstart job) and an X -> bs vs QCD set, 200 events each."""
    root = tmp_path_factory.mktemp("sophon")
    process = get_process("jetclass2-lite")
    generate_dataset(process, 200, root / "all", seed=1, show_progress=False)
    generate_dataset(process, 200, root / "xbs", seed=2, show_progress=False, options={"classes": "X_bs,QCD"})
    spec = load_job(ROOT / "jobs/sophon-quickstart.yaml", splits(root / "all"))
    compute_weights(root / "all", spec.data.reweight)
    return root


def test_quickstart_trains_with_reweighting_then_finetunes_for_x_to_bs(datasets, tmp_path):
    pretrained, tuned = tmp_path / "quickstart", tmp_path / "finetune"
    quickstart = load_job(ROOT / "jobs/sophon-quickstart.yaml", [*TINY, *splits(datasets / "all")])
    finetune = load_job(ROOT / "jobs/sophon-xbs-finetune.yaml", [
        *TINY, *splits(datasets / "xbs"), f"training.init_from={pretrained}",
        # frozen here so that the test sees exactly what init_from loaded
        "training.freeze=['^(embed|pair_embed|blocks|pathways)\\.']"])
    assert quickstart.data.reweight is not None and quickstart.data.reweight.mode == "sample"
    assert finetune.tasks[0].output_dim == 2 and finetune.training.init_modules
    run_without_ray([(quickstart.model_dump(mode="json"), pretrained), (finetune.model_dump(mode="json"), tuned)])

    source = torch.load(resolve_checkpoint(pretrained) / "model.pt", weights_only=True)
    result = final_weights(tuned)
    backbone = [n for n in result if n.startswith(BACKBONE) and result[n].is_floating_point()
                and "running" not in n]
    assert backbone and all(torch.equal(result[n], source[n]) for n in backbone)  # loaded from the quickstart run
    assert source["heads.jet_class.3.weight"].shape[0] == 188
    assert result["heads.xbs.3.weight"].shape[0] == 2  # a new head, trained
