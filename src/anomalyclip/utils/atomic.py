"""Writes that are either complete or absent: a temporary file beside the target, then rename.

The file ends with the permissions a plain ``open()`` would have given it (0666 less the
umask), or the mode of the file it replaces: ``mkstemp`` creates 0600 files, which would
lock colleagues, web servers and shared caches out of every result.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

# errno values that mean "the device is full", whoever reports them.
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
# torch's zip writer reports a failed write as a RuntimeError from C++ and drops the errno.
TORCH_WRITER_FAILURES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed")
# numpy's ``tofile`` (under ``np.save``) reports a short fwrite as an OSError with no errno.
NUMPY_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")
SHORT_WRITE = "no space left on device (the write stopped short)"


class WriteFailedError(OSError):
    """A file could not be written; the message names it and says why in one line.

    An ``OSError`` subclass so that callers that already handle failed writes keep doing so,
    but with ``filename`` set and "no space left on device" spelled out, where the writer
    would have said ``[Errno 28]`` without a path or ``inline_container.cc: unexpected pos``.
    """

    def __init__(self, path: str | os.PathLike, reason: str, code: int | None = None) -> None:
        super().__init__(code or 0, f"cannot write {path}: {reason}")
        self.filename = os.fspath(path)
        self.reason = reason

    def __str__(self) -> str:
        return str(self.args[1])

    def __reduce__(self) -> tuple[Any, ...]:
        # OSError's own pickling passes (errno, message) back to __init__, which wants a
        # path: torchrun sends rank 0's failure to the other ranks this way.
        return (type(self), (self.filename, self.reason, self.errno))

    @property
    def disk_full(self) -> bool:
        return self.errno in NO_SPACE_ERRNOS


def write_failure(path: str | os.PathLike, error: BaseException) -> WriteFailedError | None:
    """``error`` as a :class:`WriteFailedError` about ``path``; None if it is no write failure."""
    if isinstance(error, WriteFailedError):
        return error
    if (
        isinstance(error, OSError)
        and error.errno is None
        and NUMPY_SHORT_WRITE.fullmatch(str(error))
    ):
        return WriteFailedError(path, SHORT_WRITE, errno.ENOSPC)
    if isinstance(error, OSError) and error.errno is not None:
        reason = "no space left on device" if error.errno in NO_SPACE_ERRNOS else error.strerror
        return WriteFailedError(path, reason or str(error), error.errno)
    if isinstance(error, RuntimeError) and any(m in str(error) for m in TORCH_WRITER_FAILURES):
        # The C++ writer loses errno; a short write on a local file is almost always a full disk.
        reason = "no space left on device (the write stopped short)"
        return WriteFailedError(path, reason, errno.ENOSPC)
    return None


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file in the target's folder; rename it over the target on success.

    On any exception the temporary file is removed and the target is left untouched. A
    failed write (full disk, quota, permissions, torch's writer stopping short) is raised
    as :class:`WriteFailedError` naming the target.
    """
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as error:
        raise (write_failure(target, error) or error) from error
    try:
        os.fchmod(fd, _mode_for(target))
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, target)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        failure = write_failure(target, error) if isinstance(error, Exception) else None
        if failure is not None and failure is not error:
            raise failure from error
        raise


def current_umask() -> int:
    """The process's umask.

    Linux reports it in /proc without changing it; elsewhere reading it means setting it
    and straight back, which another thread creating a file at that instant could see.
    """
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text()
        line = next(line for line in status.splitlines() if line.startswith("Umask:"))
        return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _mode_for(target: Path) -> int:
    """An existing file's permission bits, else what ``open()`` would create."""
    try:
        return target.stat().st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    """``data`` as JSON; NaN and infinity are refused (they are not JSON, and no reader
    of a result should have to guess what ``NaN`` meant)."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_open(path, "wb") as handle:
        torch.save(obj, handle)
