"""Local file reader: confined to configured roots, regular files only, size-capped."""

from __future__ import annotations

import errno
import os
import stat

from mumic_batch.core.status import ACCESS_DENIED, BLOCKED_PATH, FETCH_ERROR, NOT_FOUND, TOO_LARGE
from mumic_batch.io.fetch_base import FetchError

_CHUNK = 1024 * 1024
# O_NOFOLLOW: a symlink swapped in after the root check is refused, not followed.
# O_NONBLOCK: opening a FIFO must not hang the worker waiting for a writer.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def resolve_roots(roots: tuple[str, ...]) -> tuple[str, ...]:
    """Configured roots as real absolute paths (symlinks in the roots themselves resolved)."""
    return tuple(os.path.realpath(os.path.expanduser(r)) for r in roots)


def confine(path: str, roots: tuple[str, ...]) -> str:
    """The real path of `path`; raises FetchError(BLOCKED_PATH) when it escapes every root."""
    real = os.path.realpath(path)  # normalises '..' and follows every symlink
    if roots and not any(_within(real, root) for root in roots):
        raise FetchError(BLOCKED_PATH, f"{path} resolves outside fetch.local_roots")
    return real


def _within(real: str, root: str) -> bool:
    return real == root or real.startswith(root.rstrip(os.sep) + os.sep)


def read_local(path: str, roots: tuple[str, ...], max_bytes: int) -> bytes:
    """Bytes of a regular file under `roots` (already real paths); raises FetchError."""
    real = confine(path, roots)
    try:
        fd = os.open(real, _OPEN_FLAGS)
    except OSError as err:
        raise _classify(err, path) from err
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):  # devices, FIFOs, sockets, directories
            raise FetchError(BLOCKED_PATH, f"{path} is not a regular file")
        if info.st_size > max_bytes:
            raise FetchError(TOO_LARGE, f"{path} has {info.st_size} bytes > max_bytes {max_bytes}")
        return _read_capped(fd, path, max_bytes)
    finally:
        os.close(fd)


def _read_capped(fd: int, path: str, max_bytes: int) -> bytes:
    # Count while reading too: the file may grow after fstat, and /proc files report size 0.
    data = bytearray()
    while True:
        try:
            chunk = os.read(fd, _CHUNK)
        except OSError as err:
            raise _classify(err, path) from err
        if not chunk:
            return bytes(data)
        data += chunk
        if len(data) > max_bytes:
            raise FetchError(TOO_LARGE, f"{path} exceeds max_bytes {max_bytes}")


def _classify(err: OSError, path: str) -> FetchError:
    if err.errno in (errno.ENOENT, errno.ENOTDIR):
        return FetchError(NOT_FOUND, f"{path}: no such file")
    if err.errno in (errno.EACCES, errno.EPERM):
        return FetchError(ACCESS_DENIED, f"{path}: permission denied")
    if err.errno in (errno.ELOOP, errno.EISDIR):
        return FetchError(BLOCKED_PATH, f"{path}: symlink or directory refused")
    return FetchError(FETCH_ERROR, f"{path}: {err.strerror or err}")
