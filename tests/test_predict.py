"""`hepml predict`: the file it writes holds, row by row, what the model computes in-process on the same jets
(scores, regression outputs, truth, observers), for shards and for raw ROOT/parquet files through a schema, in
ROOT and parquet, in input order (also when spread over Ray actors)."""

import json

import awkward as ak
import numpy as np
import pytest
import torch
import uproot
import yaml
from train_helpers import MAX_PARTICLES, ray_session, tiny_job, write_jet_dataset  # noqa: F401 (fixture)
from typer.testing import CliRunner

from hepml_dist.cli import app
from hepml_dist.data import features as feats
from hepml_dist.data.stream import ShardStream
from hepml_dist.inference.predict import predict
from hepml_dist.models import build_model
from hepml_dist.runs import write_model_checkpoint
from hepml_dist.spec import parse_spec

SCORES = ["score_is_signal_bkg", "score_is_signal_sig"]
REGRESSION = "size_log_n_pred"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run directory with one checkpoint of a (randomly initialised) two-task ParT, and its dataset."""
    root = tmp_path_factory.mktemp("predict")
    data = write_jet_dataset(root / "data", examples=700, chunk_size=64, chunks_per_shard=2)
    spec = parse_spec(tiny_job(data, data={"batch_size": 50}))
    torch.manual_seed(3)
    model = build_model(spec).eval()
    write_model_checkpoint(root / "run" / "checkpoints" / "step-00000001", spec, model, {"step": 1})
    return root / "run", data, spec, model


def read_output(path):
    if path.suffix == ".root":
        return uproot.open(path)["Events"].arrays(library="np")
    table = ak.from_parquet(path)
    return {name: ak.to_numpy(table[name]) for name in ak.fields(table)}


def model_on(model, batch):
    with torch.no_grad():
        out = model(batch)
    return torch.softmax(out["is_signal"], dim=-1).numpy(), out["size"][:, 0].numpy()


@pytest.mark.parametrize("suffix", [".parquet", ".root"])
def test_shards_match_the_model_in_process(trained, tmp_path, suffix):
    run, data, spec, model = trained
    out = tmp_path / f"pred{suffix}"
    summary = predict(run, [str(data / "test")], out, observers=["jet_pt", "jet_mass"])
    got = read_output(out)
    assert set(got) == {*SCORES, REGRESSION, "label_is_signal", "target_log_n", "jet_pt", "jet_mass"}

    # reference: the job's own evaluation loader (stored order), the model called directly
    stream = ShardStream(spec.data, "test", rank=0, world_size=1, seed=0, training=False)
    expected = {k: [] for k in ("scores", "size", "jet_pt", "label")}
    for batch in stream.batches(0):
        scores, size = model_on(model, batch)
        expected["scores"].append(scores)
        expected["size"].append(size)
        expected["jet_pt"].append(batch["jet_pt"].numpy())
        expected["label"].append(batch["label_is_signal"].numpy())
    expected = {k: np.concatenate(v) for k, v in expected.items()}
    assert summary["rows"] == len(expected["label"]) == stream.examples
    np.testing.assert_allclose(got[SCORES[0]], expected["scores"][:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[SCORES[1]], expected["scores"][:, 1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[SCORES[0]] + got[SCORES[1]], 1.0, atol=1e-5)
    np.testing.assert_allclose(got[REGRESSION], expected["size"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got["jet_pt"], expected["jet_pt"])
    np.testing.assert_array_equal(got["label_is_signal"], expected["label"])
    assert got["label_is_signal"].dtype == np.int64


# ----------------------------------------------------------------------------------------------------------------
# Raw files through a schema


SCHEMA = {
    "name": "test-raw-jets",
    "format": "root",
    "tree": "Events",
    "selection": "jet_pt > 40",
    "jagged": [{
        "count": "part_n", "max_length": MAX_PARTICLES,
        "columns": {"part_px": "pf_px", "part_py": "pf_py", "part_pz": "pf_pz", "part_energy": "pf_e",
                    "part_charge": "pf_q", "part_pid": {"expr": "pf_pid", "dtype": "int32"},
                    "part_d0val": "pf_px * 0", "part_d0err": "pf_px * 0", "part_dzval": "pf_px * 0",
                    "part_dzerr": "pf_px * 0"},
    }],
    "columns": {"jet_pt": "jet_pt", "jet_eta": "jet_eta", "jet_phi": "jet_phi", "jet_energy": "jet_energy",
                "label_is_signal": "is_sig"},
}


def raw_events(seed: int, n: int, first_event: int) -> dict:
    """Jets with a variable number of constituents, as an ntuple would hold them (one entry per jet)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, MAX_PARTICLES + 4, n)  # some longer than max_length: truncated by the schema
    total = int(counts.sum())
    pt = rng.exponential(20.0, total) + 1.0
    phi, eta = rng.uniform(-np.pi, np.pi, total), rng.normal(0, 1, total)
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    q = rng.choice([-1.0, 0.0, 1.0], total)

    def jag(x, dtype=np.float32):
        return ak.unflatten(np.asarray(x, dtype=dtype), counts)

    jet_pt = np.hypot(ak.to_numpy(ak.sum(jag(px), axis=1)), ak.to_numpy(ak.sum(jag(py), axis=1))).astype(np.float32)
    return {
        "event": np.arange(first_event, first_event + n, dtype=np.int64) * 1_000_003,  # beyond float32 precision
        "pf_px": jag(px), "pf_py": jag(py), "pf_pz": jag(pz), "pf_e": jag(np.sqrt(px**2 + py**2 + pz**2)),
        "pf_q": jag(q), "pf_pid": jag(np.where(q != 0, 211 * q, 22), np.int32),
        "jet_pt": jet_pt, "jet_eta": rng.normal(0, 1, n).astype(np.float32),
        "jet_phi": rng.uniform(-np.pi, np.pi, n).astype(np.float32),
        "jet_energy": (jet_pt * 1.3).astype(np.float32), "is_sig": rng.integers(0, 2, n),
    }


