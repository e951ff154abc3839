"""`hepml data generate` / `hepml data plot` end to end: shards, the stored-column contract, reproducibility."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from hepml_dist.cli import app
from hepml_dist.data.manifest import read_manifest
from hepml_dist.data.reader import iter_shard_chunks

runner = CliRunner()

# The stored-column contract of docs/architecture.md, written out independently of the generators' schemas.
JET_COLUMNS = {
    **{c: ("float32", ("P",)) for c in ("part_px", "part_py", "part_pz", "part_energy", "part_charge", "part_d0val",
                                     "part_d0err", "part_dzval", "part_dzerr")},
    "part_pid": ("int32", ("P",)), "part_n": ("int32", ()),
    **{c: ("float32", ()) for c in ("jet_pt", "jet_eta", "jet_phi", "jet_energy", "jet_mass")},
}
CONTRACT = {
    "fcc-tau": {
        **JET_COLUMNS,
        **{c: ("int64", ()) for c in ("label_is_tau", "label_charge", "label_decay_mode")},
        **{f"target_{t}": ("float32", ()) for t in ("log_pt_ratio", "delta_eta", "sin_delta_phi", "cos_delta_phi",
                                                    "log_mass_ratio")},
        **{f"gen_tau_{v}": ("float32", ()) for v in ("pt", "eta", "phi", "mass")},
    },
    "jetclass-lite": {**JET_COLUMNS, "label_jet_class": ("int64", ())},
    "clic-events": {
        "elem_features": ("float32", ("E", 17)), "elem_n": ("int32", ()),
        "label_existence": ("int64", ("E",)), "label_particle_class": ("int64", ("E",)),
        **{f"target_{t}": ("float32", ("E",)) for t in ("pt", "eta", "sin_phi", "cos_phi", "energy")},
        **{f"genjet_{v}": ("float32", ("J",)) for v in ("pt", "eta", "phi", "energy")},
        "genjet_n": ("int32", ()), "gen_met": ("float32", ()),
    },
    "events-met": {
        "obj_features": ("float32", ("O", 6)), "obj_n": ("int32", ()),
        **{f"event_{v}": ("float32", ()) for v in ("ht", "met", "n_jets", "n_bjets")},
        "label_signal": ("int64", ()), "weight": ("float32", ()),
    },
}
# extra columns a process may add (classification by process, physical cross-section weights)
EXTRA = {"events-met": {"label_process": ("int64", ()), "gen_xsec_weight": ("float32", ())},
         "clic-events": {"gen_process": ("int32", ())}}
EVENTS = {"fcc-tau": 200, "jetclass-lite": 40, "clic-events": 30, "events-met": 200}


def generate(out, process="fcc-tau", events=300, seed=3, workers=1, *extra):
    result = runner.invoke(app, ["data", "generate", process, "--events", str(events), "--out", str(out),
                                 "--seed", str(seed), "--workers", str(workers), *extra])
    return result


def shard_checksums(path):
    manifest = json.loads((path / "manifest.json").read_text())
    return {s["path"]: s["sha256"] for split in manifest["splits"].values() for s in split["shards"]}


@pytest.fixture(scope="module")
def tau_dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "tau-a"
    result = generate(out)
    assert result.exit_code == 0, result.output
    return out, result.output


@pytest.mark.parametrize("process", list(CONTRACT))
def test_stored_columns_follow_the_contract(process, tmp_path):
    result = generate(tmp_path / process, process, EVENTS[process], 1, 1)
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / process)
    assert manifest.schema == process
    expected = {**CONTRACT[process], **EXTRA.get(process, {})}
    assert set(manifest.columns) == set(expected)
    lengths: dict[str, set[int]] = {}  # one padded length per symbolic axis (P, E, J, O)
    for name, (dtype, shape) in expected.items():
        column = manifest.columns[name]
        assert column.dtype == dtype, name
        assert len(column.shape) == len(shape), name
        for want, have in zip(shape, column.shape):
            if isinstance(want, int):
                assert have == want, name
            else:
                lengths.setdefault(want, set()).add(have)
    assert all(len(v) == 1 for v in lengths.values()), lengths
    # every split has examples, and the arrays in the shards are what the manifest says
    shard = next(s for s in manifest.splits["train"].shards)
    _, arrays = next(iter_shard_chunks(tmp_path / process / shard.path))
    for name, column in manifest.columns.items():
        assert arrays[name].dtype == np.dtype(column.dtype) and list(arrays[name].shape[1:]) == column.shape


def test_generate_writes_splits_and_reports(tau_dataset):
    out, output = tau_dataset
    manifest = read_manifest(out)
    counts = {split: info.examples for split, info in manifest.splits.items()}
    total = sum(counts.values())
    assert total > 400  # 300 events, ~2 jets each
    assert abs(counts["train"] / total - 0.7) < 0.08 and abs(counts["test"] / total - 0.2) < 0.07
    assert manifest.meta["generator"]["process"] == "fcc-tau" and manifest.meta["generator"]["seed"] == 3
    assert "events/s per core" in output and "label_decay_mode" in output


def test_same_seed_identical_shards_any_workers(tau_dataset, tmp_path):
    out, _ = tau_dataset
    result = generate(tmp_path / "tau-b", "fcc-tau", 300, 3, 2)
    assert result.exit_code == 0, result.output
    assert shard_checksums(out) == shard_checksums(tmp_path / "tau-b")
    assert (out / "manifest.json").read_bytes() == (tmp_path / "tau-b" / "manifest.json").read_bytes()


def test_different_seed_differs(tau_dataset, tmp_path):
    out, _ = tau_dataset
    result = generate(tmp_path / "tau-c", "fcc-tau", 300, 4, 1)
    assert result.exit_code == 0, result.output
    a, b = shard_checksums(out), shard_checksums(tmp_path / "tau-c")
    assert not set(a.values()) & set(b.values())


def test_plot_writes_a_png_per_column(tau_dataset, tmp_path):
    out, _ = tau_dataset
    result = runner.invoke(app, ["data", "plot", str(out), "--out", str(tmp_path / "plots")])
    assert result.exit_code == 0, result.output
    files = {p.stem: p for p in (tmp_path / "plots").glob("*.png")}
    assert set(read_manifest(out).columns) <= set(files)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000 for p in files.values())


@pytest.mark.parametrize("args, message", [
    (["no-such-process", "--events", "10"], "is not one of"),
    (["fcc-tau", "--events", "0"], "at least one event"),
    (["fcc-tau", "--events", "10", "--pythia", "Nonsense:key = 3"], "Pythia rejected"),
    (["fcc-tau", "--events", "10", "--fractions", "0.7,0.3"], "three fractions"),
])
def test_bad_input_is_a_clear_error(args, message, tmp_path):
    result = runner.invoke(app, ["data", "generate", *args, "--out", str(tmp_path / "x"), "--workers", "1"])
    assert result.exit_code == 2
    assert message in result.output


def test_existing_dataset_needs_overwrite(tau_dataset):
    out, _ = tau_dataset
    before = shard_checksums(out)
    result = generate(out, "fcc-tau", 50, 9, 1)
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert shard_checksums(out) == before  # nothing lost
