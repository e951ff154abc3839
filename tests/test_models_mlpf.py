"""MLPF: reference parameter count, permutation equivariance, padding invariance, E >= |p|, losses, a short training,
and the jet / MET evaluation on hand-made events."""

import math
from pathlib import Path

import awkward as ak
import numpy as np
import pytest
import torch

from hepml_dist.evaluate.mlpf import cluster_jets, evaluate_mlpf, evaluate_particles, missing_et, target_particles
from hepml_dist.models import build_model, get_family
from hepml_dist.models.mlpf.model import padding_fraction
from hepml_dist.spec import load_job

ROOT = Path(__file__).resolve().parents[1]


def clic_spec():
    return load_job(ROOT / "jobs/mlpf-clic.yaml")


def small_spec(**model):
    spec = clic_spec()
    return spec.model_copy(update={"model": spec.model.model_copy(update={"num_heads": 4, "head_dim": 8, "num_convs": 1, **model})})


def make_events(n_events: int, seed: int = 0, max_tracks: int = 10, max_clusters: int = 10) -> dict[str, torch.Tensor]:
    """CLIC-like events: tracks then clusters, padded; truth that depends learnably on the element features."""
    rng = np.random.default_rng(seed)
    n_tracks = rng.integers(2, max_tracks + 1, n_events)
    n_clusters = rng.integers(2, max_clusters + 1, n_events)
    width = int((n_tracks + n_clusters).max())
    slot = np.arange(width)[None, :]
    is_track = slot < n_tracks[:, None]
    real = slot < (n_tracks + n_clusters)[:, None]
    x = np.zeros((n_events, width, 17), dtype=np.float32)
    x[..., 0] = np.where(is_track, 1, 2)
    pt = rng.exponential(8.0, (n_events, width)) + 1.0
    eta = rng.uniform(-2.0, 2.0, (n_events, width))
    phi = rng.uniform(-np.pi, np.pi, (n_events, width))
    x[..., 1], x[..., 2], x[..., 3], x[..., 4] = pt, eta, np.sin(phi), np.cos(phi)
    x[..., 5] = pt * np.cosh(eta) * np.where(is_track, 1.0, 1.2)
    x[..., 6:] = rng.normal(size=(n_events, width, 11))
    exists = real & (is_track | (x[..., 10] > -0.3))
    cls = np.where(is_track, np.where(x[..., 6] > 1.0, 4, 1), np.where(x[..., 11] > 0, 3, 2)) * exists
    target_pt = pt * np.exp(0.2 * np.tanh(x[..., 7]))
    target_eta = eta + 0.05 * np.tanh(x[..., 8])
    x *= real[..., None]
    return {
        "features": torch.tensor(x).transpose(1, 2).contiguous(),
        "mask": torch.tensor(real, dtype=torch.float32)[:, None],
        "label_existence": torch.tensor(exists, dtype=torch.long),
        "label_particle_class": torch.tensor(cls, dtype=torch.long),
        "target_pt": torch.tensor(target_pt * exists, dtype=torch.float32),
        "target_eta": torch.tensor(target_eta * exists, dtype=torch.float32),
        "target_sin_phi": torch.tensor(np.sin(phi) * exists, dtype=torch.float32),
        "target_cos_phi": torch.tensor(np.cos(phi) * exists, dtype=torch.float32),
        "target_energy": torch.tensor(target_pt * np.cosh(target_eta) * 1.01 * exists, dtype=torch.float32),
    }


def test_clic_configuration_matches_the_reference_parameter_count_layer_by_layer():
    with torch.device("meta"):
        model = build_model(clic_spec())
    count = lambda prefix: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))  # noqa: E731
    assert sum(p.numel() for p in model.parameters()) == 51_577_874
    assert count("id_embedding") + count("reg_embedding") == 4_280_320  # 2 types x {id, reg}, 17 -> 1024 -> 1024
    assert count("id_stack.blocks.0") == 6_301_696 and count("id_stack.blocks") + count("reg_stack.blocks") == 37_810_176
    assert count("heads.existence") + count("heads.particle_class") == 2_111_496
    assert count("heads.kinematics") == 7_371_786
    assert count("id_stack.norm") + count("reg_stack.norm") == 4_096


