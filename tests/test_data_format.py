"""Shard format: DatasetWriter (splits, shuffling, padding, checks, resume), manifest, chunk reader, verify."""

import io
import json
import tarfile

import numpy as np
import pytest
from data_helpers import random_jets, write_jets

from hepml_dist.data.check import verify_dataset
from hepml_dist.data.manifest import CorruptShardError, read_manifest
from hepml_dist.data.reader import _tar_members, iter_shard_chunks, read_rows_into
from hepml_dist.data.writer import DatasetWriter
from hepml_dist.errors import UserError


def read_split(directory, split):
    manifest = read_manifest(directory)
    shapes = {k: c.shape for k, c in manifest.columns.items()}
    parts = []
    for shard in manifest.splits[split].shards:
        for index, arrays in iter_shard_chunks(directory / shard.path, shapes=shapes,
                                               expected_chunks=len(shard.chunks)):
            assert len(arrays["jet_index"]) == shard.chunks[index]
            parts.append(arrays)
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]} if parts else {}


def test_every_example_lands_in_exactly_one_split_with_all_values(tmp_path):
    rng = np.random.default_rng(3)
    original = random_jets(1500, 12, rng)
    with DatasetWriter(tmp_path / "ds", schema="t", chunk_size=64, chunks_per_shard=3, seed=5) as writer:
        for start in range(0, 1500, 250):
            writer.add({k: v[start:start + 250] for k, v in original.items()})
    manifest = writer.manifest
    seen = []
    for split in ("train", "val", "test"):
        data = read_split(tmp_path / "ds", split)
        index = data["jet_index"].astype(int)
        seen.append(index)
        for name, values in data.items():
            np.testing.assert_array_equal(values, original[name][index], err_msg=name)
        assert manifest.splits[split].examples == len(index)
        labels, counts = np.unique(data["label_jet_class"], return_counts=True)
        assert manifest.splits[split].class_counts["label_jet_class"] == {
            str(a): int(b) for a, b in zip(labels, counts, strict=True)}
    everything = np.concatenate(seen)
    assert sorted(everything.tolist()) == list(range(1500))
    fractions = [len(s) / 1500 for s in seen]
    assert fractions == pytest.approx([0.7, 0.1, 0.2], abs=0.04)
    # classes are mixed across shards: the first shard is not in input order
    first = read_split(tmp_path / "ds", "train")["jet_index"][:64]
    assert not np.all(np.diff(first) > 0)


def test_split_assignment_does_not_depend_on_block_sizes(tmp_path):
    rng = np.random.default_rng(0)
    original = random_jets(600, 8, rng)
    assignments = []
    for name, block in (("a", 600), ("b", 37)):
        with DatasetWriter(tmp_path / name, schema="t", chunk_size=32, chunks_per_shard=2, seed=9) as writer:
            for start in range(0, 600, block):
                writer.add({k: v[start:start + block] for k, v in original.items()})
        assignments.append({s: set(read_split(tmp_path / name, s)["jet_index"].tolist())
                            for s in ("train", "val", "test")})
    assert assignments[0] == assignments[1]


def test_identical_inputs_give_identical_shards(tmp_path):
    first = write_jets(tmp_path / "a", 400, seed=2)
    second = write_jets(tmp_path / "b", 400, seed=2)
    assert [s.sha256 for s in first.splits["train"].shards] == [s.sha256 for s in second.splits["train"].shards]


def test_wider_constituent_blocks_are_padded_and_recorded(tmp_path):
    rng = np.random.default_rng(1)
    narrow, wide = random_jets(300, 5, rng), random_jets(300, 9, rng, start=300)
    with DatasetWriter(tmp_path / "ds", schema="t", splits=(1, 0, 0), chunk_size=100, chunks_per_shard=1,
                       shuffle_buffer=0) as writer:
        writer.add(narrow)  # shards of width 5 are written before the wide block arrives
        writer.add(wide)
    manifest = writer.manifest
    assert manifest.columns["part_px"].shape == [9] and manifest.columns["part_px"].padded
    assert not manifest.columns["jet_pt"].padded
    data = read_split(tmp_path / "ds", "train")
    assert data["part_px"].shape == (600, 9)
    index = data["jet_index"].astype(int)
    merged = np.concatenate([np.pad(narrow["part_px"], ((0, 0), (0, 4))), wide["part_px"]])
    np.testing.assert_array_equal(data["part_px"], merged[index])


