"""Converters: ROOT and parquet -> shards -> batches keeps every value; schemas; resume; the CLI commands."""

import awkward as ak
import numpy as np
import pyarrow.parquet as pq
import pytest
import uproot
import yaml
from data_helpers import JETCLASS_LABELS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from hepml_dist.cli import app
from hepml_dist.data import convert as convert_module
from hepml_dist.data.convert import convert, load_schema, shipped_schemas
from hepml_dist.data.manifest import read_manifest
from hepml_dist.data.stream import ShardStream
from hepml_dist.errors import UserError
from hepml_dist.spec.data import DataSpec

PARTICLE = ["part_px", "part_py", "part_pz", "part_energy", "part_charge", "part_d0val", "part_d0err",
            "part_dzval", "part_dzerr"]
FLAGS = ["part_isChargedHadron", "part_isNeutralHadron", "part_isPhoton", "part_isElectron", "part_isMuon"]


def jetclass_columns(counts, rng, label):
    """JetClass-like branches: jagged particles (pT-ordered), jet scalars, one-hot labels, and an index."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    pt = np.sort(rng.exponential(10, total).astype(np.float32) + 0.5)[::-1].copy()
    values = {name: rng.normal(size=total).astype(np.float32) for name in PARTICLE}
    values["part_px"], values["part_py"] = pt * 0.6, pt * 0.8  # so hypot(px, py) = pt: known order
    kind = rng.integers(0, 5, total)
    values["part_charge"] = np.where(kind == 0, 1, 0).astype(np.float32)
    for k, flag in enumerate(FLAGS):
        values[flag] = (kind == k).astype(np.float32)
    jagged = {k: ak.unflatten(v, counts) for k, v in values.items()}
    # within a jet, the order must be pT-descending for the comparison: sort each jet explicitly
    order = ak.argsort(np.hypot(jagged["part_px"], jagged["part_py"]), axis=1, ascending=False)
    jagged = {k: v[order] for k, v in jagged.items()}
    n = len(counts)
    scalars = {"jet_pt": rng.uniform(500, 1000, n), "jet_eta": rng.normal(size=n), "jet_phi": rng.uniform(-3, 3, n),
               "jet_energy": rng.uniform(1000, 3000, n), "jet_sdmass": rng.uniform(0, 300, n),
               "jet_nparticles": counts.astype(np.float32), "jet_index": np.arange(n, dtype=np.float32)}
    scalars = {k: np.asarray(v, dtype=np.float32) for k, v in scalars.items()}
    labels = {name: np.full(n, float(i == label), dtype=np.float32) for i, name in enumerate(JETCLASS_LABELS)}
    return jagged, scalars, labels


def write_root(path, counts, seed, label):
    jagged, scalars, labels = jetclass_columns(counts, np.random.default_rng(seed), label)
    # a record of jagged fields under "part" becomes the branches part_<field> with one counter, npart
    particles = ak.zip({k.removeprefix("part_"): v for k, v in jagged.items()})
    with uproot.recreate(path) as f:
        f.mktree("tree", {"part": particles.type.content, **{k: "float32" for k in {**scalars, **labels}}})
        f["tree"].extend({"part": particles, **scalars, **labels})
    return jagged, scalars


def schema_with_index(tmp_path, base="jetclass", max_length=128):
    """The shipped schema plus jet_index (to match examples), as a schema file: tests the file path too."""
    schema = load_schema(base).model_dump(mode="json", exclude_none=True)
    schema["columns"]["jet_index"] = "jet_index"
    schema["jagged"][0]["max_length"] = max_length
    path = tmp_path / f"{base}-indexed.yaml"
    path.write_text(yaml.safe_dump(schema))
    return path


def stream_all(root, split, features="part_full", max_length=128):
    spec = DataSpec(**{"train": str(root / "train"), split: str(root / split)}, batch_size=64, loader_workers=0,
                    inputs={"features": features, "max_length": max_length})
    stream = ShardStream(spec, split, rank=0, world_size=1, seed=0, training=False)
    return list(stream.batches(0))


def check_jets_survive(root, jagged, scalars, max_length=128):
    seen = 0
    for split in ("train", "val", "test"):
        if not read_manifest(root).splits[split].shards:
            continue
        for batch in stream_all(root, split, max_length=max_length):
            index = batch["jet_index"].numpy().astype(int)
            seen += len(index)
            for row, j in enumerate(index):
                n = min(len(jagged["part_px"][j]), max_length)
                assert int(batch["mask"][row, 0].sum()) == n
                for c, name in enumerate(["part_px", "part_py", "part_pz", "part_energy"]):
                    expected = np.asarray(jagged[name][j][:n])
                    np.testing.assert_array_equal(batch["vectors"][row, c, :n].numpy(), expected)
                    assert not batch["vectors"][row, c, n:].any()
                charge = np.asarray(jagged["part_charge"][j][:n])
                np.testing.assert_array_equal(batch["features"][row, 5, :n].numpy(), charge)
            for name in ("jet_pt", "jet_eta", "jet_sdmass"):
                np.testing.assert_array_equal(batch[name].numpy(), scalars[name][index])
    return seen


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(counts=st.lists(st.integers(min_value=0, max_value=40), min_size=30, max_size=120),
       seed=st.integers(0, 1000))
def test_root_to_shards_to_batches_keeps_every_value(tmp_path_factory, counts, seed):
    tmp_path = tmp_path_factory.mktemp("root")
    jagged, scalars = write_root(tmp_path / "a.root", counts, seed, label=2)
    manifest = convert([tmp_path / "a.root"], tmp_path / "ds", load_schema(schema_with_index(tmp_path, max_length=32)),
                       shard_size=40, chunk_size=16, step_size=25)
    assert manifest.columns["part_px"].shape == [32]
    assert sum(s.examples for s in manifest.splits.values()) == len(counts)
    assert check_jets_survive(tmp_path / "ds", jagged, scalars, max_length=32) == len(counts)
    assert all(set(s.class_counts["label_jet_class"]) == {"2"} for s in manifest.splits.values() if s.shards)


def test_two_root_files_are_interleaved_and_reproducible_with_workers(tmp_path):
    rng = np.random.default_rng(0)
    write_root(tmp_path / "a.root", rng.integers(1, 30, 300), 1, label=0)
    write_root(tmp_path / "b.root", rng.integers(1, 30, 300), 2, label=5)
    schema = load_schema("jetclass")
    first = convert([tmp_path / "a.root", tmp_path / "b.root"], tmp_path / "one", schema, shard_size=100,
                    chunk_size=50, step_size=60, workers=0)
    second = convert([tmp_path / "a.root", tmp_path / "b.root"], tmp_path / "two", schema, shard_size=100,
                     chunk_size=50, step_size=60, workers=2)
    assert [s.sha256 for s in first.splits["train"].shards] == [s.sha256 for s in second.splits["train"].shards]
    for shard in first.splits["train"].shards[:-1]:  # both classes in every full shard: the inputs were mixed
        from hepml_dist.data.reader import iter_shard_chunks

        labels = np.concatenate([a["label_jet_class"] for _, a in
                                 iter_shard_chunks(tmp_path / "one" / shard.path, columns=["label_jet_class"])])
        assert set(labels.tolist()) == {0, 5}
    # the pid comes from the flags with the charge sign
    pids = np.concatenate([a["part_pid"] for _, a in iter_shard_chunks(
        tmp_path / "one" / first.splits["train"].shards[0].path, columns=["part_pid"])])
    assert set(np.unique(pids).tolist()) <= {0, 11, -11, 13, -13, 22, 130, 211, -211}


def write_parquet_jetclass2(path, counts, seed):
    jagged, scalars, _ = jetclass_columns(counts, np.random.default_rng(seed), 0)
    columns = {**jagged, **scalars, "jet_label": np.random.default_rng(seed).integers(0, 188, len(counts))}
    ak.to_parquet(ak.zip(columns, depth_limit=1), path, row_group_size=50)
    return jagged, scalars


def test_parquet_jetclass2_keeps_every_value(tmp_path):
    counts = np.random.default_rng(5).integers(0, 50, 230)
    jagged, scalars = write_parquet_jetclass2(tmp_path / "j2.parquet", counts, 5)
    assert pq.ParquetFile(tmp_path / "j2.parquet").metadata.num_row_groups == 5
    convert([tmp_path / "j2.parquet"], tmp_path / "ds", load_schema(schema_with_index(tmp_path, "jetclass2")),
            shard_size=64, chunk_size=32, step_size=100)
    assert check_jets_survive(tmp_path / "ds", jagged, scalars) == len(counts)


def write_fcc_tau(path, n, seed):
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 30, n)
    total = counts.sum()

    def p4(size):
        return ak.zip({"x": rng.normal(size=size), "y": rng.normal(size=size), "z": rng.normal(size=size),
                       "tau": rng.uniform(5, 10, size=size)})

    dm = rng.choice([-1, 0, 1, 2, 10, 11, 16], n)
    table = {
        "reco_cand_p4s": ak.unflatten(p4(total), counts),
        "reco_cand_charges": ak.unflatten(rng.integers(-1, 2, total).astype(np.float32), counts),
        "reco_cand_pdgs": ak.unflatten(rng.choice([11, 13, 22, 211, 130], total), counts),
        "reco_cand_dz": ak.unflatten(rng.normal(size=total), counts),
        "reco_cand_dz_error": ak.unflatten(rng.uniform(size=total), counts),
        "reco_cand_dxy": ak.unflatten(np.where(rng.uniform(size=total) < 0.1, np.nan, rng.normal(size=total)), counts),
        "reco_cand_dxy_error": ak.unflatten(rng.uniform(size=total), counts),
        "reco_jet_p4": p4(n), "gen_jet_tau_p4": p4(n),
        "gen_jet_tau_decaymode": dm, "gen_jet_tau_charge": np.where(dm >= 0, rng.choice([-1, 1], n), 0),
    }
    ak.to_parquet(ak.zip(table, depth_limit=1), path, row_group_size=64)
    return table


def test_parquet_fcc_tau_labels_targets_and_selection(tmp_path):
    table = write_fcc_tau(tmp_path / "tau.parquet", 400, 3)
    manifest = convert([tmp_path / "tau.parquet"], tmp_path / "ds", load_schema("fcc-tau"), splits=(1, 0, 0),
                       shard_size=128, chunk_size=64, step_size=128)
    kept = np.asarray(table["gen_jet_tau_decaymode"]) != 16
    assert manifest.splits["train"].examples == kept.sum()
    assert "weight" not in manifest.columns  # optional column, absent from these files
    from hepml_dist.data.reader import iter_shard_chunks

    data = [a for s in manifest.splits["train"].shards for _, a in iter_shard_chunks(tmp_path / "ds" / s.path)]
    data = {k: np.concatenate([d[k] for d in data]) for k in data[0]}
    is_tau = data["label_is_tau"] == 1
    assert set(np.unique(data["label_decay_mode"][is_tau])) <= {0, 1, 2, 3, 4}
    assert np.all(data["label_decay_mode"][~is_tau] == -1) and np.all(data["label_charge"][~is_tau] == -1)
    assert np.all(data["target_log_pt_ratio"][~is_tau] == 0) and np.all(data["target_cos_delta_phi"][~is_tau] == 1)
    assert np.isfinite(data["part_d0val"]).all()  # NaN impact parameters were filled by finite_or
    # candidates come out pT-ordered (pT = hypot of the record's x and y)
    pt = np.hypot(data["part_px"], data["part_py"])
    real = np.arange(20)[None, :] < data["part_n"][:, None]
    assert np.all((np.diff(pt, axis=1) <= 1e-5) | ~real[:, 1:])
    batch = stream_all(tmp_path / "ds", "train", features="tau_cand", max_length=20)[0]
    assert batch["features"].shape[1:] == (17, 20)


def test_interrupted_conversion_resumes_to_the_same_dataset(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        write_root(tmp_path / f"{name}.root", rng.integers(1, 20, 400), ord(name), label=1)
    inputs = [tmp_path / "a.root", tmp_path / "b.root"]
    options = dict(shard_size=60, chunk_size=30, step_size=50)
    reference = convert(inputs, tmp_path / "ref", load_schema("jetclass"), **options)
    real_task = convert_module.convert_task
    calls = {"n": 0}

    def crashing(task, schema):
        calls["n"] += 1
        if calls["n"] == 12:
            raise KeyboardInterrupt
        return real_task(task, schema)

    monkeypatch.setattr(convert_module, "convert_task", crashing)
    with pytest.raises(KeyboardInterrupt):
        convert(inputs, tmp_path / "out", load_schema("jetclass"), **options)
    assert (tmp_path / "out" / ".partial" / "state.json").exists()
    assert not (tmp_path / "out" / "manifest.json").exists()
    monkeypatch.setattr(convert_module, "convert_task", real_task)
    calls["n"] = 0
    resumed = convert(inputs, tmp_path / "out", load_schema("jetclass"), **options)
    for split in ("train", "val", "test"):
        assert [s.sha256 for s in resumed.splits[split].shards] == [s.sha256 for s in reference.splits[split].shards]


def test_schemas_ship_and_bad_ones_are_explained(tmp_path):
    assert {"jetclass", "jetclass2", "fcc-tau", "clic-events"} <= set(shipped_schemas())
    for name in shipped_schemas():
        load_schema(name)
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nformat: root\ntree: t\ncolumns: {a: __import__('os')}\n")
    with pytest.raises(UserError, match="unknown function"):
        load_schema(bad)
    bad.write_text("name: x\nformat: csv\n")
    with pytest.raises(UserError, match="format"):
        load_schema(bad)
    with pytest.raises(UserError, match="shipped schema"):
        load_schema("no-such-schema")


def test_missing_branch_is_named(tmp_path):
    with uproot.recreate(tmp_path / "x.root") as f:
        f.mktree("tree", {"jet_pt": "float32"})
        f["tree"].extend({"jet_pt": np.ones(5, np.float32)})
    with pytest.raises(UserError, match="missing input branch.*part_px"):
        convert([tmp_path / "x.root"], tmp_path / "ds", load_schema("jetclass"))


def test_cli_convert_verify_inspect(tmp_path):
    write_root(tmp_path / "a.root", np.random.default_rng(2).integers(1, 20, 300), 3, label=4)
    runner = CliRunner()
    result = runner.invoke(app, ["data", "convert", str(tmp_path / "a.root"), "--out", str(tmp_path / "ds"),
                                 "--schema", "jetclass", "--shard-size", "50", "--workers", "0"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["data", "verify", str(tmp_path / "ds")])
    assert result.exit_code == 0 and "all match" in result.output
    result = runner.invoke(app, ["data", "inspect", str(tmp_path / "ds")])
    assert result.exit_code == 0 and "part_px" in result.output and "label_jet_class" in result.output
    shard = read_manifest(tmp_path / "ds").splits["test"].shards[0]
    data = bytearray((tmp_path / "ds" / shard.path).read_bytes())
    data[-3000] ^= 0x20
    (tmp_path / "ds" / shard.path).write_bytes(bytes(data))
    result = runner.invoke(app, ["data", "verify", str(tmp_path / "ds")])
    assert result.exit_code == 1 and shard.path in result.output
    result = runner.invoke(app, ["data", "convert", str(tmp_path / "a.root"), "--out", str(tmp_path / "ds"),
                                 "--schema", "jetclass"])
    assert result.exit_code == 2 and "--overwrite" in result.output