def test_outputs_are_equivariant_under_permutation_of_elements():
    torch.manual_seed(0)
    spec = small_spec()
    model = build_model(spec).eval()
    batch = make_events(4)
    perm = torch.randperm(batch["features"].shape[-1])
    permuted = {k: (v[..., perm] if k in ("features", "mask") else v[:, perm]) for k, v in batch.items()}
    with torch.no_grad():
        out, out_perm = model(batch), model(permuted)
    for task in spec.tasks:
        torch.testing.assert_close(out[task.name][:, perm], out_perm[task.name], atol=1e-5, rtol=1e-5)


def test_outputs_do_not_depend_on_padding_or_batch_companions():
    torch.manual_seed(0)
    spec = small_spec()
    model = build_model(spec).eval()
    batch = make_events(3)
    width = batch["features"].shape[-1]
    padded = {k: torch.nn.functional.pad(v, (0, 37)) for k, v in batch.items()}
    alone = {k: v[:1, ..., : int(batch["mask"][0].sum())] for k, v in batch.items()}
    empty = {k: torch.zeros_like(v[:1]) for k, v in batch.items()}  # an event without elements must not give NaN
    with_empty = {k: torch.cat([v, empty[k]]) for k, v in batch.items()}
    with torch.no_grad():
        out, out_padded, out_alone, out_with_empty = model(batch), model(padded), model(alone), model(with_empty)
    assert padding_fraction(padded["mask"]) > padding_fraction(batch["mask"])
    for task in spec.tasks:
        torch.testing.assert_close(out_padded[task.name][:, :width], out[task.name], atol=1e-5, rtol=1e-5)
        assert out_padded[task.name][:, width:].abs().max() == 0
        n = out_alone[task.name].shape[1]
        torch.testing.assert_close(out_alone[task.name][0], out[task.name][0, :n], atol=1e-5, rtol=1e-5)
        assert torch.isfinite(out_with_empty[task.name]).all()


def test_energy_is_never_below_momentum():
    torch.manual_seed(1)
    spec = small_spec()
    model = build_model(spec).eval()
    batch = make_events(8, seed=3)
    with torch.no_grad():
        kin = model(batch)["kinematics"]
    x, real = batch["features"].transpose(1, 2), batch["mask"][:, 0] > 0
    momentum = torch.exp(kin[..., 0]) * x[..., 1] * torch.cosh(kin[..., 1])
    energy = torch.exp(kin[..., 4]) * x[..., 5]
    assert (energy[real] >= momentum[real] * (1 - 1e-5)).all()


def test_loss_normalisation_follows_the_reference():
    spec = small_spec()
    batch = make_events(4, seed=5)
    exists = batch["label_existence"].bool()
    x = batch["features"].transpose(1, 2)
    perfect = torch.stack([
        torch.log(batch["target_pt"] / x[..., 1]), batch["target_eta"], batch["target_sin_phi"],
        batch["target_cos_phi"], torch.log(batch["target_energy"] / x[..., 5]),
    ], dim=-1).nan_to_num(0.0, 0.0, 0.0) * exists[..., None]  # fmt: skip
    confident = lambda label, k: 50.0 * torch.nn.functional.one_hot(label, k).float()  # noqa: E731
    outputs = {"existence": confident(batch["label_existence"], 2), "particle_class": confident(batch["label_particle_class"], 6), "kinematics": perfect}
    losses = get_family("mlpf").losses(outputs, batch, spec)
    assert all(float(v) < 1e-6 for v in losses.values()), losses
    shifted = dict(outputs, kinematics=perfect + torch.tensor([0, 0.5, 0, 0, 0]))  # eta off by 0.5, weight 0.01, / n_part
    assert float(get_family("mlpf").losses(shifted, batch, spec)["kinematics"]) == pytest.approx(0.01 * 0.25, rel=1e-4)
    no_class = dict(outputs, existence=torch.zeros_like(outputs["existence"]))  # p = 1/2 everywhere: ln 2 x weight 10
    assert float(get_family("mlpf").losses(no_class, batch, spec)["existence"]) == pytest.approx(10 * math.log(2), rel=1e-4)


