"""Task losses: each kind against its formula, selections, ignored labels, weights, and the empty-selection case."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hepml_dist.errors import UserError
from hepml_dist.models.losses import task_loss, task_losses
from hepml_dist.spec import load_job
from hepml_dist.spec.tasks import TaskSpec

ROOT = Path(__file__).resolve().parents[1]
TAU = load_job(ROOT / "jobs/multipartau.yaml")
KINEMATICS = ["log_pt_ratio", "delta_eta", "sin_delta_phi", "cos_delta_phi", "log_mass_ratio"]


def test_multiclass_ce_ignores_undefined_labels():
    task = TaskSpec(name="dm", kind="multiclass", num_classes=6, label="label_dm")
    logits = torch.randn(8, 6, requires_grad=True)
    labels = torch.tensor([0, 5, -1, 2, -1, 3, 1, 4])
    loss = task_loss(task, logits, {"label_dm": labels})
    keep = labels >= 0
    torch.testing.assert_close(loss, F.cross_entropy(logits[keep], labels[keep]))


def test_binary_ce_with_label_smoothing_on_two_logits():
    task = TAU.task("tau_id")
    logits, labels = torch.randn(10, 2), torch.randint(0, 2, (10,))
    loss = task_loss(task, logits, {"label_is_tau": labels})
    torch.testing.assert_close(loss, F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_bce_on_one_logit_only_where_selected():
    task = TAU.task("charge")
    logits = torch.randn(6, 1)
    charge = torch.tensor([1, 0, -1, 1, -1, 0])
    is_tau = torch.tensor([1, 1, 0, 1, 0, 0])
    loss = task_loss(task, logits, {"label_charge": charge, "label_is_tau": is_tau})
    sel = is_tau == 1
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(logits[sel, 0], charge[sel].float()))


def test_focal_with_gamma_zero_is_cross_entropy_and_down_weights_easy_examples():
    logits, labels = torch.randn(12, 4), torch.randint(0, 4, (12,))
    batch = {"label_x": labels}
    gamma0 = TaskSpec(name="x", kind="multiclass", num_classes=4, loss="focal", focal_gamma=0.0)
    torch.testing.assert_close(task_loss(gamma0, logits, batch), F.cross_entropy(logits, labels))
    gamma2 = TaskSpec(name="x", kind="multiclass", num_classes=4, loss="focal", focal_gamma=2.0)
    assert task_loss(gamma2, logits, batch) < F.cross_entropy(logits, labels)


def kinematics_batch(n: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    batch = {f"target_{name}": torch.randn(n, generator=g) for name in KINEMATICS}
    batch["label_is_tau"] = torch.ones(n, dtype=torch.long)
    return batch


def test_huber_angular_is_multipartau_kinematics_loss():
    task = TAU.task("kinematics")
    pred = torch.randn(7, 5)
    batch = kinematics_batch(7)
    t = torch.stack([batch[f"target_{n}"] for n in KINEMATICS], dim=-1)
    huber = [F.huber_loss(pred[:, i], t[:, i], delta=1.0) for i in range(5)]
    chord = torch.sqrt((pred[:, 2] - t[:, 2]) ** 2 + (pred[:, 3] - t[:, 3]) ** 2 + 1e-8).mean()
    expected = (huber[0] + huber[1] + chord + 0.2 * huber[4]) / 3.2
    torch.testing.assert_close(task_loss(task, pred, batch), expected)


def test_huber_and_mse_weight_the_targets():
    pred = torch.randn(5, 2)
    batch = {"target_a": torch.randn(5), "target_b": torch.randn(5)}
    t = torch.stack([batch["target_a"], batch["target_b"]], dim=-1)
    mse = TaskSpec(name="r", kind="regression", targets=["a", "b"], loss="mse", target_weights=[1.0, 3.0])
    expected = (F.mse_loss(pred[:, 0], t[:, 0]) + 3 * F.mse_loss(pred[:, 1], t[:, 1])) / 4
    torch.testing.assert_close(task_loss(mse, pred, batch), expected)
    huber = TaskSpec(name="r", kind="regression", targets=["a", "b"], loss="huber", huber_delta=0.5)
    torch.testing.assert_close(task_loss(huber, pred, batch), F.huber_loss(pred, t, delta=0.5))


def test_huber_angular_needs_a_sin_cos_pair():
    task = TaskSpec(name="r", kind="regression", targets=["a", "b"], loss="huber_angular")
    with pytest.raises(UserError, match="sin_<angle> and cos_<angle>"):
        task_loss(task, torch.randn(3, 2), {"target_a": torch.randn(3), "target_b": torch.randn(3)})


def test_empty_selection_gives_a_connected_zero_even_with_undefined_targets():
    task = TAU.task("kinematics")
    pred = torch.randn(4, 5, requires_grad=True)
    batch = kinematics_batch(4)
    batch["label_is_tau"] = torch.zeros(4, dtype=torch.long)
    batch["target_delta_eta"] = torch.full((4,), float("nan"))  # quark jets have no tau truth
    loss = task_loss(task, pred, batch)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_nan_targets_of_unselected_examples_do_not_poison_gradients():
    task = TAU.task("kinematics")
    pred = torch.randn(4, 5, requires_grad=True)
    batch = kinematics_batch(4)
    batch["label_is_tau"] = torch.tensor([1, 0, 1, 0])
    batch["target_log_pt_ratio"][1] = float("nan")
    task_loss(task, pred, batch).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad[1].abs().sum() == 0 and pred.grad[0].abs().sum() > 0


def test_example_weights_and_task_weights():
    spec = load_job(ROOT / "jobs/multipartau.yaml")
    pred = torch.randn(6, 5)
    batch = kinematics_batch(6)
    batch["weight"] = torch.tensor([1.0, 2.0, 0.0, 1.0, 3.0, 1.0])
    weighted = task_loss(spec.task("kinematics"), pred, batch)
    repeated = {k: v.repeat_interleave(batch["weight"].long()) for k, v in batch.items() if k != "weight"}
    torch.testing.assert_close(weighted, task_loss(spec.task("kinematics"), pred.repeat_interleave(batch["weight"].long(), 0), repeated))
    outputs = {"tau_id": torch.randn(6, 2), "charge": torch.randn(6, 1), "decay_mode": torch.randn(6, 6), "kinematics": pred}
    batch |= {"label_charge": torch.randint(0, 2, (6,)), "label_decay_mode": torch.randint(0, 6, (6,))}
    losses = task_losses(outputs, batch, spec)
    assert set(losses) == {"tau_id", "charge", "decay_mode", "kinematics"}
    torch.testing.assert_close(losses["kinematics"], 2.0 * weighted)  # kinematics has weight 2 in the job


def test_per_element_classification_drops_padding():
    task = TaskSpec(name="cls", kind="multiclass", num_classes=3)
    logits = torch.randn(2, 5, 3)
    labels = torch.randint(0, 3, (2, 5))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).float()[:, None]
    loss = task_loss(task, logits, {"label_cls": labels, "mask": mask})
    real = mask[:, 0] > 0
    torch.testing.assert_close(loss, F.cross_entropy(logits[real], labels[real]))
