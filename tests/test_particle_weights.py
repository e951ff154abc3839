"""ParT regression from particle weights (`regress_from: particle_weights`): the targets it computes, its start
at the raw jet, its gradients, and the job rules that guard it."""

from pathlib import Path

import math

import numpy as np
import pytest
import torch

from hepml_dist.inference.export import example_jets
from hepml_dist.models import build_model, get_family
from hepml_dist.models.part.particle_weights import TARGETS
from hepml_dist.spec import load_job
from hepml_dist.spec.loader import SpecError
from hepml_dist.spec.tasks import PARTICLE_WEIGHT_TARGETS

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "multipartau-quickstart.yaml"
PARTICLE_WEIGHTS = "tasks.3.regress_from=particle_weights"  # the kinematics task


def massive_vectors(n: int, p: int, seed: int) -> np.ndarray:
    """[n, 4, p] four-vectors of particles with masses 0.5-2 GeV (the mass softening of 0.1 GeV is negligible)."""
    rng = np.random.default_rng(seed)
    pt = rng.uniform(1, 20, (n, p))
    eta = rng.normal(0.3, 0.2, (n, p))
    phi = rng.normal(1.0, 0.2, (n, p))
    mass = rng.uniform(0.5, 2.0, (n, p))
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    energy = np.sqrt(px**2 + py**2 + pz**2 + mass**2)
    return np.stack([px, py, pz, energy], axis=1)


def test_targets_agree_with_a_direct_computation_of_the_weighted_sum():
    assert set(TARGETS) == set(PARTICLE_WEIGHT_TARGETS)
    vectors = massive_vectors(64, 7, seed=0)
    weights = np.random.default_rng(1).uniform(0, 1, (64, 7))
    s, j = (vectors * weights[:, None]).sum(axis=2), vectors.sum(axis=2)

    def kinematics(v):
        pt = np.hypot(v[:, 0], v[:, 1])
        return pt, np.arcsinh(v[:, 2] / pt), np.arctan2(v[:, 1], v[:, 0]), np.sqrt(v[:, 3] ** 2 - (v[:, :3] ** 2).sum(1))

    (pt_s, eta_s, phi_s, m_s), (pt_j, eta_j, phi_j, m_j) = kinematics(s), kinematics(j)
    expected = {
        "log_pt_ratio": np.log(pt_s / pt_j), "delta_eta": eta_s - eta_j, "sin_delta_phi": np.sin(phi_s - phi_j),
        "cos_delta_phi": np.cos(phi_s - phi_j), "log_mass_ratio": np.log(m_s / m_j),
    }
    for name, function in TARGETS.items():
        got = function(torch.tensor(s, dtype=torch.float64), torch.tensor(j, dtype=torch.float64)).numpy()
        tolerance = 2e-3 if name == "log_mass_ratio" else 1e-6  # the 0.1 GeV softening of the masses
        np.testing.assert_allclose(got, expected[name], atol=tolerance, err_msg=name)


def model_and_jets(seed: int = 0):
    torch.manual_seed(seed)
    spec = load_job(JOB, [PARTICLE_WEIGHTS])
    model = build_model(spec)
    jets = example_jets(8, 20, model.input_dim, seed=seed)
    return spec, model, jets


def test_starts_at_the_raw_jet_and_follows_the_weights():
    _, model, jets = model_and_jets()
    model.eval()
    with torch.no_grad():
        start = model(jets)["kinematics"]
    # Weights of 0.982 for every particle: pT ratio log(0.982), the direction of the jet, its mass ratio.
    assert torch.allclose(start[:, 0], torch.full((8,), -math.log1p(math.exp(-4.0))), atol=1e-4)
    assert start[:, 1].abs().max() < 1e-4 and start[:, 2].abs().max() < 1e-4
    assert torch.allclose(start[:, 3], torch.ones(8), atol=1e-4)
    head = model.heads["kinematics"]
    with torch.no_grad():  # every weight 0
        head.particle_weight[-1].bias.fill_(-30.0)
        head.particle_weight[-1].weight.zero_()
        none_in = model(jets)["kinematics"]
    vectors, mask = jets["vectors"], jets["mask"][:, 0] > 0.5
    assert none_in[:, 0].max() < -10  # pT of the weighted sum ~ 1e-3 GeV (the softening)
    with torch.no_grad():
        head.particle_weight[-1].bias.fill_(30.0)
        all_in = model(jets)["kinematics"]
    assert all_in[:, 0].abs().max() < 1e-5 and all_in[:, 4].abs().max() < 1e-5
    assert mask.any(dim=1).all() and vectors.shape[1] == 4


def test_every_parameter_learns_and_the_jobs_other_tasks_are_unchanged():
    spec, model, _ = model_and_jets()
    plain = build_model(load_job(JOB, ["tasks.3.regress_from=class_token"]))
    assert type(plain.heads["kinematics"]).__name__ == "Sequential"
    assert type(model.heads["kinematics"]).__name__ == "ParticleWeightRegression"
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(0)
    for step in range(3):  # the zero-initialised output layers pass gradients on from the second step
        optimizer.zero_grad()
        batch = example_jets(16, 20, model.input_dim, seed=step)
        is_tau = torch.ones(16, dtype=torch.long)
        batch |= {"label_is_tau": is_tau, "label_charge": torch.randint(0, 2, (16,), generator=g),
                  "label_decay_mode": torch.randint(0, 6, (16,), generator=g)}
        for name in PARTICLE_WEIGHT_TARGETS:
            batch[f"target_{name}"] = 0.1 * torch.randn(16, generator=g)
        losses = get_family("part").losses(model(batch), batch, spec)
        sum(losses.values()).backward()
        optimizer.step()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize(("overrides", "field", "words"), [
    (["tasks.0.regress_from=particle_weights"], "tasks[0].regress_from", "binary task"),
    ([PARTICLE_WEIGHTS, "tasks.3.targets=[log_pt_ratio,phi]", "tasks.3.target_weights=[1,1]"], "tasks[3].targets",
     "cannot compute phi"),
])
def test_rules_name_the_field(overrides, field, words):
    with pytest.raises(SpecError) as err:
        load_job(JOB, overrides)
    assert field in str(err.value) and words in str(err.value)


def test_rules_refuse_other_families():
    with pytest.raises(SpecError) as err:
        load_job(ROOT / "jobs" / "omnijet-tau-kinematics-scratch.yaml", ["tasks.0.regress_from=particle_weights"])
    assert "tasks[0].regress_from" in str(err.value) and "model.family: part" in str(err.value)
