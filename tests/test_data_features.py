"""Feature builders: one per FEATURE_SETS entry, and numerically right for a few jets computed by hand."""

import math

import numpy as np
import pytest
from data_helpers import random_jets

from hepml_dist.data.features import FEATURE_BUILDERS, build_batch, get_builder
from hepml_dist.spec.data import FEATURE_SETS


def test_every_feature_set_has_a_builder_with_its_channel_count():
    assert set(FEATURE_BUILDERS) == set(FEATURE_SETS)
    for name, channels in FEATURE_SETS.items():
        assert FEATURE_BUILDERS[name].channels == channels, name


def raw_batch(name: str, n: int = 6, width: int = 10) -> dict:
    """Stored columns of a small batch for any feature set."""
    rng = np.random.default_rng(11)
    raw = random_jets(n, width, rng)
    counts = raw["part_n"]
    real = np.arange(width)[None, :] < counts[:, None]
    if name == "omnijet_tokens":
        return {"tokens": (rng.integers(1, 100, (n, width)) * real).astype(np.int32), "tokens_n": counts,
                "label_jet_class": raw["label_jet_class"]}
    if name == "mlpf_elements":
        elements = rng.normal(size=(n, width, 17)).astype(np.float32)
        elements[..., 1] = np.abs(elements[..., 1]) + 1
        elements[..., 5] = np.abs(elements[..., 5]) + 1
        elements *= real[..., None]
        return {"elem_features": elements, "elem_n": counts,
                "label_existence": real.astype(np.int64), "label_particle_class": (real * 3).astype(np.int64),
                "target_pt": (rng.uniform(1, 3, (n, width)) * real).astype(np.float32),
                "target_energy": (rng.uniform(1, 3, (n, width)) * real).astype(np.float32),
                "target_eta": rng.normal(size=(n, width)).astype(np.float32),
                "genjet_pt": rng.uniform(size=(n, 4)).astype(np.float32), "gen_met": rng.uniform(size=n)}
    if name == "aot_objects":
        return {"obj_features": (rng.normal(size=(n, width, 6)) * real[..., None]).astype(np.float32),
                "obj_n": counts, "event_ht": rng.uniform(size=n), "event_met": rng.uniform(size=n),
                "label_signal": rng.integers(0, 2, n), "weight": rng.uniform(size=n).astype(np.float32)}
    return raw


@pytest.mark.parametrize("name", sorted(FEATURE_SETS))
def test_builders_produce_the_batch_contract(name):
    raw = raw_batch(name)
    batch = build_batch(raw, get_builder(name), max_length=8, event_features=["ht", "met"])
    n = len(next(iter(raw.values())))
    assert batch["features"].shape == (n, FEATURE_SETS[name], 8)
    assert batch["features"].dtype == np.float32 and np.isfinite(batch["features"]).all()
    assert batch["mask"].shape == (n, 1, 8) and set(np.unique(batch["mask"])) <= {0.0, 1.0}
    padding = batch["mask"][:, 0, :] == 0
    assert np.all(batch["features"].transpose(0, 2, 1)[padding] == 0)
    for key, value in batch.items():
        if key.startswith("label_"):
            assert value.dtype == np.int64
    if name.startswith(("part", "sophon", "tau")):
        assert batch["vectors"].shape == (n, 4, 8)
    if name == "aot_objects":
        assert batch["event_features"].shape == (n, 2)
    if name == "mlpf_elements":
        assert batch["label_existence"].shape == (n, 8) and batch["target_log_pt_ratio"].shape == (n, 8)
        assert batch["genjet_pt"].shape == (n, 4)


