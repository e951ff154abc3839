"""JetClass-II-like data for Sophon: Sophon's label table and reweighting groups, the jetclass2-lite generator (labels,
soft-drop mass, options) and `hepml data weights` on its jets (flat in pT and m_SD within every group)."""

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from hepml_dist.cli import app
from hepml_dist.data.plot import read_examples
from hepml_dist.generate import jetclass2_lite as jc2
from hepml_dist.generate.jets import Jets, substructure
from hepml_dist.spec import load_job

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

# The label table of jet-universe/sophon 9dd6dd6 (README, figures/jetclass2_table.png; arXiv:2405.12972), as printed
# there: index = position, Res2P 0-14, Res34P 15-160, QCD 161-187 (q = u/d, m = mu, v = nu).
UPSTREAM_RES2P = "bb cc ss qq bc cs bq cq sq gg ee mm tauhtaue tauhtaum tauhtauh"
UPSTREAM_RES34P = (
    "bbbb bbcc bbss bbqq bbgg bbee bbmm bbtauhtaue bbtauhtaum bbtauhtauh bbb bbc bbs bbq bbg bbe bbm "
    "cccc ccss ccqq ccgg ccee ccmm cctauhtaue cctauhtaum cctauhtauh ccb ccc ccs ccq ccg cce ccm "
    "ssss ssqq ssgg ssee ssmm sstauhtaue sstauhtaum sstauhtauh ssb ssc sss ssq ssg sse ssm "
    "qqqq qqgg qqee qqmm qqtauhtaue qqtauhtaum qqtauhtauh qqb qqc qqs qqq qqg qqe qqm "
    "gggg ggee ggmm ggtauhtaue ggtauhtaum ggtauhtauh ggb ggc ggs ggq ggg gge ggm "
    "bee cee see qee gee bmm cmm smm qmm gmm btauhtaue ctauhtaue stauhtaue qtauhtaue gtauhtaue "
    "btauhtaum ctauhtaum stauhtaum qtauhtaum gtauhtaum btauhtauh ctauhtauh stauhtauh qtauhtauh gtauhtauh "
    "qqqb qqqc qqqs bbcq ccbs ccbq ccsq sscq qqbc qqbs qqcs bcsq bcs bcq bsq csq "
    "bcev csev bqev cqev sqev qqev bcmv csmv bqmv cqmv sqmv qqmv bctauev cstauev bqtauev cqtauev sqtauev qqtauev "
    "bctaumv cstaumv bqtaumv cqtaumv sqtaumv qqtaumv bctauhv cstauhv bqtauhv cqtauhv sqtauhv qqtauhv")
UPSTREAM_QCD = ("bbccss bbccs bbcc bbcss bbcs bbc bbss bbs bb bccss bccs bcc bcss bcs bc bss bs b ccss ccs cc css cs c "
                "ss s light")


def upstream_classes() -> list[str]:
    return ([f"X_{n}" for n in UPSTREAM_RES2P.split()] + [f"X_YY_{n}" for n in UPSTREAM_RES34P.split()]
            + [f"QCD_{n}" for n in UPSTREAM_QCD.split()])


def test_the_class_list_is_sophons_label_table():
    schema = yaml.safe_load((ROOT / "hepml_dist/data/schemas/jetclass2.yaml").read_text())["meta"]
    assert schema["classes"] == upstream_classes() and len(schema["classes"]) == 188
    assert jc2.CLASSES[:188] == upstream_classes() and jc2.CLASSES[188:] == ["X_bs"]
    assert {k: (r.start, r.stop - 1) for k, r in jc2.PARTS.items()} == {"Res2P": (0, 14), "Res34P": (15, 160),
                                                                        "QCD": (161, 187)}
    assert len(jc2.label_keys()) == 189  # every class is one distinct set of decay products


def _group_of(name: str) -> str:
    """Sophon's reweighting group of a class, from its name: quarks Q, e/mu l, taue/taum taul (JetClassII_full.yaml)."""
    if name.startswith("QCD"):
        return "QCD"
    kind, _, products = name.rpartition("_")
    tokens = re.findall(r"tau[hem]|[bcsqgemv]", products)
    tokens = ["Q" if t in "bcsq" else "l" if t in ("e", "m") else "taul" if t in ("taue", "taum") else t
              for t in tokens]
    return f"{kind}_{''.join(sorted(tokens, key=['Q', 'g', 'tauh', 'taul', 'l', 'v'].index))}"


