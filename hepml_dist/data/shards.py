"""Shard references: the spec's shard patterns (split folders, globs, brace patterns, URLs) -> the shards to read,
each with what its dataset's manifest says about it. Every manifest is read once.
"""

from __future__ import annotations

import glob as globlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from webdataset.shardlists import expand_urls

from hepml_dist.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, read_manifest
from hepml_dist.data.reader import is_local
from hepml_dist.errors import UserError


@dataclass(frozen=True)
class ShardRef:
    """One shard to read: where it is, what the manifest says about it, and which manifest."""

    source: str
    info: ShardInfo
    dataset: int  # index into ShardResolver.manifests


def _join_url(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def _read_remote_manifest(url: str) -> Manifest:
    try:
        with wds.gopen(url, "rb") as f:
            data = json.loads(f.read())
        return Manifest.from_dict(data, root=None)
    except Exception as err:  # noqa: BLE001 - any transport or parse problem is a user-facing one here
        raise UserError(f"{url}: cannot read the dataset manifest ({type(err).__name__}: {err}); shards are "
                        "streamed only together with the manifest.json written next to their split folders")


class ShardResolver:
    """Turns the spec's shard patterns into ShardRefs, loading each dataset's manifest once."""

    def __init__(self) -> None:
        self.manifests: list[Manifest] = []
        self._by_root: dict[str, int] = {}

    def manifest_for(self, root: str) -> int:
        if root not in self._by_root:
            if is_local(root):
                manifest = read_manifest(root)
            else:
                manifest = _read_remote_manifest(_join_url(root, MANIFEST_NAME))
            self._by_root[root] = len(self.manifests)
            self.manifests.append(manifest)
        return self._by_root[root]

    def resolve(self, patterns: str | Sequence[str]) -> list[ShardRef]:
        items = [patterns] if isinstance(patterns, str) else list(patterns)
        refs: list[ShardRef] = []
        for item in items:
            item = str(item)
            if not item.endswith(".tar") and "*" not in item and "{" not in item:
                refs += self._split_directory(item)
                continue
            for url in expand_urls(item):
                if is_local(url) and any(c in url for c in "*?["):
                    matches = sorted(globlib.glob(url))
                    if not matches:
                        raise UserError(f"data: the pattern {url} matches no shard")
                    refs += [self._shard(m) for m in matches]
                else:
                    refs.append(self._shard(url))
        if not refs:
            raise UserError(f"data: {patterns} names no shards")
        seen = set()
        for ref in refs:
            if ref.source in seen:
                raise UserError(f"data: shard {ref.source} is listed twice; each shard may appear once")
            seen.add(ref.source)
        return refs

    def _split_directory(self, path: str) -> list[ShardRef]:
        local = is_local(path)
        if local and (Path(path) / MANIFEST_NAME).is_file():
            raise UserError(f"data: {path} is a dataset root; name one split of it, e.g. {Path(path) / 'train'}")
        if local and not Path(path).is_dir():
            raise UserError(f"data: {path} does not exist (expected a split folder such as data/fcc-tau/train, "
                            "a glob or a brace pattern of shards)")
        split = path.rstrip("/").rsplit("/", 1)[-1]
        root = path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else "."
        index = self.manifest_for(root)
        manifest = self.manifests[index]
        if split not in manifest.splits:
            raise UserError(f"data: {path}: the dataset has splits {sorted(manifest.splits)}, not {split!r}")
        shards = manifest.splits[split].shards
        if not shards:
            raise UserError(f"data: {path}: the {split} split of this dataset is empty")
        return [ShardRef(_join_url(root, s.path), s, index) for s in shards]

    def _shard(self, url: str) -> ShardRef:
        parts = url.rstrip("/").rsplit("/", 2)
        if len(parts) < 3 and is_local(url):
            parts = ["."] + parts
        if len(parts) < 3:
            raise UserError(f"data: shard {url} is not inside a split folder of a dataset (DIR/<split>/shard.tar)")
        root, split, name = parts
        index = self.manifest_for(root)
        info = self.manifests[index].shard_infos().get(f"{split}/{name}")
        if info is None:
            raise UserError(f"data: shard {url} is not listed in {_join_url(root, MANIFEST_NAME)}; "
                            "was it written by another conversion?")
        return ShardRef(url, info, index)
