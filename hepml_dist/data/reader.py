"""Reading shards back: the chunks of one tar as numpy arrays, decoded without copies, checked against the manifest.

`iter_shard_chunks` is the one reader every consumer uses (the loader's workers, prediction, tokenizing, the
baseline, verify/inspect). Local files are read with random access (unwanted members are seeked over); URLs that
webdataset's `gopen` opens (http(s), pipe:, s3 via pipe:) are streamed. Any read or decode problem raises
CorruptShardError naming the shard.
"""

from __future__ import annotations

import io
import math
import os
import re
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import webdataset as wds
from webdataset.tariterators import tar_file_iterator

from hepml_dist.data.manifest import CorruptShardError


def pad_to(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Zero-pad every axis after the first up to `shape` (the per-example shape)."""
    if tuple(array.shape[1:]) == tuple(shape):
        return array
    widths = [(0, 0)] + [(0, int(want) - have) for have, want in zip(array.shape[1:], shape, strict=True)]
    return np.pad(array, widths)


_NPY_HEADER = re.compile(
    rb"\{'descr': '([<>|][a-z][0-9]+)', 'fortran_order': (False|True), 'shape': \(([0-9, ]*)\), \}\s*\n")


def _fast_npy_header(data: bytes | memoryview) -> tuple[tuple[int, ...], bool, np.dtype, int] | None:
    """The header numpy itself writes (version 1.0), parsed with one regex instead of ast.literal_eval."""
    head = bytes(data[:10])
    if len(head) < 10 or head[:8] != b"\x93NUMPY\x01\x00":
        return None
    length = int.from_bytes(head[8:10], "little")
    found = _NPY_HEADER.fullmatch(bytes(data[10:10 + length]))
    if found is None:
        return None
    shape = tuple(int(x) for x in found.group(3).replace(b" ", b"").split(b",") if x)
    return shape, found.group(2) == b"True", np.dtype(found.group(1).decode()), 10 + length


def decode_npy(data: bytes | memoryview, what: str = "array") -> np.ndarray:
    """Decode one `.npy` member without copying; ValueError naming `what` if the bytes are not a full array."""
    fast = _fast_npy_header(data)
    if fast is not None:
        shape, fortran, dtype, offset = fast
        count = int(np.prod(shape, dtype=np.int64))
        if len(data) - offset != count * dtype.itemsize:
            raise ValueError(f"{what}: {len(data) - offset} data bytes, expected {count * dtype.itemsize} "
                             f"for {dtype} {tuple(shape)} (truncated or corrupt)")
        return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape, order="F" if fortran else "C")
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(buffer)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(buffer)
    except Exception as err:  # numpy raises ValueError for bad magic/headers, but be safe
        raise ValueError(f"{what}: not a .npy array ({err})") from None
    if dtype.hasobject:
        raise ValueError(f"{what}: object arrays are not allowed")
    count = int(np.prod(shape, dtype=np.int64))
    offset = buffer.tell()
    if len(data) - offset != count * dtype.itemsize:
        raise ValueError(f"{what}: {len(data) - offset} data bytes, expected {count * dtype.itemsize} "
                         f"for {dtype} {tuple(shape)} (truncated or corrupt)")
    array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
    return array.reshape(shape, order="F" if fortran else "C")


def is_local(source: str) -> bool:
    """A path on this machine (or file://), as opposed to what webdataset's gopen streams (URLs, pipe:)."""
    if source.startswith("pipe:"):
        return False
    return "://" not in source or source.startswith("file://")


def _local_path(source: str) -> str:
    return source[len("file://"):] if source.startswith("file://") else source


def _member_key_column(name: str) -> tuple[str, str | None]:
    base = name.rsplit("/", 1)[-1]
    key, _, rest = base.partition(".")
    return key, (rest[:-4] if rest.endswith(".npy") else None)


def _iter_members_local(path: str, wanted: set[str] | None, chunks: Sequence[int] | set[int] | None):
    """(key, column, bytes) of the members we want; members of unwanted chunks or columns are seeked over.

    Member data is read straight into a fresh numpy buffer (`readinto`), which decode_npy then views without
    copying. (Memory-mapping the shard instead avoids that copy but pays a page fault per 4 KiB on first touch,
    which on virtual machines costs more than the copy.)
    """
    chunk_set = None if chunks is None else set(chunks)
    last_chunk = None if chunk_set is None else max(chunk_set, default=-1)
    with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
        chunk_index, current = -1, None
        for member in tar:
            key, column = _member_key_column(member.name)
            if key != current:
                current = key
                chunk_index += 1
                if last_chunk is not None and chunk_index > last_chunk:
                    return
            yield key, None, None  # marks chunk boundaries for the caller's counting
            if column is None or (wanted is not None and column not in wanted):
                continue
            if chunk_set is not None and chunk_index not in chunk_set:
                continue
            data = np.empty(member.size, dtype=np.uint8)
            f.seek(member.offset_data)
            got = f.readinto(data)
            if got != member.size:
                raise ValueError(f"member {member.name}: {got} of {member.size} bytes (truncated)")
            yield key, column, data


def _iter_members_stream(url: str, wanted: set[str] | None, chunks: Sequence[int] | set[int] | None):
    chunk_set = None if chunks is None else set(chunks)
    stream = wds.gopen(url, "rb")
    try:
        chunk_index, current = -1, None
        for item in tar_file_iterator(stream):
            key, column = _member_key_column(item["fname"])
            if key != current:
                current = key
                chunk_index += 1
            yield key, None, None
            if column is None or (wanted is not None and column not in wanted):
                continue
            if chunk_set is not None and chunk_index not in chunk_set:
                continue
            yield key, column, item["data"]
    finally:
        stream.close()


def iter_shard_chunks(
    source: str | os.PathLike,
    *,
    columns: Iterable[str] | None = None,
    chunks: Sequence[int] | set[int] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    expected_chunks: int | None = None,
    expected_bytes: int | None = None,
    shard_key: str | None = None,
    name: str | None = None,
) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
    """Yield (chunk index within the shard, {column: array}) for the chunks of one shard, in stored order.

    `columns` restricts what is decoded (other members are skipped without decoding; local files are seeked
    over); `chunks` restricts which chunk indices are yielded; `shapes` (per-example shapes, e.g. from the
    manifest) zero-pads narrower chunks to the dataset maximum; `expected_chunks` checks the shard is complete,
    and `expected_bytes` (the manifest's size) that a local shard was neither truncated nor replaced by a shard of
    another size (one stat; only `hepml data verify` compares checksums); `shard_key` (`ShardInfo.key`) that every
    chunk belongs to this shard, which catches a shard file replaced by another shard of the same size.
    Local paths are read with random access; URLs (anything webdataset's `gopen` opens: http(s), pipe:, s3 via
    pipe:) are streamed. Any read or decode problem raises CorruptShardError naming the shard.
    """
    source = str(source)
    label = name or source
    wanted = None if columns is None else set(columns)
    if is_local(source) and not os.path.exists(_local_path(source)):
        raise CorruptShardError(label, "file not found")
    size = os.path.getsize(_local_path(source)) if is_local(source) and expected_bytes is not None else None
    if size is not None and size != expected_bytes:
        raise CorruptShardError(label, f"{size} bytes, the manifest says {expected_bytes} (truncated, or replaced "
                                "by another file)")
    members = (_iter_members_local(_local_path(source), wanted, chunks) if is_local(source)
               else _iter_members_stream(source, wanted, chunks))
    chunk_set = None if chunks is None else set(chunks)
    seen = 0
    current_key, current_index, arrays = None, -1, {}

    def finish(index: int, key: str, arrays: dict[str, np.ndarray]):
        if chunk_set is not None and index not in chunk_set:
            return None
        if wanted is not None and (missing := wanted - arrays.keys()):
            raise CorruptShardError(label, f"chunk {key} lacks column(s) {sorted(missing)}")
        lengths = {len(a) for a in arrays.values()}
        if len(lengths) > 1:
            raise CorruptShardError(label, f"chunk {key}: columns have different lengths {sorted(lengths)}")
        if shapes:
            for col, array in arrays.items():
                if col in shapes and tuple(array.shape[1:]) != tuple(shapes[col]):
                    try:
                        arrays[col] = pad_to(array, shapes[col])
                    except ValueError:
                        raise CorruptShardError(label, f"chunk {key} column {col}: shape {array.shape[1:]} "
                                                f"does not fit the manifest shape {list(shapes[col])}") from None
        return index, arrays

    try:
        for key, column, data in members:
            if key != current_key and shard_key is not None and not key.startswith(shard_key + "_"):
                raise CorruptShardError(label, f"holds chunk {key}, which belongs to another shard than {shard_key} "
                                        "(the file was replaced by another shard)")
            if key != current_key:
                if current_key is not None and (done := finish(current_index, current_key, arrays)):
                    yield done
                current_key, current_index, arrays = key, current_index + 1, {}
                seen = current_index + 1
            if column is not None:
                arrays[column] = decode_npy(data, f"{key}.{column}.npy")
        if current_key is not None and (done := finish(current_index, current_key, arrays)):
            yield done
    except CorruptShardError:
        raise
    except (tarfile.TarError, ValueError, EOFError, OSError, KeyError) as err:
        raise CorruptShardError(label, f"{type(err).__name__}: {err}") from None
    if expected_chunks is not None and seen < expected_chunks and (chunk_set is None or max(chunk_set) >= seen):
        raise CorruptShardError(label, f"found {seen} of {expected_chunks} chunks (truncated)")


class _Member(NamedTuple):
    name: str
    offset_data: int
    size: int


def _tar_members(f) -> Iterator[_Member | tarfile.TarInfo]:
    """The members of the tar open as `f`, from plain ustar headers (the loader's shards), checksums checked.

    `tarfile` spends about 70 us in Python on each header, which was a third of the loader's reading time; a
    POSIX ustar header of a regular file is parsed here in a few microseconds. At the first header of any other
    kind (pax or GNU, links, base-256 sizes) `tarfile` takes over from that header on.
    """
    offset = 0
    while True:
        f.seek(offset)
        block = f.read(512)
        if len(block) < 512:
            if not block:
                return  # no end-of-archive blocks: tarfile accepts that too
            raise tarfile.ReadError("unexpected end of data")
        if block == _ZERO_BLOCK:
            return
        stored = block[148:156].split(b"\0", 1)[0].strip()
        # POSIX ustar only: GNU headers ("ustar  ") use the prefix field for other things
        plain = block[156] in _REGULAR and block[257:263] == b"ustar\0" and not block[124] & 0x80
        if not plain or not stored.isdigit():
            break
        if int(stored, 8) != sum(block) - sum(block[148:156]) + 256:  # the checksum field counts as 8 spaces
            raise tarfile.ReadError(f"bad checksum in the tar header at byte {offset}")
        name = block[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix.decode("utf-8", "surrogateescape") + "/" + name
        size = int(block[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
        yield _Member(name, offset + 512, size)
        offset += 512 + -(-size // 512) * 512
    f.seek(offset)
    yield from tarfile.open(fileobj=f, mode="r:")


_ZERO_BLOCK = bytes(512)
_REGULAR = (0, ord("0"))


def _member_rows_into(f, member: _Member | tarfile.TarInfo, start: int, stop: int, rows: int, dest: np.ndarray,
                      chunk: tuple[int, str], column: str, label: str) -> None:
    """Rows start:stop of one `.npy` member (a chunk of `rows` examples) into `dest`, read from the file directly
    where the stored row layout is the destination's; otherwise decoded and copied (zero-padded if narrower)."""
    what = f"{chunk[1]}.{column}.npy"
    f.seek(member.offset_data)
    head = f.read(min(member.size, 512))
    parsed = _fast_npy_header(head)
    if parsed is not None:
        shape, fortran, dtype, offset = parsed
        row_items = math.prod(shape[1:])
        if member.size - offset != rows * row_items * dtype.itemsize or not shape or shape[0] != rows:
            parsed = None  # a wrong length or count is reported by the decoding path below, with its numbers
        elif not fortran and dtype == dest.dtype and tuple(shape[1:]) == dest.shape[1:]:
            if stop > start:
                f.seek(member.offset_data + offset + start * row_items * dtype.itemsize)
                want = (stop - start) * row_items * dtype.itemsize
                got = f.readinto(memoryview(dest).cast("B"))
                if got != want:
                    raise ValueError(f"{what}: {got} of {want} bytes (truncated)")
            return
    f.seek(member.offset_data)
    array = decode_npy(f.read(member.size), what)
    if array.ndim == 0 or len(array) != rows:
        raise CorruptShardError(label, f"chunk {chunk[0]} has {len(array) if array.ndim else 'no'} examples, the "
                                f"manifest says {rows}")
    try:
        dest[...] = pad_to(array[start:stop], dest.shape[1:])
    except ValueError:
        raise CorruptShardError(label, f"chunk {chunk[1]} column {column}: shape {array.shape[1:]} does not fit the "
                                f"manifest shape {list(dest.shape[1:])}") from None


def read_rows_into(
    source: str | os.PathLike,
    rows: Mapping[int, tuple[int, int]],
    into: Mapping[str, np.ndarray],
    at: Mapping[int, int],
    *,
    chunk_sizes: Sequence[int],
    expected_bytes: int | None = None,
    shard_key: str | None = None,
    name: str | None = None,
) -> None:
    """Rows start:stop (`rows[chunk]`) of chunks of one shard into `into[column][at[chunk]:...]`.

    The loader's read. From a local shard only the wanted rows' bytes are read, straight into the window's arrays:
    no buffer per member and no copy out of one, and the python work per batch is one `take` per column instead of
    one per column and chunk. A chunk whose rows are stored differently from the destination (narrower padding,
    another dtype) is decoded and copied. A URL is streamed by `iter_shard_chunks` and copied chunk by chunk. The
    checks are those of `iter_shard_chunks` with the manifest's `chunk_sizes`, `expected_bytes` and `shard_key`;
    any problem raises CorruptShardError naming the shard.
    """
    source = str(source)
    label = name or source
    if not is_local(source):
        _streamed_rows_into(source, rows, into, at, chunk_sizes, expected_bytes, shard_key, label)
        return
    path = _local_path(source)
    if not os.path.exists(path):
        raise CorruptShardError(label, "file not found")
    if expected_bytes is not None and (size := os.path.getsize(path)) != expected_bytes:
        raise CorruptShardError(label, f"{size} bytes, the manifest says {expected_bytes} (truncated, or replaced "
                                "by another file)")
    last = max(rows, default=-1)
    found: dict[int, set[str]] = {chunk: set() for chunk in rows}
    keys: dict[int, str] = {}
    index, current = -1, None
    try:
        with open(path, "rb") as f:
            for member in _tar_members(f):
                key, column = _member_key_column(member.name)
                if key != current:
                    if shard_key is not None and not key.startswith(shard_key + "_"):
                        raise CorruptShardError(label, f"holds chunk {key}, which belongs to another shard than "
                                                f"{shard_key} (the file was replaced by another shard)")
                    current, index = key, index + 1
                    if index > last:
                        break
                    keys[index] = key
                if column is None or column not in into or index not in rows:
                    continue
                start, stop = rows[index]
                offset = at[index]
                _member_rows_into(f, member, start, stop, chunk_sizes[index],
                                  into[column][offset:offset + stop - start], (index, key), column, label)
                found[index].add(column)
    except CorruptShardError:
        raise
    except (tarfile.TarError, ValueError, EOFError, OSError) as err:
        raise CorruptShardError(label, f"{type(err).__name__}: {err}") from None
    if index < last:
        raise CorruptShardError(label, f"found {index + 1} of {len(chunk_sizes)} chunks (truncated)")
    for chunk, columns in found.items():
        if missing := set(into) - columns:
            raise CorruptShardError(label, f"chunk {keys[chunk]} lacks column(s) {sorted(missing)}")


def _streamed_rows_into(source: str, rows: Mapping[int, tuple[int, int]], into: Mapping[str, np.ndarray],
                        at: Mapping[int, int], chunk_sizes: Sequence[int], expected_bytes: int | None,
                        shard_key: str | None, label: str) -> None:
    """`read_rows_into` for a shard that webdataset streams (a URL): chunk by chunk, copied."""
    got = set()
    for chunk, arrays in iter_shard_chunks(source, columns=list(into), chunks=set(rows),
                                           shapes={k: v.shape[1:] for k, v in into.items()},
                                           expected_chunks=len(chunk_sizes), expected_bytes=expected_bytes,
                                           shard_key=shard_key, name=label):
        count = len(next(iter(arrays.values())))
        if count != chunk_sizes[chunk]:
            raise CorruptShardError(label, f"chunk {chunk} has {count} examples, the manifest says "
                                    f"{chunk_sizes[chunk]}")
        start, stop = rows[chunk]
        for k, v in arrays.items():
            into[k][at[chunk]:at[chunk] + stop - start] = v[start:stop]
        got.add(chunk)
    if missing := set(rows) - got:
        raise CorruptShardError(label, f"chunk(s) {sorted(missing)} missing (truncated)")