def test_sophon_job_has_the_30_reweighting_groups():
    spec = load_job(ROOT / "jobs/sophon.yaml").data.reweight
    assert len(spec.groups) == 30
    assert sorted(label for g in spec.groups for label in g.labels) == list(range(188))  # each class once
    names = upstream_classes()
    for group in spec.groups:
        assert {_group_of(names[i]) for i in group.labels} == {group.name}, group.name
    weights = {g.name: g.weight for g in spec.groups}
    assert weights["X_QQ"] == 0.4 and weights["X_YY_QQQQ"] == 0.32 and weights["QCD"] == 0.25
    assert math.isclose(sum(weights.values()), 1.73175)


# ---- labels of hand-made decays -----------------------------------------------------------------------------------

def product(token, eta=0.0, phi=0.0):
    return jc2.Product(token, None if token == "v" else eta, None if token == "v" else phi)


def label_name(decay):
    index = decay.label(0.0, 0.0)  # a jet along eta = phi = 0
    return jc2.CLASSES[index] if index >= 0 else None


@pytest.mark.parametrize("products, ys, expected", [
    (["b", "b"], None, "X_bb"),
    (["c", ("s", 0.9)], None, None),                                   # one quark outside the jet
    (["tauh", "taum"], None, "X_tauhtaum"),
    (["taue", "taum"], None, None),                                    # no hadronic tau
    (["q", "s"], None, "X_sq"),
    (["b", "s"], None, "X_bs"),
    (None, [["b", "c"], ["e", "v"]], "X_YY_bcev"),
    (None, [["q", ("q", 1.0)], ["tauh", "v"]], None),                  # only 2 products in the jet
    (None, [["q", "q"], ["tauh", "v"]], "X_YY_qqtauhv"),
    (None, [["g", ("g", 1.0)], ["b", "b"]], "X_YY_bbg"),
    (None, [["c", "s"], ["tauh", ("taue", 1.2)]], None),               # Y -> tau tau needs both taus inside
    (None, [["e", "e"], ["m", "m"]], None),                            # both Y leptonic
    (None, [["q", "b"], ["s", "c"]], "X_YY_bcsq"),
])
def test_labels_follow_jetclass2_matching(products, ys, expected):
    def made(item):
        return product(item) if isinstance(item, str) else product(item[0], eta=item[1])

    decay = jc2.Decay(0, [made(p) for p in products or []], None if ys is None else [[made(p) for p in y] for y in ys])
    assert label_name(decay) == expected


# ---- soft-drop mass -------------------------------------------------------------------------------------------------

def _four(pt, y, phi, m=0.0):
    mt = math.hypot(pt, m)
    return np.array([pt * math.cos(phi), pt * math.sin(phi), mt * math.sinh(y), mt * math.cosh(y)])


def _mass(p):
    return math.sqrt(max(p[3] ** 2 - p[0] ** 2 - p[1] ** 2 - p[2] ** 2, 0.0))


def _rap_phi(p):
    return 0.5 * math.log((p[3] + p[2]) / (p[3] - p[2])), math.atan2(p[1], p[0])


def reference_soft_drop_mass(particles, z_cut=0.1):
    """Cambridge/Aachen by hand (merge the closest pair in rapidity-azimuth until one is left), then decluster:
    keep the harder branch while min(pT) / sum(pT) <= z_cut (beta = 0)."""
    nodes = [(p, None) for p in particles]
    while len(nodes) > 1:
        best = None
        for i in range(len(nodes)):
            for j in range(i + 1, len(nodes)):
                (yi, fi), (yj, fj) = _rap_phi(nodes[i][0]), _rap_phi(nodes[j][0])
                dphi = (fi - fj + math.pi) % (2 * math.pi) - math.pi
                d = (yi - yj) ** 2 + dphi ** 2
                best = min(best or (d, i, j), (d, i, j))
        _, i, j = best
        merged = (nodes[i][0] + nodes[j][0], (nodes[i], nodes[j]))
        nodes = [n for k, n in enumerate(nodes) if k not in (i, j)] + [merged]
    node = nodes[0]
    while node[1] is not None:
        a, b = node[1]
        pa, pb = math.hypot(*a[0][:2]), math.hypot(*b[0][:2])
        if min(pa, pb) / (pa + pb) > z_cut:
            break
        node = a if pa > pb else b
    return _mass(node[0])


