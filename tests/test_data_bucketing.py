"""Loader bucketing by length (data.bucket_by_length): less padding, the same examples, reproducible, and a resumed
stream yields exactly the batches the uninterrupted one would have (within and across shuffle windows and passes)."""

import numpy as np
import pytest
from data_helpers import write_jets

from hepml_dist.data.plan import DataPosition
from hepml_dist.data.stream import ShardStream
from hepml_dist.spec.data import DataSpec


def spec_for(root, **overrides):
    # windows of 100 examples and batches of 32: every window carries a partial batch into the next
    settings = dict(train=str(root / "train"), val=str(root / "val"), batch_size=32, loader_workers=2,
                    shuffle_buffer=100, bucket_by_length=True,
                    inputs={"features": "part_kin", "max_length": 16, "pad_to_multiple": 1})
    settings.update(overrides)
    return DataSpec(**settings)


def indices(batches):
    return [b["jet_index"].numpy().astype(int) for b in batches]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("bucketing") / "ds"
    write_jets(root, 1500, chunk_size=50, chunks_per_shard=3, block=230, seed=5)
    return root


def padded_fraction(batches) -> float:
    return 1 - sum(float(b["mask"].sum()) for b in batches) / sum(b["mask"].numel() for b in batches)


def test_bucketing_cuts_padding_and_keeps_each_example_once(dataset):
    plain = list(ShardStream(spec_for(dataset, bucket_by_length=False), "train", rank=0, world_size=1,
                             seed=3).batches(0))
    stream = ShardStream(spec_for(dataset), "train", rank=0, world_size=1, seed=3)
    bucketed = list(stream.batches(0))
    assert len(bucketed) == len(plain) == stream.steps_per_epoch
    assert all(len(b["mask"]) == 32 for b in bucketed)
    # random lengths 1..16: a random batch of 32 almost always pads to 16, sorted windows far less
    assert padded_fraction(bucketed) < 0.6 * padded_fraction(plain)
    spread = [np.ptp(b["mask"].sum(-1).numpy()) for b in bucketed]
    assert np.median(spread) <= 7
    assert np.median([np.ptp(b["mask"].sum(-1).numpy()) for b in plain]) >= 12
    seen = np.concatenate(indices(bucketed))
    assert len(np.unique(seen)) == len(seen)  # no example twice in an epoch
    again = ShardStream(spec_for(dataset), "train", rank=0, world_size=1, seed=3)
    for a, b in zip(indices(bucketed), indices(again.batches(0))):
        np.testing.assert_array_equal(a, b)  # the same batches with the same seed
    other = np.concatenate(indices(again.batches(1)))
    assert not np.array_equal(other, seen)  # another epoch, another order


@pytest.mark.parametrize("stop_after,steps", [(1, None), (6, None), (7, 60)])
def test_resume_of_a_bucketed_stream_yields_exactly_the_remaining_batches(dataset, stop_after, steps):
    """steps=60 makes the workers run a second pass over their slots (the carried batch then spans passes)."""
    spec = spec_for(dataset, steps_per_epoch=steps)
    full = indices(ShardStream(spec, "train", rank=1, world_size=2, seed=7).batches(epoch=2))
    stream = ShardStream(spec, "train", rank=1, world_size=2, seed=7)
    iterator = stream.batches(epoch=2)
    head = [next(iterator) for _ in range(stop_after)]
    saved = stream.position.to_dict()
    del iterator
    restarted = ShardStream(spec, "train", rank=1, world_size=2, seed=7)
    tail = list(restarted.batches(epoch=2, start=DataPosition.from_dict(saved)))
    resumed = indices(head) + indices(tail)
    assert len(resumed) == len(full) == restarted.steps_per_epoch
    for a, b in zip(resumed, full):
        np.testing.assert_array_equal(a, b)


def test_evaluation_is_not_bucketed(dataset):
    plain = ShardStream(spec_for(dataset, bucket_by_length=False, loader_workers=1), "val", rank=0, world_size=1,
                        seed=0, training=False)
    bucketed = ShardStream(spec_for(dataset, loader_workers=1), "val", rank=0, world_size=1, seed=0, training=False)
    for a, b in zip(indices(plain.batches(0)), indices(bucketed.batches(0))):
        np.testing.assert_array_equal(a, b)