def write_raw(folder, fmt: str) -> list:
    files = []
    for i, n in enumerate((130, 90)):
        events = raw_events(seed=10 + i, n=n, first_event=1000 * i)
        if fmt == "root":
            path = folder / f"jets_{i}.root"
            with uproot.recreate(path) as f:  # a TTree, as ntuples are (uproot's default would be an RNTuple)
                tree = f.mktree("Events", {k: v.type if isinstance(v, ak.Array) else v.dtype for k, v in events.items()})
                tree.extend(events)
        else:
            path = folder / f"jets_{i}.parquet"
            ak.to_parquet(ak.zip(events, depth_limit=1), path, row_group_size=40)
        files.append(path)
    return files


def expected_from_raw(files, fmt, spec, model):
    """The schema by hand (selection, truncation to max_length), the loader's feature builder, the model."""
    scores, events = [], []
    for path in files:
        e = (uproot.open(path)["Events"].arrays(library="ak") if fmt == "root" else ak.from_parquet(path))
        keep = ak.to_numpy(e["jet_pt"]) > 40
        e = e[keep]
        n = ak.to_numpy(ak.num(e["pf_px"]))
        length = MAX_PARTICLES

        def pad(x, dtype=np.float32):
            return ak.to_numpy(ak.fill_none(ak.pad_none(x[:, :length], length, clip=True), 0)).astype(dtype)

        zero = np.zeros((len(n), length), np.float32)
        raw = {"part_n": np.minimum(n, length).astype(np.int32), "part_px": pad(e["pf_px"]), "part_py": pad(e["pf_py"]),
               "part_pz": pad(e["pf_pz"]), "part_energy": pad(e["pf_e"]), "part_charge": pad(e["pf_q"]),
               "part_pid": pad(e["pf_pid"], np.int32), "part_d0val": zero, "part_d0err": zero, "part_dzval": zero,
               "part_dzerr": zero}
        raw |= {k: ak.to_numpy(e[k]).astype(np.float32) for k in ("jet_pt", "jet_eta", "jet_phi", "jet_energy")}
        batch = feats.to_torch(feats.build_batch(raw, feats.get_builder("part_full"), max_length=length))
        scores.append(model_on(model, batch)[0])
        events.append(ak.to_numpy(e["event"]))
    return np.concatenate(scores), np.concatenate(events)


