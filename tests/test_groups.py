"""`data.groups`: training batches mixed from several shard sets with fixed shares — every batch has the
planned composition (floor or ceil of share x batch size), the shares are met over an epoch well within the
statistical error of random mixing, ranks get equal batch counts and the same composition, no example repeats
within an epoch, and epochs are reproducible and resumable."""

from pathlib import Path

import numpy as np
import pytest
from data_helpers import random_jets
from pydantic import ValidationError

from hepml_dist.data.groups import GroupedStream
from hepml_dist.data.loader import open_stream
from hepml_dist.data.writer import DatasetWriter
from hepml_dist.spec.data import DataSpec

SHARES = {"bulk": 0.5, "mid": 0.3, "rare": 0.2}
SIZES = {"bulk": 2200, "mid": 900, "rare": 700}
WIDTHS = {"bulk": 16, "mid": 12, "rare": 16}  # a narrower dataset: zero-padded to the widest
BATCH = 32


def write_group(folder: Path, label: int, n: int, width: int) -> Path:
    rng = np.random.default_rng(label)
    jets = random_jets(n, width, rng, start=label * 100_000)
    jets["label_jet_class"] = np.full(n, label, np.int64)  # the group, as the truth of each example
    with DatasetWriter(folder, schema="test-jets", splits=(1.0, 0.0, 0.0), seed=label, chunk_size=40,
                       chunks_per_shard=3) as writer:
        writer.add(jets)
    return folder / "train"


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    root = tmp_path_factory.mktemp("groups")
    return [{"name": name, "share": SHARES[name], "train": str(write_group(root / name, i, SIZES[name], WIDTHS[name]))}
            for i, name in enumerate(SHARES)]


def spec_for(groups, **overrides):
    settings = dict(groups=groups, batch_size=BATCH, loader_workers=2, shuffle_buffer=120,
                    inputs={"features": "part_full", "max_length": 16})
    return DataSpec(**{**settings, **overrides})


def composition(batches) -> np.ndarray:
    """[batches, groups] examples of each group per batch (the label is the group index)."""
    return np.stack([np.bincount(b["label_jet_class"].numpy(), minlength=len(SHARES)) for b in batches])


def test_shares_are_met_with_equal_batch_counts_per_rank(groups):
    spec = spec_for(groups)
    streams = [open_stream(spec, "train", rank=r, world_size=2, seed=5) for r in range(2)]
    assert all(isinstance(s, GroupedStream) for s in streams)
    # the epoch ends when the group with least data per share runs out: rare has 700 / (ceil(6.4) x 2 ranks)
    caps = np.ceil(np.array(list(SHARES.values())) * BATCH)
    expected_steps = int(min(np.array(list(SIZES.values())) // (caps * 2)))
    assert {s.steps_per_epoch for s in streams} == {expected_steps}

    per_rank = [list(s.batches(0)) for s in streams]
    assert [len(b) for b in per_rank] == [expected_steps] * 2
    counts = [composition(b) for b in per_rank]
    np.testing.assert_array_equal(counts[0], counts[1])  # the same composition on every rank
    assert all(b["features"].shape == (BATCH, 17, 16) for b in per_rank[0] + per_rank[1])

    targets = np.array(list(SHARES.values())) * BATCH
    both = np.concatenate(counts)
    assert (both.sum(1) == BATCH).all()
    assert ((both == np.floor(targets)) | (both == np.ceil(targets))).all()  # floor or ceil of the target
    # over the epoch: within the statistical error of drawing batches at random (multinomial), by far
    batches = len(both)
    sigma = np.sqrt(batches * BATCH * np.array(list(SHARES.values())) * (1 - np.array(list(SHARES.values()))))
    deviation = np.abs(both.sum(0) - batches * targets)
    assert (deviation < sigma).all(), (deviation, sigma)
    assert (deviation <= 2).all()  # low-discrepancy counts: within a couple of examples over the epoch


def test_no_example_twice_within_an_epoch_and_epochs_reproducible(groups):
    spec = spec_for(groups)
    indices = []
    for rank in range(2):
        stream = open_stream(spec, "train", rank=rank, world_size=2, seed=5)
        first, again = list(stream.batches(0)), list(stream.batches(0))
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a["jet_index"].numpy(), b["jet_index"].numpy())
        indices.append(np.concatenate([b["jet_index"].numpy() for b in first]))
        other_epoch = np.concatenate([b["jet_index"].numpy() for b in stream.batches(1)])
        assert not np.array_equal(np.sort(indices[-1]), np.sort(other_epoch))  # larger groups: other examples
    both = np.concatenate(indices)
    assert len(np.unique(both)) == len(both)


def test_resume_mid_epoch_gives_the_remaining_batches(groups):
    spec = spec_for(groups)
    reference = list(open_stream(spec, "train", rank=1, world_size=2, seed=9).batches(0))
    stream = open_stream(spec, "train", rank=1, world_size=2, seed=9)
    iterator = stream.batches(0)
    for _ in range(5):
        next(iterator)
    position = stream.position.to_dict()
    iterator.close()
    rest = list(open_stream(spec, "train", rank=1, world_size=2, seed=9).batches(0, start=position))
    assert len(rest) == len(reference) - 5
    for a, b in zip(reference[5:], rest):
        np.testing.assert_array_equal(a["jet_index"].numpy(), b["jet_index"].numpy())


def test_counts_do_not_depend_on_loader_workers(groups):
    one = composition(list(open_stream(spec_for(groups, loader_workers=0), "train", rank=0, world_size=1,
                                       seed=5).batches(0)))
    two = composition(list(open_stream(spec_for(groups, loader_workers=2), "train", rank=0, world_size=1,
                                       seed=5).batches(0)))
    np.testing.assert_array_equal(one, two)


def test_spec_rules_and_paths(groups, tmp_path):
    with pytest.raises(ValidationError, match="exactly one of data.train and data.groups"):
        DataSpec(train="x/train", groups=groups)
    with pytest.raises(ValidationError, match="exactly one of data.train and data.groups"):
        DataSpec()
    with pytest.raises(ValidationError, match="cannot be combined"):
        DataSpec(groups=groups, reweight={"bins": {"jet_pt": [0, 1], "jet_sdmass": [0, 1]},
                                          "groups": [{"name": "a", "labels": [0], "weight": 1.0}]})
    with pytest.raises(ValidationError, match="names must differ"):
        DataSpec(groups=[groups[0], groups[0]])
    with pytest.raises(ValidationError):
        DataSpec(groups=[{**groups[0], "share": 0}])

    from train_helpers import tiny_job

    from hepml_dist.runs import absolute_paths
    from hepml_dist.spec import parse_spec

    job = tiny_job(tmp_path, data={"train": None, "groups": [{"name": "a", "share": 1.0, "train": "rel/train"}]})
    spec = absolute_paths(parse_spec(job))
    assert Path(spec.data.groups[0].train).is_absolute()  # Ray workers run in other directories
    with pytest.raises(Exception, match="evaluate on data.val"):
        open_stream(spec_for(groups), "train", rank=0, world_size=1, seed=0, training=False)