def test_rows_read_in_place_equal_the_chunk_reader(tmp_path):
    """The loader's read (rows of chunks straight into window arrays) gives what the chunk reader gives: for
    partial chunks, chunks narrower than the manifest (zero-padded) and a destination of another dtype (cast)."""
    rng = np.random.default_rng(2)
    with DatasetWriter(tmp_path / "ds", schema="t", splits=(1, 0, 0), chunk_size=100, chunks_per_shard=3,
                       shuffle_buffer=0) as writer:
        writer.add(random_jets(300, 5, rng))  # the first shard is written 5 wide, the second 9
        writer.add(random_jets(300, 9, rng, start=300))
    manifest = writer.manifest
    shapes = {k: c.shape for k, c in manifest.columns.items()}
    rows = {0: (10, 60), 2: (0, 100)}
    for shard in manifest.splits["train"].shards:
        path = tmp_path / "ds" / shard.path
        expected = dict(iter_shard_chunks(path, shapes=shapes, chunks=set(rows)))
        into = {k: np.full((150, *shapes[k]), -1.0, dtype=np.float64 if k == "part_px" else c.dtype)
                for k, c in manifest.columns.items()}
        read_rows_into(path, rows, into, {0: 0, 2: 50}, chunk_sizes=shard.chunks, expected_bytes=shard.bytes,
                       shard_key=shard.key)
        for k, array in into.items():
            want = np.concatenate([expected[0][k][10:60], expected[2][k]])
            assert array.dtype == (np.float64 if k == "part_px" else want.dtype)
            np.testing.assert_array_equal(array, want.astype(array.dtype), err_msg=k)
    wide = into["part_energy"]
    assert wide.shape == (150, 9) and np.count_nonzero(wide[:, 5:]) > 0  # the second shard filled all 9