@pytest.mark.parametrize("name", sorted(FEATURE_SETS))
def test_batches_built_again_in_the_same_memory_equal_fresh_ones(name):
    """The loader builds batch after batch into the same shared memory and zeroes only the padding the last batch
    wrote: longer, shorter and re-laid-out batches must come out as if built in fresh memory."""
    memory = {np.float32: np.full(1 << 16, np.nan, dtype=np.float32), np.int64: np.full(1 << 16, -7)}

    def reusing(n, dtype):  # hands out the same memory every batch, as a shared-memory slot does
        taken = reusing.used[np.dtype(dtype)]
        reusing.used[np.dtype(dtype)] += n
        return memory[np.dtype(dtype).type][taken:taken + n]

    reused = {}
    full = raw_batch(name, n=6, width=10)
    count = next(k for k in full if k.endswith("_n"))
    # the longest example of each batch: 10, 3, 7, 3, 10, then a batch 8 wide (pad_to_multiple: a new layout)
    for longest, multiple in ((10, None), (3, None), (7, None), (3, None), (10, None), (7, 4), (2, None)):
        raw = {k: v.copy() for k, v in full.items()}
        raw[count] = np.minimum(raw[count], longest)
        for k, v in raw.items():
            if v.ndim >= 2 and k != count and v.shape[1] == 10:
                v[:, longest:] = 0  # stored padding is zero
        kwargs = dict(max_length=10, pad_to_multiple=multiple, event_features=["ht", "met"])
        reusing.used = {np.dtype(np.float32): 0, np.dtype(np.int64): 0}
        again = build_batch(raw, get_builder(name), alloc=reusing, reused=reused, **kwargs)
        fresh = build_batch(raw, get_builder(name), **kwargs)
        assert again.keys() == fresh.keys()
        for k in fresh:
            np.testing.assert_array_equal(again[k], fresh[k], err_msg=f"{k}, longest {longest}")
        assert reused["busy"] == min(longest, int(full[count].max()))


def _eta_phi(px, py, pz):
    pt = math.hypot(px, py)
    return math.asinh(pz / pt), math.atan2(py, px), pt


def _wrap(x):
    return (x + math.pi) % (2 * math.pi) - math.pi


def _part_full_by_hand(raw, j, i, scale=1.0):
    px, py, pz, e = (float(raw[k][j, i]) for k in ("part_px", "part_py", "part_pz", "part_energy"))
    eta, phi, pt = _eta_phi(px, py, pz)
    jet_eta = float(raw["jet_eta"][j])
    deta = (eta - jet_eta) * (1 if jet_eta >= 0 else -1)
    dphi = _wrap(phi - float(raw["jet_phi"][j]))
    pid, charge = int(raw["part_pid"][j, i]), float(raw["part_charge"][j, i])
    clip = lambda x, lo=-5, hi=5: min(max(x, lo), hi)  # noqa: E731
    return [
        clip((math.log(pt * scale) - 1.7) * 0.7), clip((math.log(e * scale) - 2.0) * 0.7),
        clip((math.log(pt / raw["jet_pt"][j]) + 4.7) * 0.7), clip((math.log(e / raw["jet_energy"][j]) + 4.7) * 0.7),
        clip((math.hypot(deta, dphi) - 0.2) * 4.0),
        charge, float(charge != 0 and abs(pid) not in (11, 13)), float(charge == 0 and pid in (130,)),
        float(pid == 22), float(abs(pid) == 11), float(abs(pid) == 13),
        math.tanh(raw["part_d0val"][j, i]), clip(raw["part_d0err"][j, i], 0, 1),
        math.tanh(raw["part_dzval"][j, i]), clip(raw["part_dzerr"][j, i], 0, 1),
        deta, dphi,
    ]


@pytest.mark.parametrize("name", ["part_full", "sophon_full"])
def test_part_features_match_a_direct_computation(name):
    raw = raw_batch(name)
    batch = build_batch(raw, get_builder(name), max_length=10)
    for j in (0, 3):
        scale = 500.0 / float(raw["jet_pt"][j]) if name == "sophon_full" else 1.0
        for i in range(int(raw["part_n"][j])):
            expected = _part_full_by_hand(raw, j, i, scale)
            np.testing.assert_allclose(batch["features"][j, :, i], expected, rtol=2e-4, atol=2e-5)
            vector = [raw[k][j, i] * scale for k in ("part_px", "part_py", "part_pz", "part_energy")]
            np.testing.assert_allclose(batch["vectors"][j, :, i], vector, rtol=1e-6)
    kin = build_batch(raw, get_builder("part_kin"), max_length=10)["features"]
    kinpid = build_batch(raw, get_builder("part_kinpid"), max_length=10)["features"]
    if name == "part_full":
        full = batch["features"]
        np.testing.assert_array_equal(kin, full[:, [0, 1, 2, 3, 4, 15, 16]])
        np.testing.assert_array_equal(kinpid, full[:, [*range(11), 15, 16]])


