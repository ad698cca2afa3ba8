"""Durable file primitives used by every layer: streamed hashing and atomic replacement.

* :func:`sha256_file` hashes a file in fixed-size chunks (``hashlib.file_digest``),
  so a 1 GB shard or checkpoint is never read whole into memory.
* :func:`read_within` reads a file only where its stored size is within a bound.
* :func:`atomic_path` / :func:`write_text_atomic` / :func:`write_json_atomic` write
  to a temporary name in the destination's own directory and ``os.replace`` it
  into place: a reader sees the old file or the new one, never a half-written
  one, and a writer that dies leaves at most a ``.<name>.<random>.tmp`` sibling
  (hidden: dot names are skipped by listings and by readers of a manifest).
* :func:`exchange_dirs` swaps two directories in one ``renameat2(RENAME_EXCHANGE)``
  call (Linux), which is how a published folder is replaced without a moment
  where it does not exist.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path

__all__ = ["sha256_file", "read_within", "update_from_file", "atomic_path", "write_text_atomic", "write_bytes_atomic",
           "write_json_atomic", "exchange_dirs", "tmp_name"]


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of the file at ``path``, read in chunks (memory does not grow with the file)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_within(path: str | Path, limit: int) -> tuple[bytes | None, int]:
    """``(bytes, size)`` of the file at ``path``, or ``(None, size)`` where its stored size is over ``limit``
    bytes: such a file is refused from its size and never read (ingest's and the shard builder's bound)."""
    size = Path(path).stat().st_size
    return (None if size > limit else Path(path).read_bytes()), size


def update_from_file(h, path: str | Path, *, chunk_bytes: int = 1 << 20):
    """Feed the file's bytes into the hash object ``h`` in chunks (the same digest as ``h.update(read_bytes())``)."""
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h


def tmp_name(dest: Path) -> Path:
    """A hidden temporary sibling of ``dest`` (same directory, so ``os.replace`` is atomic)."""
    return dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.tmp")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(dest: str | Path, *, fsync: bool = True):
    """``with atomic_path(dest) as tmp: write(tmp)``: ``tmp`` replaces ``dest`` when the block succeeds.

    The temporary file is removed if the block raises; ``dest`` is then untouched.
    With ``fsync`` the file's bytes reach the disk before the rename, so after a
    power loss ``dest`` is the old file or the complete new one.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(dest)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(dest.parent)


def write_bytes_atomic(dest: str | Path, data: bytes) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)
    return Path(dest)


def write_text_atomic(dest: str | Path, text: str) -> Path:
    with atomic_path(dest) as tmp:
        tmp.write_text(text)
    return Path(dest)


def write_json_atomic(dest: str | Path, obj, **dumps_kwargs) -> Path:
    return write_text_atomic(dest, json.dumps(obj, **{"indent": 2, **dumps_kwargs}))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def exchange_dirs(a: str | Path, b: str | Path) -> None:
    """Swap the paths ``a`` and ``b`` (both must exist) in one atomic step.

    Raises ``NotImplementedError`` where the kernel, C library or filesystem has no
    ``renameat2(RENAME_EXCHANGE)``, and ``OSError`` naming both paths otherwise.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError) as err:
        raise NotImplementedError(f"renameat2 is not available: {err}") from None
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) != 0:
        e = ctypes.get_errno()
        if e in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise NotImplementedError(f"renameat2(RENAME_EXCHANGE) of {a} and {b}: {os.strerror(e)}")
        raise OSError(e, f"exchanging {a} and {b}: {os.strerror(e)}")
