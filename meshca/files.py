"""Atomic file writes: keys are created with their final mode and never seen half-written."""

from __future__ import annotations

import errno
import os
import secrets
import stat
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int, *, overwrite: bool = True) -> None:
    """Write via a same-directory temp file created with `mode`, fsync, then publish it as `path`.

    The mode is set at creation, so a key file is never readable by others, not even briefly.
    With `overwrite=False` the file is published with link(), which fails if `path` exists, so a
    concurrent writer is never clobbered.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    except OSError as error:
        raise OSError(error.errno, error.strerror, str(path)) from None
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
            os.unlink(tmp)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if error.filename in (None, str(tmp), tmp):  # name the file the caller asked for, not the temp one
            raise OSError(error.errno, error.strerror, str(path)) from None  # same subclass (FileExistsError, ...)
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_directory(directory: Path) -> None:
    """Make renames in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        raise named(error, directory) from None
    finally:
        os.close(fd)


def named(error: OSError, path: Path) -> OSError:
    """`error` naming `path` when it names no file (os.write and os.fsync errors do not)."""
    if error.filename is not None:
        return error
    return OSError(error.errno, error.strerror, str(path))


def describe_os_error(error: OSError) -> str:
    """One line for an OS error: the file it concerns (when known) and the cause, without "[Errno N]"."""
    cause = error.strerror or str(error)
    if error.filename is not None:
        return f"{os.fsdecode(error.filename)}: {cause}"
    return cause


def read_no_follow(path: Path, limit: int) -> bytes:
    """The bytes of the regular file at `path`, which must not be a symbolic link (nor a FIFO, which would block
    the reader) and must hold at most `limit` bytes: for files in a directory someone else writes. OSError naming
    `path` otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise OSError(error.errno, "is a symbolic link (not followed here)", str(path)) from None
        raise OSError(error.errno, error.strerror, str(path)) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "is not a regular file", str(path))
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                raise OSError(errno.EFBIG, f"is larger than {limit} bytes", str(path))
        return b"".join(chunks)
    except OSError as error:
        raise named(error, path) from None
    finally:
        os.close(fd)
