"""The streaming loader: equal batch counts per rank, coverage, resume, corrupt shards, evaluation, reweighting."""

import multiprocessing
import warnings

import numpy as np
import pytest
from data_helpers import write_jets

from hepml_dist.data.manifest import CorruptShardError, read_manifest
from hepml_dist.data.plan import DataPosition, plan_slots, slot_bounds
from hepml_dist.data.stream import ShardStream
from hepml_dist.spec.data import DataSpec


def spec_for(root, **overrides):
    settings = dict(train=str(root / "train"), val=str(root / "val"), batch_size=32, loader_workers=2,
                    shuffle_buffer=100, inputs={"features": "part_full", "max_length": 16})
    settings.update(overrides)
    return DataSpec(**settings)


def indices(batches):
    return np.concatenate([b["jet_index"].numpy() for b in batches]).astype(int)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("stream") / "ds"
    write_jets(root, 2000, chunk_size=50, chunks_per_shard=3, block=230, seed=3)
    return root


def test_shards_are_uneven_in_the_fixture(dataset):
    sizes = {s.examples for s in read_manifest(dataset).splits["train"].shards}
    assert len(sizes) > 1  # the last shard is shorter: the equal-count test below is not trivial


def test_two_ranks_two_workers_get_equal_batch_counts_and_disjoint_examples(dataset):
    spec = spec_for(dataset)
    seen = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough shards for 2 x 2 slots: no warning expected
        streams = [ShardStream(spec, "train", rank=r, world_size=2, seed=7) for r in range(2)]
    steps = {s.steps_per_epoch for s in streams}
    assert steps == {1400 // (32 * 2)} or len(steps) == 1
    for rank, stream in enumerate(streams):
        batches = list(stream.batches(epoch=0))
        assert len(batches) == stream.steps_per_epoch
        assert all(b["features"].shape == (32, 17, 16) for b in batches)
        seen[rank] = indices(batches)
    both = np.concatenate([seen[0], seen[1]])
    assert len(np.unique(both)) == len(both)  # no example twice within an epoch
    examples = read_manifest(dataset).splits["train"].examples
    assert len(both) > examples - 2 * 32 * 2  # at most the tail that does not fill a global batch is left out


def test_epochs_reshuffle_but_are_reproducible(dataset):
    spec = spec_for(dataset, loader_workers=1)
    stream = ShardStream(spec, "train", rank=0, world_size=1, seed=1)
    epoch0, again, epoch1 = (indices(list(stream.batches(e))) for e in (0, 0, 1))
    np.testing.assert_array_equal(epoch0, again)
    assert not np.array_equal(epoch0, epoch1)
    assert set(epoch0) != set(epoch1) or not np.array_equal(np.sort(epoch0), epoch0)


@pytest.mark.parametrize("stop_after", [1, 5, 10])
def test_resume_mid_epoch_yields_exactly_the_remaining_batches(dataset, stop_after):
    spec = spec_for(dataset)
    reference = ShardStream(spec, "train", rank=1, world_size=2, seed=7)
    full = list(reference.batches(epoch=2))
    stream = ShardStream(spec, "train", rank=1, world_size=2, seed=7)
    iterator = stream.batches(epoch=2)
    head = [next(iterator) for _ in range(stop_after)]
    saved = stream.position.to_dict()  # what a checkpoint stores (JSON)
    del iterator
    assert saved["epoch"] == 2 and saved["batches"] == stop_after
    restarted = ShardStream(spec, "train", rank=1, world_size=2, seed=7)
    tail = list(restarted.batches(epoch=2, start=DataPosition.from_dict(saved)))
    assert len(head) + len(tail) == len(full)
    np.testing.assert_array_equal(indices(head + tail), indices(full))
    assert restarted.position.batches == restarted.steps_per_epoch


def test_fewer_shards_than_workers_warns_and_keeps_counts_equal(tmp_path):
    write_jets(tmp_path / "ds", 700, chunk_size=40, chunks_per_shard=20, seed=2)  # one train shard
    spec = spec_for(tmp_path / "ds", batch_size=16)
    counts = []
    for rank in range(2):
        with pytest.warns(UserWarning, match="workers will share shards"):
            stream = ShardStream(spec, "train", rank=rank, world_size=2, seed=0)
        counts.append(len(list(stream.batches(0))))
    assert counts[0] == counts[1] == stream.steps_per_epoch > 0


def test_steps_per_epoch_from_spec_repeats_data_as_needed(dataset):
    spec = spec_for(dataset, steps_per_epoch=40, loader_workers=1)  # more than one pass over the data
    stream = ShardStream(spec, "train", rank=0, world_size=2, seed=0)
    assert len(list(stream.batches(0))) == 40


def test_validation_covers_the_split_once_with_equal_counts(dataset):
    spec = spec_for(dataset, batch_size=16)
    examples = read_manifest(dataset).splits["val"].examples
    seen, counts = [], []
    for rank in range(2):
        stream = ShardStream(spec, "val", rank=rank, world_size=2, seed=0, training=False)
        batches = list(stream.batches(0))
        counts.append(len(batches))
        seen.append(indices(batches))
    assert counts[0] == counts[1]
    everything = np.concatenate(seen)
    assert len(np.unique(everything)) == len(everything)
    assert examples - 2 * 16 < len(everything) <= examples
    fixed = ShardStream(spec_for(dataset, val_steps=3), "val", rank=0, world_size=2, seed=0, training=False)
    assert len(list(fixed.batches(0))) == 3


def test_pad_to_multiple_trims_the_batch_length(dataset):
    spec = spec_for(dataset, inputs={"features": "part_kin", "max_length": 16, "pad_to_multiple": 4},
                    loader_workers=0)
    for batch in ShardStream(spec, "train", rank=0, world_size=1, seed=0).batches(0):
        length = batch["mask"].shape[-1]
        longest = int(batch["mask"].sum(-1).max())
        assert length % 4 == 0 and longest <= length < longest + 4 or length == 16
        assert batch["features"].shape[1:] == (7, length)


def _corrupt(root, split="train", which=1):
    manifest = read_manifest(root)
    shard = manifest.splits[split].shards[which]
    path = root / shard.path
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def test_corrupt_shard_raises_naming_it(tmp_path):
    write_jets(tmp_path / "ds", 1200, seed=4)
    bad = _corrupt(tmp_path / "ds")
    stream = ShardStream(spec_for(tmp_path / "ds", shuffle_buffer=0), "train", rank=0, world_size=1, seed=0)
    with pytest.raises(CorruptShardError) as err:
        list(stream.batches(0))
    assert err.value.shard == bad
    assert "data.on_corrupt: skip" in str(err.value)


def test_corrupt_shard_is_skipped_and_counted(tmp_path):
    write_jets(tmp_path / "ds", 1200, seed=4)
    bad = _corrupt(tmp_path / "ds")
    spec = spec_for(tmp_path / "ds", on_corrupt="skip", loader_workers=1)
    stream = ShardStream(spec, "train", rank=0, world_size=1, seed=0)
    with pytest.warns(UserWarning, match="skipping corrupt shard"):
        batches = list(stream.batches(0))
    assert len(batches) == stream.steps_per_epoch
    assert stream.position.skipped_shards == [bad]


def test_slots_partition_the_examples_exactly():
    chunks = [[50, 50, 20], [50, 7], [33]]
    bounds = slot_bounds(210, 2, [3, 2])
    slots = plan_slots(chunks, [2, 0, 1], bounds)
    sizes = [sum(p.size for p in s) for s in slots]
    assert sum(sizes) == 210 and sizes[0] + sizes[1] == 105
    assert sizes[0] / (sizes[0] + sizes[1]) == pytest.approx(0.6, abs=0.01)
    rows = {(p.shard, p.chunk, r) for s in slots for p in s for r in range(p.start, p.stop)}
    assert len(rows) == 210


def test_pipe_urls_stream_through_webdataset(dataset):
    """Shards named by a URL pattern (here `pipe:cat ...`) are streamed, not read as local files."""
    shards = read_manifest(dataset).splits["train"].shards
    pattern = f"pipe:cat {dataset}/train/shard-{{000000..{len(shards) - 1:06d}}}.tar"
    remote = ShardStream(spec_for(dataset, train=pattern, loader_workers=1), "train", rank=0, world_size=1, seed=4)
    local = ShardStream(spec_for(dataset, loader_workers=1), "train", rank=0, world_size=1, seed=4)
    assert remote.shards[0].source.startswith("pipe:")
    np.testing.assert_array_equal(indices(list(remote.batches(0))), indices(list(local.batches(0))))


def test_reweighting_by_sampling_and_by_loss_weights(tmp_path):
    from pathlib import Path

    import yaml
    from typer.testing import CliRunner

    from hepml_dist.cli import app

    write_jets(tmp_path / "ds", 3000, chunk_size=100, chunks_per_shard=4, seed=8)
    reweight = {
        "variables": ["jet_pt", "jet_sdmass"],
        "bins": {"jet_pt": [0, 50, 10000], "jet_sdmass": [0, 100, 200, 300]},
        "groups": [{"name": "a", "labels": [0], "weight": 3.0}, {"name": "b", "labels": [1, 2], "weight": 1.0}],
    }
    spec = spec_for(tmp_path / "ds", batch_size=64, shuffle_buffer=400, reweight=reweight, loader_workers=1)
    with pytest.raises(Exception, match="hepml data weights"):
        ShardStream(spec, "train", rank=0, world_size=1, seed=0)
    base = Path(__file__).resolve().parents[1] / "jobs" / "part-quickstart.yaml"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"extends": str(base), "name": "rw", "data": {"reweight": reweight}}))
    result = CliRunner().invoke(app, ["data", "weights", str(tmp_path / "ds"), "--job", str(job)])
    assert result.exit_code == 0, result.output
    assert "sampled share" in result.output and "0.750" in result.output
    sampled = ShardStream(spec, "train", rank=0, world_size=1, seed=0)
    labels = np.concatenate([b["label_jet_class"].numpy() for b in sampled.batches(0)])
    assert "weight" not in next(iter(sampled.batches(0)))
    share_a = np.mean(labels == 0)
    assert share_a == pytest.approx(0.75, abs=0.08)  # group weights 3 : 1, natural share of class 0 is 1/3
    weighted_spec = spec.model_copy(update={"reweight": spec.reweight.model_copy(update={"mode": "loss_weight"})})
    weighted = ShardStream(weighted_spec, "train", rank=0, world_size=1, seed=0)
    batches = list(weighted.batches(0))
    weights = np.concatenate([b["weight"].numpy() for b in batches])
    labels = np.concatenate([b["label_jet_class"].numpy() for b in batches])
    assert weights.mean() == pytest.approx(1.0, rel=0.1)
    assert weights[labels == 0].sum() / weights.sum() == pytest.approx(0.75, abs=0.05)


