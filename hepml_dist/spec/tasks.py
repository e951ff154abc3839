"""Spec of the training tasks: one head, one loss and one set of metrics per task."""

from typing import Literal

from pydantic import Field

from hepml_dist.spec.base import Section

TaskKind = Literal["binary", "multiclass", "regression"]
LossName = Literal["ce", "bce", "focal", "huber", "huber_angular", "mse"]
RegressFrom = Literal["class_token", "particle_weights"]

# Targets that `regress_from: particle_weights` computes from a weighted sum S of the particles' four-vectors and
# the sum J of all of them (the jet): log(pT_S / pT_J), eta_S - eta_J, sin and cos of phi_S - phi_J, log(m_S / m_J).
PARTICLE_WEIGHT_TARGETS = ("log_pt_ratio", "delta_eta", "sin_delta_phi", "cos_delta_phi", "log_mass_ratio")

# Which losses make sense for which kind of task; checked in rules.py.
LOSSES_FOR_KIND: dict[str, tuple[str, ...]] = {
    "binary": ("ce", "bce", "focal"),
    "multiclass": ("ce", "focal"),
    "regression": ("huber", "huber_angular", "mse"),
}


class TaskSpec(Section):
    """One prediction task of the model (e.g. tau ID, charge, decay mode, kinematics, jet class)."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    """Task name; used for output names (`score_<class>`, `<target>_pred`), metrics and losses."""
    kind: TaskKind
    """binary (one decision), multiclass (one of N classes) or regression (real-valued targets)."""
    label: str | None = None
    """Batch key holding the truth for classification tasks (e.g. `label_tau_id`); defaults to `label_<name>`."""
    classes: list[str] | None = None
    """Class names in output order; for binary tasks the negative class first."""
    num_classes: int | None = Field(None, ge=2)
    """Number of classes when the names are not listed (e.g. Sophon's 188); must agree with `classes` if both given."""
    targets: list[str] | None = None
    """Regression target names in output order (batch keys `target_<name>`)."""
    loss: LossName = "ce"
    """Loss function: ce (cross-entropy), bce (binary cross-entropy on one logit), focal, huber,
    huber_angular (Huber, with a chord loss for the sin/cos targets of an angle), mse."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    """Label smoothing of the cross-entropy (MultiParTau tau ID: 0.1)."""
    focal_gamma: float = Field(2.0, ge=0.0)
    """Focusing parameter of the focal loss."""
    huber_delta: float = Field(1.0, gt=0.0)
    """Transition point of the Huber loss."""
    target_weights: list[float] | None = None
    """Per-target weights inside a regression loss (MultiParTau kinematics: 1, 1, 1, 1, 0.2)."""
    weight: float = Field(1.0, ge=0.0)
    """Weight of this task's loss in the total (applied before PCGrad)."""
    only_where: str | None = None
    """Batch key of a 0/1 label; the loss and metrics use only entries where it is 1 (e.g. tau-only tasks)."""
    head_dropout: float | None = Field(None, ge=0.0, lt=1.0)
    """Overrides the model head's dropout for this task."""
    regress_from: RegressFrom = "class_token"
    """How a regression head predicts (Particle Transformer family only). `class_token`: an MLP on the class token.
    `particle_weights`: an MLP on each particle's representation gives it a weight in [0, 1], and the targets are
    computed from the weighted sum of the particles' four-vectors relative to the sum of all of them (targets among
    log_pt_ratio, delta_eta, sin_delta_phi, cos_delta_phi, log_mass_ratio), plus a correction from the class-token
    MLP that starts at zero. For a tau's visible momentum this is the natural form: the network learns which
    candidates belong to the tau (split-off neutrals, overlay and fakes get weight 0) rather than a sum of
    momentum fractions through softmax attention (docs/tau-regression-ablations.md)."""

    @property
    def label_key(self) -> str:
        return self.label or f"label_{self.name}"

    @property
    def output_dim(self) -> int:
        """Width of this task's output layer."""
        if self.kind == "regression":
            return len(self.targets or [])
        if self.kind == "binary":
            return 1 if self.loss == "bce" else 2
        if self.classes:
            return len(self.classes)
        return self.num_classes or 0