def test_tau_candidate_features_match_a_direct_computation():
    raw = raw_batch("tau_cand")
    batch = build_batch(raw, get_builder("tau_cand"), max_length=10)
    for j in (1, 4):
        for i in range(int(raw["part_n"][j])):
            px, py, pz, e = (float(raw[k][j, i]) for k in ("part_px", "part_py", "part_pz", "part_energy"))
            eta, phi, pt = _eta_phi(px, py, pz)
            deta = abs(eta - float(raw["jet_eta"][j]))
            dphi = abs(_wrap(phi - float(raw["jet_phi"][j])))
            pid, charge = int(raw["part_pid"][j, i]), float(raw["part_charge"][j, i])
            expected = [deta, dphi, math.log(pt), math.log(e), math.log(pt / raw["jet_pt"][j]),
                        math.log(e / raw["jet_energy"][j]), math.hypot(deta, dphi), charge,
                        float(abs(pid) == 11), float(abs(pid) == 13), float(pid == 22),
                        float(charge != 0 and abs(pid) not in (11, 13)), float(charge == 0 and pid == 130),
                        raw["part_dzval"][j, i], raw["part_dzerr"][j, i], raw["part_d0val"][j, i],
                        raw["part_d0err"][j, i]]
            np.testing.assert_allclose(batch["features"][j, :, i], expected, rtol=2e-4, atol=2e-5)


def test_tau_ipsig_adds_signed_log_significances_to_the_tau_features():
    raw = raw_batch("tau_cand")
    raw["part_d0err"][1, 0] = raw["part_dzerr"][1, 0] = 0.0  # a neutral candidate: no track, no significance
    plain = build_batch(raw, get_builder("tau_cand"), max_length=10)["features"]
    batch = build_batch(raw, get_builder("tau_cand_ipsig"), max_length=10)
    extended = batch["features"]
    np.testing.assert_array_equal(extended[:, :17], plain)
    for j in range(len(raw["part_n"])):
        for i in range(int(raw["part_n"][j])):
            for c, (value, error) in ((17, ("part_dzval", "part_dzerr")), (18, ("part_d0val", "part_d0err"))):
                v, e = float(raw[value][j, i]), float(raw[error][j, i])
                expected = math.copysign(math.log1p(abs(v / e)), v) if e > 0 else 0.0
                assert extended[j, c, i] == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert (extended[:, 17:] * (1 - batch["mask"]) == 0).all()  # padding stays 0


def test_omnijet_constituents_drop_far_particles_and_compact():
    raw = raw_batch("omnijet_constituents", n=4, width=10)
    raw["part_px"][0, 1] *= -1  # send one particle to the other side of the jet (|delta phi| > 0.8)
    raw["part_py"][0, 1] *= -1
    batch = build_batch(raw, get_builder("omnijet_constituents"), max_length=10)
    j = 0
    px, py, pz = (raw[k][j, : raw["part_n"][j]].astype(np.float64) for k in ("part_px", "part_py", "part_pz"))
    jet_eta, jet_phi, _ = _eta_phi(px.sum(), py.sum(), pz.sum())
    expected = []
    for i in range(len(px)):
        eta, phi, pt = _eta_phi(px[i], py[i], pz[i])
        deta, dphi = eta - jet_eta, _wrap(phi - jet_phi)
        if abs(deta) < 0.8 and abs(dphi) < 0.8:
            expected.append([math.log(pt) - 1.8, 3 * deta, 3 * dphi])
    kept = int(batch["mask"][j, 0].sum())
    assert kept == len(expected) < raw["part_n"][j]
    np.testing.assert_allclose(batch["features"][j, :, :kept].T, expected, rtol=1e-4, atol=1e-5)
    assert np.all(batch["mask"][j, 0, kept:] == 0)


def test_max_length_truncates_to_the_leading_constituents():
    raw = raw_batch("part_kin", width=10)
    short = build_batch(raw, get_builder("part_kin"), max_length=4)
    full = build_batch(raw, get_builder("part_kin"), max_length=10)
    # equal up to 1 ulp: torch's vectorised atan2 (features._delta_phi) takes a different code path for the
    # elements of a row's vector tail, so the same angle can round differently at another batch width
    np.testing.assert_allclose(short["features"], full["features"][:, :, :4], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(short["mask"][:, 0].sum(1), np.minimum(raw["part_n"], 4))