@pytest.mark.parametrize("fmt", ["root", "parquet"])
def test_raw_files_through_a_schema_in_input_order(trained, tmp_path, fmt):
    run, _, spec, model = trained
    files = write_raw(tmp_path, fmt)
    schema = tmp_path / "schema.yaml"
    schema.write_text(yaml.safe_dump({**SCHEMA, "format": fmt}))
    out = tmp_path / "pred.root"
    # several work units per file (step 40): rows must still come out file by file, entry by entry
    result = CliRunner().invoke(app, ["predict", str(run), "--data", str(tmp_path / f"jets_*.{fmt[:4]}*"), "--out",
                                      str(out), "--schema", str(schema), "--observers", "event,jet_pt",
                                      "--step-size", "40", "--batch-size", "16"])
    assert result.exit_code == 0, result.output
    got = read_output(out)
    assert uproot.open(out)["Events"].classname == "TTree"
    scores, events = expected_from_raw(files, fmt, spec, model)
    np.testing.assert_array_equal(got["event"], events)  # input order, selection applied, exact int64
    assert got["event"].dtype == np.int64
    np.testing.assert_allclose(got[SCORES[1]], scores[:, 1], rtol=1e-5, atol=1e-6)
    assert "label_is_signal" in got and "target_log_n" not in got  # truth the input has


def test_bad_input_gives_clear_errors(trained, tmp_path):
    run, data, _, _ = trained
    runner = CliRunner()
    result = runner.invoke(app, ["predict", str(run), "--data", str(data / "test"), "--out", str(tmp_path / "x.csv")])
    assert result.exit_code == 2 and ".root or .parquet" in result.output
    result = runner.invoke(app, ["predict", str(run), "--data", str(data / "test"), "--out", str(tmp_path / "x.root"),
                                 "--observers", "jet_sdmass"])
    assert result.exit_code == 2 and "jet_sdmass" in result.output and "jet_pt" in result.output
    result = runner.invoke(app, ["predict", str(tmp_path / "nowhere"), "--data", str(data / "test"), "--out",
                                 str(tmp_path / "x.root")])
    assert result.exit_code == 2 and "nowhere" in result.output
    assert not list(tmp_path.glob("*.root")) and not list(tmp_path.glob(".*.tmp"))  # nothing half-written


@pytest.mark.integration
def test_ray_workers_keep_input_order(trained, tmp_path, ray_session):
    run, data, _, _ = trained
    single, spread = tmp_path / "one.parquet", tmp_path / "ray.parquet"
    predict(run, [str(data / "train")], single, observers=["jet_pt"])
    summary = predict(run, [str(data / "train")], spread, observers=["jet_pt"], workers=2)
    assert summary["units"] >= 3  # several shards spread over 2 actors
    a, b = read_output(single), read_output(spread)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(b[key], a[key], rtol=1e-6, atol=1e-7, err_msg=key)
    assert json.dumps(summary)  # the summary is plain data


# ----------------------------------------------------------------------------------------------------------------
# Every model family: per-element outputs (MLPF), event features (AOT), token inputs (OmniJet-alpha)


def _token_dataset(folder, n=90, length=32, vocab=514, seed=0):
    """OmniJet token sequences (start 0, codes, stop vocab-1), as `hepml data tokenize` writes them."""
    from hepml_dist.data.writer import DatasetWriter

    rng = np.random.default_rng(seed)
    counts = rng.integers(3, length + 1, n)
    tokens = np.zeros((n, length), np.int64)
    for row, count in zip(tokens, counts):
        row[1:count - 1] = rng.integers(1, vocab - 1, count - 2)
        row[count - 1] = vocab - 1
    columns = {"tokens": tokens, "tokens_n": counts.astype(np.int32), "label_is_tau": rng.integers(0, 2, n),
               "jet_pt": rng.exponential(20.0, n).astype(np.float32)}
    with DatasetWriter(folder, schema="tokens-test", splits=(0.5, 0.25, 0.25), chunk_size=16, chunks_per_shard=2) as w:
        w.add(columns)
    return folder


FAMILIES = {  # job, how its data is made, an observer column
    "mlpf": ("mlpf-quickstart", ["clic-events", "-n", "24"], "gen_met"),
    "aot": ("aot-quickstart", ["events-met", "-n", "400"], "event_ht"),
    "omnijet": ("omnijet-tau-quickstart", None, "jet_pt"),
}