def test_rows_read_in_place_name_the_shard_and_chunk_when_damaged(tmp_path):
    write_jets(tmp_path / "ds", 600, seed=1)
    manifest, shard, path = _first_shard(tmp_path / "ds")
    shapes = {k: c.shape for k, c in manifest.columns.items()}
    into = {k: np.empty((shard.chunks[0], *shapes[k]), dtype=c.dtype) for k, c in manifest.columns.items()}
    with pytest.raises(CorruptShardError, match="chunk 0 has .* examples, the manifest says 7"):
        read_rows_into(path, {0: (0, 7)}, into, {0: 0}, chunk_sizes=[7, *shard.chunks[1:]])
    with pytest.raises(CorruptShardError, match="belongs to another shard"):
        read_rows_into(path, {0: (0, 5)}, into, {0: 0}, chunk_sizes=shard.chunks, shard_key="val_000009")
    path.write_bytes(path.read_bytes()[: shard.bytes // 2])
    last = len(shard.chunks) - 1
    with pytest.raises(CorruptShardError, match=r"shard-000000\.tar: .*(truncated|unexpected end)"):
        read_rows_into(path, {last: (0, 5)}, into, {last: 0}, chunk_sizes=shard.chunks)
    with pytest.raises(CorruptShardError, match=rf"shard-000000\.tar: .* bytes, the manifest says {shard.bytes}"):
        read_rows_into(path, {0: (0, 5)}, into, {0: 0}, chunk_sizes=shard.chunks, expected_bytes=shard.bytes)


def test_the_fast_tar_header_walk_agrees_with_tarfile_and_hands_over_to_it(tmp_path):
    """Plain ustar headers are parsed by the loader itself; from the first pax (long name) header on, tarfile
    reads the rest; a damaged header fails its checksum."""
    path = tmp_path / "mixed.tar"
    names = ["a.x.npy", "b" * 40 + "/c.y.npy", "long_" + "z" * 120 + ".npy", "d.w.npy"]
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size = 700 * i + 3
            tar.addfile(info, io.BytesIO(bytes(info.size)))
    with tarfile.open(path) as tar:
        expected = [(m.name, m.offset_data, m.size) for m in tar.getmembers()]
    with open(path, "rb") as f:
        walked = [(m.name, m.offset_data, m.size) for m in _tar_members(f)]
    assert walked == expected and [w[0] for w in walked] == names
    damaged = bytearray(path.read_bytes())
    damaged[expected[1][1] - 512 + 2] ^= 1  # a byte of the second header's name
    damaged_path = tmp_path / "damaged.tar"
    damaged_path.write_bytes(bytes(damaged))
    with open(damaged_path, "rb") as f, pytest.raises(tarfile.ReadError, match="bad checksum"):
        list(_tar_members(f))
    gnu = tmp_path / "gnu.tar"
    with tarfile.open(gnu, "w", format=tarfile.GNU_FORMAT) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = 5, 1_700_000_000
            tar.addfile(info, io.BytesIO(bytes(5)))
    with tarfile.open(gnu) as tar, open(gnu, "rb") as f:
        assert [(m.name, m.offset_data) for m in _tar_members(f)] == [(m.name, m.offset_data) for m in tar]


@pytest.mark.parametrize(
    ("columns", "message"),
    [
        ({"a.b": np.zeros(3)}, "no dots"),
        ({"x": np.zeros(3), "y": np.zeros(4)}, "share the first axis"),
        ({"x": np.array([1.0, np.nan])}, "NaN"),
        ({"x": np.array(["a", "b"])}, "not numeric"),
    ],
)
def test_bad_columns_are_rejected_with_the_column_named(tmp_path, columns, message):
    writer = DatasetWriter(tmp_path / "ds", schema="t")
    with pytest.raises(UserError, match=message):
        writer.add(columns)


def test_changed_columns_and_existing_datasets_are_refused(tmp_path):
    with DatasetWriter(tmp_path / "ds", schema="t") as writer:
        writer.add({"x": np.zeros(5, np.float32)})
        with pytest.raises(UserError, match="missing"):
            writer.add({"y": np.zeros(5, np.float32)})
    with pytest.raises(UserError, match="already holds a dataset"):
        DatasetWriter(tmp_path / "ds", schema="t")
    DatasetWriter(tmp_path / "ds", schema="t", overwrite=True)  # allowed
    assert not (tmp_path / "ds" / "manifest.json").exists()


def test_checkpoint_and_resume_produce_the_uninterrupted_dataset(tmp_path):
    rng = np.random.default_rng(4)
    blocks = [random_jets(200, 6, rng, start=200 * i) for i in range(6)]
    settings = dict(schema="t", chunk_size=40, chunks_per_shard=2, seed=1, meta={"run": 1})
    with DatasetWriter(tmp_path / "full", **settings) as writer:
        for block in blocks:
            writer.add(block)
    # an interrupted run: checkpoint after 3 blocks, add one more, then "crash"
    writer = DatasetWriter(tmp_path / "cut", resume=True, **settings)
    for block in blocks[:3]:
        writer.add(block)
    writer.checkpoint({"blocks_done": 3})
    writer.add(blocks[3])
    del writer
    resumed = DatasetWriter(tmp_path / "cut", resume=True, **settings)
    assert resumed.resumed_progress == {"blocks_done": 3}
    for block in blocks[3:]:
        resumed.add(block)
    resumed.close()
    full, cut = read_manifest(tmp_path / "full"), read_manifest(tmp_path / "cut")
    for split in ("train", "val", "test"):
        assert [s.sha256 for s in full.splits[split].shards] == [s.sha256 for s in cut.splits[split].shards]
    assert not (tmp_path / "cut" / ".partial").exists()
    with pytest.raises(UserError, match="different settings"):
        writer = DatasetWriter(tmp_path / "other", resume=True, **settings)
        writer.add(blocks[0])
        writer.checkpoint({})
        DatasetWriter(tmp_path / "other", resume=True, **{**settings, "seed": 2})


def test_manifest_is_plain_json_with_the_documented_keys(tmp_path):
    write_jets(tmp_path / "ds", 300, seed=1, source_files=["in.root"], meta={"note": "x"})
    data = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert {"format", "format_version", "schema", "converter_version", "seed", "split_fractions", "columns",
            "splits", "source_files", "meta", "chunk_size", "chunks_per_shard"} <= set(data)
    shard = data["splits"]["train"]["shards"][0]
    assert {"path", "examples", "chunks", "sha256", "bytes"} <= set(shard)
    assert data["columns"]["part_pid"] == {"dtype": "int32", "shape": [16], "padded": False}
    assert data["source_files"] == ["in.root"]


def _first_shard(directory):
    manifest = read_manifest(directory)
    return manifest, manifest.splits["train"].shards[0], directory / manifest.splits["train"].shards[0].path


def test_truncated_tar_names_the_shard(tmp_path):
    write_jets(tmp_path / "ds", 600, seed=1)
    manifest, shard, path = _first_shard(tmp_path / "ds")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptShardError, match="shard-000000.tar") as err:
        list(iter_shard_chunks(path, expected_chunks=len(shard.chunks)))
    assert "truncated" in err.value.reason or "unexpected end" in err.value.reason.lower()


def test_corrupt_npy_names_the_shard(tmp_path):
    write_jets(tmp_path / "ds", 600, seed=1)
    manifest, shard, path = _first_shard(tmp_path / "ds")
    rewritten = tmp_path / "rewritten.tar"
    with tarfile.open(path) as source, tarfile.open(rewritten, "w") as target:
        for member in source.getmembers():
            data = source.extractfile(member).read()
            if member.name.endswith(".part_px.npy") and "_0001." in member.name:
                data = data[:100]  # a .npy whose data is cut short
                member.size = len(data)
            target.addfile(member, io.BytesIO(data))
    rewritten.replace(path)
    with pytest.raises(CorruptShardError, match=r"shard-000000\.tar.*part_px"):
        list(iter_shard_chunks(path))


def test_verify_catches_a_flipped_byte_and_names_the_shard(tmp_path):
    write_jets(tmp_path / "ds", 600, seed=1)
    manifest, problems = verify_dataset(tmp_path / "ds")
    assert problems == []
    shard = manifest.splits["val"].shards[0]
    path = tmp_path / "ds" / shard.path
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))
    _, problems = verify_dataset(tmp_path / "ds")
    assert [p.shard for p in problems] == [shard.path]
    assert "sha256" in problems[0].problem