def test_shared_batch_slots_are_bounded_and_hold_every_batch(dataset):
    """The slots the loader maps are a fixed number per loader process, each large enough for any built batch."""
    for workers in (0, 1, 2):
        stream = ShardStream(spec_for(dataset, loader_workers=workers), "train", rank=0, world_size=1, seed=1)
        count, size = stream.shared_slots()
        assert count == (0 if workers == 0 else 2 * workers + 4)
        if workers:
            largest = max(sum(v.numel() * v.element_size() for v in batch.values() if hasattr(v, "numel"))
                          for batch in stream.batches(0))
            assert largest <= size


def loader_pids():
    return {p.pid for p in multiprocessing.active_children()}


def test_kept_loader_processes_serve_every_epoch_as_fresh_ones_would(dataset):
    """Inside kept_loader_processes the same loader processes stream epoch after epoch (and resumed epochs), with
    exactly the batches that processes forked per call give; they stop when the block ends."""
    spec = spec_for(dataset)
    fresh = ShardStream(spec, "train", rank=1, world_size=2, seed=7)
    expected = {e: indices(list(fresh.batches(e))) for e in (0, 1, 2)}
    before = loader_pids()
    stream = ShardStream(spec, "train", rank=1, world_size=2, seed=7)
    with stream.kept_loader_processes():
        np.testing.assert_array_equal(indices(list(stream.batches(0))), expected[0])
        kept = loader_pids() - before
        assert len(kept) == 2  # two loader processes, alive between epochs
        np.testing.assert_array_equal(indices(list(stream.batches(1))), expected[1])
        iterator = stream.batches(2)
        head = [next(iterator) for _ in range(3)]
        assert loader_pids() - before == kept  # still the same processes
        saved = stream.position
        iterator.close()  # left mid-epoch: those processes stop, the next call forks new ones
        assert not loader_pids() & kept
        tail = list(stream.batches(2, start=saved))
        np.testing.assert_array_equal(indices(head + tail), expected[2])
        again = loader_pids() - before
        assert len(again) == 2 and not again & kept
        np.testing.assert_array_equal(indices(list(stream.batches(0))), expected[0])
    assert not loader_pids() & again  # stopped with the block


def test_a_second_call_while_the_kept_loader_streams_gets_its_own(dataset):
    """Two epochs read at once (a validation inside an epoch, say) never share one loader's processes."""
    spec = spec_for(dataset, val=str(dataset / "val"))
    stream = ShardStream(spec, "val", rank=0, world_size=1, seed=0, training=False)
    expected = indices(list(stream.batches(0)))
    with stream.kept_loader_processes():
        first = stream.batches(0)
        head = [next(first)]
        second = indices(list(stream.batches(0)))
        np.testing.assert_array_equal(second, expected)
        np.testing.assert_array_equal(indices(head + list(first)), expected)
        np.testing.assert_array_equal(indices(list(stream.batches(0))), expected)