def _expected_scores(task, logits):
    if task.kind == "regression":
        return logits
    if logits.shape[-1] == 1:  # bce: one logit, both classes written
        p = torch.sigmoid(logits)
        return torch.cat([1 - p, p], dim=-1)
    return torch.softmax(logits, dim=-1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_family_writes_what_it_computes_in_process(family, tmp_path):
    from hepml_dist.inference.predict import output_names
    from hepml_dist.spec import load_job

    job, generate, observer = FAMILIES[family]
    data = tmp_path / "data"
    if generate is None:
        _token_dataset(data)
    else:
        result = CliRunner().invoke(app, ["data", "generate", *generate, "--out", str(data), "--workers", "1"])
        assert result.exit_code == 0, result.output
    splits = [f"data.{s}={data / s}" for s in ("train", "val", "test")]
    spec = load_job(f"jobs/{job}.yaml", [*splits, "data.loader_workers=0"])
    torch.manual_seed(5)
    model = build_model(spec).eval()
    run = tmp_path / "run"
    write_model_checkpoint(run / "checkpoints" / "step-00000001", spec, model, {"step": 1})

    # reference: the job's evaluation loader (stored order), the model called directly, real elements only
    stream = ShardStream(spec.data, "test", rank=0, world_size=1, seed=0, training=False)
    names = output_names(spec)
    expected: dict[str, list] = {}
    per_element = family == "mlpf"
    for batch in stream.batches(0):
        with torch.no_grad():
            outputs = model(batch)
        real = batch["mask"][:, 0].bool()
        columns = {}
        for task in spec.tasks:
            value = outputs[task.name]
            if per_element and value.shape[1] != real.shape[1]:
                value = value.transpose(1, 2)
            scores = _expected_scores(task, value.float())
            columns |= {name: scores[..., k] for k, name in enumerate(names[task.name])}
        truth = [k for k in batch if k.startswith(("label_", "target_"))]
        columns |= {k: batch[k] for k in truth}
        columns[observer] = batch[observer]
        for name, value in columns.items():
            if per_element and value.ndim == 2:
                value = value[real]  # event after event, as the output's jagged columns flatten
            expected.setdefault(name, []).append(value.numpy())
    expected = {k: np.concatenate(v) for k, v in expected.items()}

    for suffix in (".root", ".parquet"):
        out = tmp_path / f"pred{suffix}"
        summary = predict(run, [str(data / "test")], out, observers=[observer])
        assert summary["rows"] == stream.examples
        got = (uproot.open(out)["Events"].arrays(library="ak") if suffix == ".root" else ak.from_parquet(out))
        outputs = [n for task in spec.tasks for n in names[task.name]]
        assert set(outputs) <= set(got.fields)
        assert set(summary["truth"]) <= set(got.fields) and summary["truth"]
        for name in [*outputs, *summary["truth"], observer]:
            values = ak.to_numpy(ak.flatten(got[name], axis=None))
            if name.startswith("label_"):
                assert np.issubdtype(values.dtype, np.integer), name
            np.testing.assert_allclose(values, expected[name], rtol=1e-5, atol=1e-6, err_msg=f"{suffix} {name}")
        if per_element:
            np.testing.assert_array_equal(ak.num(got["label_existence"]), got["n_elements"])
            assert "target_log_pt_ratio" in summary["truth"]  # derived by the loader, written next to its prediction


def _particleflow_events(n: int, seed: int = 0) -> dict:
    """CLIC events as particleflow's postprocessing parquet holds them: per event X_track [tracks][16],
    X_cluster [clusters][17], ytarget_* [elements][13] (PDG, charge, pT, eta, sin phi, cos phi, E, ...), genjet,
    genmet."""
    rng = np.random.default_rng(seed)
    tracks, clusters = rng.integers(0, 6, n), rng.integers(1, 8, n)

    def elements(counts, width, kind):
        rows = []
        for count in counts:
            x = rng.normal(0.0, 1.0, (count, width)).astype(np.float32)
            x[:, 0] = kind
            x[:, 1] = rng.exponential(5.0, count) + 0.5  # pT / ET
            x[:, 5] = x[:, 1] * 1.4  # p / E
            rows.append(x.tolist())
        return ak.Array(rows)

    def targets(counts, pdgs):
        rows = []
        for count in counts:
            y = np.zeros((count, 13), np.float32)
            y[:, 0] = rng.choice(pdgs, count)
            y[:, 2] = np.where(y[:, 0] != 0, rng.exponential(5.0, count) + 0.5, 0.0)
            y[:, 3], y[:, 4], y[:, 5] = rng.normal(0, 1, count), rng.uniform(-1, 1, count), rng.uniform(-1, 1, count)
            y[:, 6] = y[:, 2] * 1.5
            rows.append(y.tolist())
        return ak.Array(rows)

    return {
        "event": np.arange(n, dtype=np.int64) + 7_000_000_001,
        "X_track": elements(tracks, 16, 1.0), "X_cluster": elements(clusters, 17, 2.0),
        "ytarget_track": targets(tracks, [0, 211, -321, 2212, 11, -13]),
        "ytarget_cluster": targets(clusters, [0, 22, 130, 2112]),
        "genjet": ak.Array([rng.normal(10, 2, (k, 4)).tolist() for k in rng.integers(0, 4, n)]),
        "genmet": rng.exponential(10.0, n).astype(np.float32),
    }


def test_mlpf_from_raw_particleflow_files_through_the_clic_schema(tmp_path):
    """The shipped clic-events schema turns particleflow parquet into the MLPF inputs and truth (tracks, then
    clusters; PDG -> class), and predict writes, per event, what the model computes on those elements."""
    from hepml_dist.spec import load_job

    events = _particleflow_events(9)
    raw_file = tmp_path / "clic_0.parquet"
    ak.to_parquet(ak.zip(events, depth_limit=1), raw_file, row_group_size=4)
    spec = load_job("jobs/mlpf-quickstart.yaml")
    torch.manual_seed(2)
    model = build_model(spec).eval()
    write_model_checkpoint(tmp_path / "run" / "checkpoints" / "step-00000001", spec, model, {"step": 1})

    out = tmp_path / "pred.root"
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "run"), "--data", str(raw_file), "--out", str(out),
                                      "--schema", "clic-events", "--observers", "event", "--step-size", "4"])
    assert result.exit_code == 0, result.output
    got = uproot.open(out)["Events"].arrays(library="ak")
    np.testing.assert_array_equal(ak.to_numpy(got["event"]), events["event"])  # input order, int64 kept

    pdg_class = {0: 0, 211: 1, -321: 1, 2212: 1, 130: 2, 2112: 2, 22: 3, 11: 4, -13: 5}
    for i in range(len(events["event"])):
        track, cluster = np.asarray(events["X_track"][i].to_list()), np.asarray(events["X_cluster"][i].to_list())
        track = track.reshape(-1, 16)
        elements = np.concatenate([np.pad(track, ((0, 0), (0, 1))), cluster]).astype(np.float32)
        truth = np.concatenate([np.asarray(events[f"ytarget_{k}"][i].to_list()).reshape(-1, 13)
                                for k in ("track", "cluster")])
        n = len(elements)
        assert got["n_elements"][i] == n
        classes = [pdg_class[int(p)] for p in truth[:, 0]]
        np.testing.assert_array_equal(ak.to_numpy(got["label_particle_class"][i]), classes)
        np.testing.assert_array_equal(ak.to_numpy(got["label_existence"][i]), (truth[:, 0] != 0).astype(int))
        ratio = np.where(truth[:, 0] != 0, np.log(np.maximum(truth[:, 2], 1e-30) / elements[:, 1]), 0.0)
        np.testing.assert_allclose(ak.to_numpy(got["target_log_pt_ratio"][i]), ratio, rtol=1e-5, atol=1e-6)

        batch = {"features": torch.from_numpy(elements.T[None].copy()), "mask": torch.ones(1, 1, n)}
        with torch.no_grad():
            outputs = model(batch)
        scores = torch.softmax(outputs["particle_class"].reshape(n, -1) if outputs["particle_class"].shape[1] == n
                               else outputs["particle_class"][0].T, dim=-1)
        np.testing.assert_allclose(ak.to_numpy(got["score_particle_class_photon"][i]), scores[:, 3].numpy(),
                                   rtol=1e-4, atol=1e-5)
