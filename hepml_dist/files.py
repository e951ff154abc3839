"""Atomic file writes: a reader sees the old file or the whole new one, never half of it.

Everything that a later step reads back (specs, best.json, metrics.json, manifests, reports, exports, sbatch scripts)
is written to a hidden temporary file in the target's folder, flushed to disk, and renamed into place. A crash or a
kill mid-write leaves at most a stray `.NAME.*.tmp` file, never a truncated NAME. A write that fails (a full disk,
a quota, a read-only folder) is a UserError naming the file, and the previous version stays in place.
"""

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hepml_dist.errors import UserError


def _default_mode() -> int:
    """The permissions a plain open() would give (mkstemp makes files private to the owner)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def replacing(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """Yields a temporary path next to `path`; when the block ends without an error, the temporary file replaces
    `path` (with `mode`, default the umask's); on an error it is deleted and `path` is untouched."""
    path = Path(path)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise UserError(f"{path}: cannot write here ({err.strerror or err})") from None
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, _default_mode() if mode is None else mode)
        os.replace(tmp, path)
    except OSError as err:
        raise UserError(f"{path}: could not write it ({err.strerror or err}); the previous version, if any, is "
                        "untouched") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> Path:
    """Write `text` to `path` atomically (flushed to disk before the rename)."""
    with replacing(path, mode) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any, **dumps: Any) -> Path:
    """Write `obj` as indented JSON (plus a final newline) to `path` atomically."""
    return write_text(path, json.dumps(obj, indent=1, **dumps) + "\n")
