"""The loader's entry point: `open_stream` gives the stream of batches of one split of a job's data.

A job with `data.groups` trains on a GroupedStream (fixed shares of several shard sets in every batch); every
other split, and every job without groups, reads a ShardStream. Both yield the same batches on every call with
the same seed and the same number on every rank (see hepml_dist.data.plan).
"""

from hepml_dist.data.groups import GroupedStream
from hepml_dist.data.stream import ShardStream, Stream
from hepml_dist.spec.data import DataSpec


def open_stream(data: DataSpec, split: str, *, rank: int = 0, world_size: int = 1, seed: int = 0,
                training: bool = True) -> Stream:
    """The stream of `split` ("train", "val", "test") for global rank `rank` of `world_size`."""
    if split == "train" and data.groups:
        return GroupedStream(data, split, rank=rank, world_size=world_size, seed=seed, training=training)
    return ShardStream(data, split, rank=rank, world_size=world_size, seed=seed, training=training)


__all__ = ["GroupedStream", "ShardStream", "Stream", "open_stream"]