def test_disk_full_while_writing_a_shard_keeps_finished_shards_and_resumes(tmp_path, monkeypatch):
    """ENOSPC on the 4th shard: a UserError naming that shard, no partial file, the shards before it and the last
    writer checkpoint intact; the rerun resumes and gives the uninterrupted dataset."""
    import errno
    import os

    from hepml_dist.data import writer as writer_module

    rng = np.random.default_rng(4)
    blocks = [random_jets(200, 6, rng, start=200 * i) for i in range(6)]
    settings = dict(schema="t", chunk_size=40, chunks_per_shard=2, seed=1)
    with DatasetWriter(tmp_path / "full", **settings) as writer:
        for block in blocks:
            writer.add(block)

    real_fsync, calls = os.fsync, {"n": 0}

    def full_disk(fd):
        if "/shard-" in os.readlink(f"/proc/self/fd/{fd}"):  # shards only, not the writer's own checkpoint
            calls["n"] += 1
            if calls["n"] == 4:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(writer_module.os, "fsync", full_disk)
    out = tmp_path / "cut"
    writer = DatasetWriter(out, resume=True, **settings)
    done = 0
    with pytest.raises(UserError, match=r"shard-\d+\.tar: could not write this shard \(No space left on device\)"):
        for done, block in enumerate(blocks, start=1):
            writer.add(block)
            writer.checkpoint({"blocks_done": done})
    assert not list(out.rglob("*.tmp-*"))  # no partial shard left behind
    finished = sorted(out.glob("*/shard-*.tar"))
    assert len(finished) == 3 and all(tarfile.open(p).getmembers() for p in finished)
    monkeypatch.setattr(writer_module.os, "fsync", real_fsync)
    resumed = DatasetWriter(out, resume=True, **settings)
    for block in blocks[resumed.resumed_progress["blocks_done"]:]:
        resumed.add(block)
    resumed.close()
    full, cut = read_manifest(tmp_path / "full"), read_manifest(out)
    for split in ("train", "val", "test"):
        assert [s.sha256 for s in full.splits[split].shards] == [s.sha256 for s in cut.splits[split].shards]
    assert verify_dataset(out) is not None


def test_a_failed_atomic_write_names_the_file_and_keeps_the_old_version(tmp_path, monkeypatch):
    import errno

    from hepml_dist import files

    target = files.write_json(tmp_path / "best.json", {"value": 1})

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(files.os, "fsync", no_space)
    with pytest.raises(UserError, match=r"best\.json: could not write it \(No space left on device\)"):
        files.write_json(target, {"value": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"value": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["best.json"]  # no temporary file left
