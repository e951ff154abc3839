"""Regression from particle weights: a ParT head that decides how much of each particle belongs to the object.

A tau's visible momentum is the sum of the candidates that came from the tau; the rest of a reconstructed jet is
detector confusion (split-off neutral hadrons and photons of a charged hadron's shower, fake tracks) and beam
background. A class-token MLP can only form such sums through softmax attention, which averages, so it learns the
correction slowly; the trees of the baseline get the neutral-hadron pT fraction as a ready-made input. This head
instead gives each particle a weight w_i in [0, 1] from its own representation (after the particle blocks, so the
weight sees the jet around it) and computes the targets from S = sum_i w_i p_i against the jet J = sum_i p_i:

    log_pt_ratio    log(pT_S / pT_J)
    delta_eta       eta_S - eta_J
    sin/cos_delta_phi   sin and cos of phi_S - phi_J
    log_mass_ratio  log(m_S / m_J)

A class-token MLP adds a correction, initialised to zero, so the model starts at the raw jet (all weights close to
1) and can still learn what no reweighting of the candidates gives (e.g. particles beyond the stored ones).
The same idea weights particles for pile-up removal (PUPPI, arXiv:1407.6013; its learned versions such as
PUMML, arXiv:1707.08600).
"""

import torch
from torch import nn

from hepml_dist.models.blocks import make_head
from hepml_dist.spec.model_part import HeadSpec
from hepml_dist.spec.tasks import TaskSpec

INITIAL_WEIGHT_LOGIT = 4.0  # sigmoid(4) = 0.982: training starts from (almost) the raw jet
PT_SOFTENING = 1e-3  # GeV: keeps log(pT_S) finite when every weight goes to 0
MASS_SOFTENING = 0.1  # GeV: m -> sqrt(m^2 + m0^2) on both sides; bounds d log m / d w for massless sums


def _pt(v: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(v[:, 0].square() + v[:, 1].square() + PT_SOFTENING**2)


def _eta(v: torch.Tensor) -> torch.Tensor:
    x = v[:, 2] / _pt(v)
    # asinh(x), written out: ONNX (opset 17) export has no asinh; odd symmetry avoids the cancellation at x << 0
    return torch.sign(x) * torch.log(x.abs() + torch.sqrt(x.square() + 1))


def _mass(v: torch.Tensor) -> torch.Tensor:
    m2 = v[:, 3].square() - v[:, :3].square().sum(dim=1)
    return torch.sqrt(m2.clamp(min=0) + MASS_SOFTENING**2)


def _cross_over_pts(s: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    return (s[:, 1] * j[:, 0] - s[:, 0] * j[:, 1]) / (_pt(s) * _pt(j))


def _dot_over_pts(s: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    return (s[:, 0] * j[:, 0] + s[:, 1] * j[:, 1]) / (_pt(s) * _pt(j))


# target name -> f(S [B, 4], J [B, 4]) -> [B]; the names are spec.tasks.PARTICLE_WEIGHT_TARGETS
TARGETS = {
    "log_pt_ratio": lambda s, j: torch.log(_pt(s) / _pt(j)),
    "delta_eta": lambda s, j: _eta(s) - _eta(j),
    "sin_delta_phi": _cross_over_pts,
    "cos_delta_phi": _dot_over_pts,
    "log_mass_ratio": lambda s, j: torch.log(_mass(s) / _mass(j)),
}


class ParticleWeightRegression(nn.Module):
    """Targets of one regression task from per-particle weights plus a class-token correction (module docstring)."""

    def __init__(self, head: HeadSpec, task: TaskSpec, dim: int):
        super().__init__()
        dropout = head.dropout if task.head_dropout is None else task.head_dropout
        self.targets = list(task.targets or [])
        self.particle_weight = make_head(dim, head.hidden, head.activation, dropout, 1)
        self.correction = make_head(dim, head.hidden, head.activation, dropout, len(self.targets))
        self.reset_output_layers()

    def reset_output_layers(self) -> None:
        """Weights start near 1 and the correction at 0 (called again after a family-wide re-initialisation)."""
        with torch.no_grad():
            self.particle_weight[-1].weight.zero_()
            self.particle_weight[-1].bias.fill_(INITIAL_WEIGHT_LOGIT)
            self.correction[-1].weight.zero_()
            self.correction[-1].bias.zero_()

    def weights(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """w [B, P] in [0, 1] of the particles x [B, P, D]; 0 at padding."""
        return torch.sigmoid(self.particle_weight(x).squeeze(-1).float()) * mask

    def forward(self, cls: torch.Tensor, x: torch.Tensor, mask: torch.Tensor, vectors: torch.Tensor,
                jet: torch.Tensor) -> torch.Tensor:
        """cls [B, D]; x [B, P, D], mask [B, P] and vectors [B, 4, P] of the particles the blocks saw; jet [B, 4]
        the sum of all the jet's particles (before any trimming). Returns [B, T] in the order of the task's targets."""
        weighted = torch.einsum("bp,bcp->bc", self.weights(x, mask), vectors.float())
        jet = jet.float()
        physics = torch.stack([TARGETS[name](weighted, jet) for name in self.targets], dim=-1)
        return physics + self.correction(cls).float()