HAND_MADE_JETS = [
    # two hard prongs (kept) and a soft wide-angle emission (groomed away)
    [_four(300, 0.0, 0.0), _four(200, 0.25, 0.1), _four(8, -0.6, 0.55)],
    # an asymmetric split below z_cut: the soft prong goes, what is left is one particle (mass 0)
    [_four(500, 0.1, 0.0, 0.14), _four(30, 0.5, -0.3)],
    # three prongs spread over the jet, all above z_cut, particles farther apart than 0.8 from each other
    [_four(150, -0.7, 0.0), _four(120, 0.6, 0.2), _four(90, 0.0, -0.75), _four(3, 0.0, 0.0)],
    # a single particle
    [_four(250, 1.0, 2.0, 0.5)],
]


def test_soft_drop_mass_matches_an_independent_computation():
    flat = np.concatenate(HAND_MADE_JETS)
    counts = [len(j) for j in HAND_MADE_JETS]
    offsets = np.concatenate([[0], np.cumsum(counts)])
    totals = np.array([np.sum(j, axis=0) for j in HAND_MADE_JETS])
    jets = Jets(np.arange(len(counts)), totals[:, 0], totals[:, 1], totals[:, 2], totals[:, 3], offsets,
                np.arange(len(flat)))
    mass, taus = substructure(jets, flat[:, 0], flat[:, 1], flat[:, 2], flat[:, 3], radius=0.8)
    expected = [reference_soft_drop_mass(list(j)) for j in HAND_MADE_JETS]
    np.testing.assert_allclose(mass, expected, rtol=1e-6, atol=1e-6)
    assert expected[0] < _mass(totals[0]) - 1 and expected[0] > 50  # the groomed emission mattered
    assert expected[1] < 1.0 and expected[2] > 100
    assert taus.shape == (4, 4) and np.all(np.diff(taus[2], axis=0) <= 1e-9)  # tau_N falls with N


# ---- the generator end to end ---------------------------------------------------------------------------------------

EVENTS = 600


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("jetclass2") / "lite"
    start = time.perf_counter()
    result = runner.invoke(app, ["data", "generate", "jetclass2-lite", "--events", str(EVENTS), "--out", str(out),
                                 "--workers", "1", "--seed", "5"])
    assert result.exit_code == 0, result.output
    assert time.perf_counter() - start < 30
    columns = {}
    for split in ("train", "val", "test"):
        part, manifest = read_examples(out, split, 10**6)
        for name, values in part.items():
            columns.setdefault(name, []).append(values)
    return out, {k: np.concatenate(v) for k, v in columns.items()}, manifest


def test_generated_jets_have_sophon_labels_and_substructure(generated):
    _, jets, manifest = generated
    labels = jets["label_jet_class"]
    assert len(labels) > 600  # ~1.5 jets per event
    assert labels.min() >= 0 and labels.max() <= 187  # X_bs only when asked for
    for part, indices in jc2.PARTS.items():
        assert np.isin(labels, indices).mean() > 0.15, part
    assert np.array_equal(jets["label_resonant"], (labels < 161).astype(np.int64))
    assert len(np.unique(labels)) > 60  # many of the 188 classes, each with its Sophon index
    assert manifest.meta["generator"]["classes"]["label_jet_class"][:188] == upstream_classes()
    assert manifest.meta["generator"]["options"] == {"classes": list(range(188)), "mass_range": [15.0, 250.0]}
    pt, sdmass = jets["jet_pt"], jets["jet_sdmass"]
    assert np.all((pt > 200) & (pt < 2500)) and np.all(np.abs(jets["jet_eta"]) < 2.5)
    assert np.all(sdmass <= jets["jet_mass"] * (1 + 1e-5) + 1e-3) and np.all(sdmass >= 0)
    assert np.all(jets["jet_nparticles"] >= jets["part_n"])
    res2p = np.isin(labels, jc2.PARTS["Res2P"]) & (labels < 9)  # X -> quark pairs: the mass peaks at m_X
    assert 15 < np.median(sdmass[res2p]) < 250
    assert np.median(sdmass[res2p]) > 3 * np.median(sdmass[labels >= 161])  # QCD jets are light
    tau = np.stack([jets[f"jet_tau{n}"] for n in range(1, 5)], axis=1)
    assert np.mean(np.all(np.diff(tau, axis=1) <= 1e-6, axis=1)) > 0.99