def test_short_training_lowers_the_loss():
    torch.manual_seed(0)
    spec = small_spec(num_heads=4, head_dim=16)
    model = build_model(spec)
    losses = get_family("mlpf").losses
    train, held_out = make_events(64, seed=1), make_events(32, seed=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def total(batch):
        return sum(losses(model(batch), batch, spec).values())

    with torch.no_grad():
        before = float(total(held_out))
    for step in range(80):
        chunk = {k: v[(step % 4) * 16 : (step % 4 + 1) * 16] for k, v in train.items()}
        optimizer.zero_grad()
        total(chunk).backward()
        optimizer.step()
    with torch.no_grad():
        after = losses(model(held_out), held_out, spec)
    print(f"MLPF held-out loss {before:.3f} -> {float(sum(after.values())):.3f}", {k: round(float(v), 4) for k, v in after.items()})
    assert float(sum(after.values())) < 0.5 * before


def _scaled_model_outputs(batch, scale):
    """Outputs that decode to the target particles with pT and E scaled (the form MLPF's heads produce)."""
    x = batch["features"].transpose(1, 2)
    kin = torch.stack([
        torch.log(scale * batch["target_pt"] / x[..., 1]), batch["target_eta"], batch["target_sin_phi"],
        batch["target_cos_phi"], torch.log(scale * batch["target_energy"] / x[..., 5]),
    ], dim=-1).nan_to_num(0.0, 0.0, 0.0)  # fmt: skip
    onehot = torch.nn.functional.one_hot
    return {"existence": onehot(batch["label_existence"], 2).float(), "particle_class": onehot(batch["label_particle_class"], 6).float(), "kinematics": kin}


def test_evaluation_of_particles_scaled_by_1p1_gives_response_1p1(tmp_path):
    spec = clic_spec()
    batch = make_events(40, seed=7, max_tracks=30, max_clusters=20)
    gen = target_particles(batch, spec)
    gen_jets = cluster_jets(gen)
    assert ak.sum(ak.num(gen_jets)) > 40 and ak.min(gen_jets.pt) > 5.0
    gen_met = missing_et(gen)
    # stored gen-jet columns, as the clic-events shards hold them
    n_jets = ak.to_numpy(ak.num(gen_jets))
    padded = {f: ak.to_numpy(ak.fill_none(ak.pad_none(gen_jets[f], int(n_jets.max()), clip=True), 0.0)) for f in ("pt", "eta", "phi", "energy")}
    batch.update({f"genjet_{f}": torch.tensor(v, dtype=torch.float32) for f, v in padded.items()})
    batch["genjet_n"], batch["gen_met"] = torch.tensor(n_jets), torch.tensor(gen_met, dtype=torch.float32)

    class ScaledTruth(torch.nn.Module):
        def forward(self, b):
            return _scaled_model_outputs(b, 1.1)

    results = evaluate_mlpf(ScaledTruth(), [batch], spec, plots_dir=tmp_path / "plots")
    assert results["jet_response_median"] == pytest.approx(1.1, abs=1e-4)
    assert results["jet_match_fraction"] == 1.0 and results["jet_resolution"] == pytest.approx(0.0, abs=1e-4)
    assert results["met_response_median"] == pytest.approx(1.1, abs=1e-4)
    assert results["target_jet_response_median"] == pytest.approx(1.0, abs=1e-4)
    filled = [m for m in results["jet_response_vs_pt"]["median"] if not math.isnan(m)]
    assert filled and all(m == pytest.approx(1.1, abs=1e-4) for m in filled)
    assert {p.name for p in (tmp_path / "plots").glob("*.png")} >= {"jet_response_median.png", "jet_response_iqr_over_median.png", "met_response_median.png"}


def test_evaluation_response_spread_and_unmatched_jets():
    rng = np.random.default_rng(3)
    gen = ak.Array([[{"pt": 40.0, "eta": 0.1, "phi": 0.2, "energy": 40.2}, {"pt": 30.0, "eta": -1.0, "phi": 2.5, "energy": 46.3}]] * 50)
    gen_jets = cluster_jets(gen)
    smear = rng.normal(1.0, 0.1, (50, 2))
    pred = ak.zip({"pt": gen.pt * smear, "eta": gen.eta, "phi": gen.phi, "energy": gen.energy * smear})
    results = evaluate_particles(pred, gen_jets)
    q25, q50, q75 = np.percentile(smear.ravel(), [25, 50, 75])
    assert results["jet_response_median"] == pytest.approx(q50, rel=1e-3)
    assert results["jet_resolution"] == pytest.approx((q75 - q25) / q50, rel=1e-3)
    moved = ak.zip({"pt": gen.pt, "eta": gen.eta + 0.3, "phi": gen.phi, "energy": gen.energy})  # beyond Delta R 0.1
    assert evaluate_particles(moved, gen_jets)["jet_match_fraction"] == 0.0