def test_weights_are_flat_in_pt_and_sdmass_within_each_group(generated, tmp_path):
    out, jets, _ = generated
    groups = [{"name": name, "labels": list(indices), "weight": w}
              for (name, indices), w in zip(jc2.PARTS.items(), (0.555, 0.92325, 0.25))]  # Sophon's sums per part
    reweight = {"variables": ["jet_pt", "jet_sdmass"], "threshold_percentile": 0.0, "groups": groups,
                "bins": {"jet_pt": [200, 500, 2500], "jet_sdmass": [20, 80, 500]}}
    job = tmp_path / "weights-job.yaml"
    job.write_text(yaml.safe_dump({"extends": str(ROOT / "jobs/sophon-quickstart.yaml"),
                                    "data": {"reweight": reweight}}))
    result = runner.invoke(app, ["data", "weights", str(out), "--job", str(job),
                                 "--split", "train", "--split", "val", "--split", "test"])
    assert result.exit_code == 0, result.output
    [table_file] = (out / "weights").glob("reweight-*.json")
    assert table_file.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tables = json.loads(table_file.read_text())["tables"]

    ix = np.digitize(jets["jet_pt"], reweight["bins"]["jet_pt"]) - 1
    iy = np.digitize(jets["jet_sdmass"], reweight["bins"]["jet_sdmass"]) - 1
    inside = (ix >= 0) & (ix < 2) & (iy >= 0) & (iy < 2)
    yields, checked = {}, 0
    for group in groups:
        member = inside & np.isin(jets["label_jet_class"], group["labels"])
        weight = np.asarray(tables[group["name"]])[ix[member], iy[member]]
        raw = np.zeros((2, 2))
        weighted = np.zeros((2, 2))
        np.add.at(raw, (ix[member], iy[member]), 1)
        np.add.at(weighted, (ix[member], iy[member]), weight)
        populated = weighted[raw >= 50]
        if len(populated) >= 2:
            checked += 1
            assert populated.max() / populated.min() <= 1.25, (group["name"], raw, weighted)
        yields[group["name"]] = weighted.sum()
    assert checked >= 2  # not vacuous: at least two groups have two bins of >= 50 jets
    total = sum(yields.values())
    for group in groups:
        expected = group["weight"] / sum(g["weight"] for g in groups)
        assert abs(yields[group["name"]] / total - expected) < 0.02, (group["name"], yields)


def test_class_selection_and_x_bs(tmp_path):
    out = tmp_path / "xbs"
    result = runner.invoke(app, ["data", "generate", "jetclass2-lite", "--events", "200", "--out", str(out),
                                 "--workers", "1", "--classes", "X_bs,QCD_light"])
    assert result.exit_code == 0, result.output
    columns, _ = read_examples(out, "train", 10**6)
    assert set(np.unique(columns["label_jet_class"])) == {188, 187}  # X_bs (extra index), QCD_light
    assert np.array_equal(columns["label_resonant"], (columns["label_jet_class"] == 188).astype(np.int64))


@pytest.mark.parametrize("args, message", [
    (["jetclass2-lite", "--classes", "X_bb,X_zz"], "X_zz"),
    (["jetclass2-lite", "--mass-range", "120,80"], "empty"),
    (["jetclass2-lite", "--mass-range", "5,80"], "10-1000"),
    (["fcc-tau", "--classes", "X_bb"], "--classes"),
])
def test_bad_options_exit_2_naming_them(args, message, tmp_path):
    result = runner.invoke(app, ["data", "generate", *args, "--events", "10", "--out", str(tmp_path / "x"),
                                 "--workers", "1"])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "x").exists()

