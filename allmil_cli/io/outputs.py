"""Output files that fail cleanly: one error type for "this output could not be written", and a probe that checks,
before a run, that a file can be created in an output's folder.

:class:`OutputError` is raised by every writer of an output (``report.atomic_write``, the journal) in place of the bare
``OSError``: it names the file, keeps the errno, and reads as one line (``cannot write report.csv: read-only file system
(EROFS)``). It is an ``OSError``, so code that catches those still does. The command line turns it into exit code 4.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

#: errno -> how the one-line message says it.
REASONS = {
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large",
    errno.EIO: "input/output error",
}
#: Errors that only a write can raise: an ``OSError`` with one of these is an output's, wherever it comes from.
WRITE_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
PROBE_BYTES = 4096  # one block: creating an empty file can succeed on a full disk, writing a block cannot


class OutputError(OSError):
    """An output that could not be written. ``probe``: found by :func:`probe` before the run (nothing was done yet)."""

    def __init__(self, path: str | Path, exc: OSError, probe: bool = False) -> None:
        super().__init__(exc.errno, exc.strerror or str(exc), str(path))
        self.path = Path(path)
        self.probe = probe

    @property
    def reason(self) -> str:
        return describe(self)

    def __str__(self) -> str:
        return f"cannot write {self.path}: {self.reason}"


def describe(exc: OSError) -> str:
    """``read-only file system (EROFS)``: what went wrong, in words, with the errno's name."""
    name = errno.errorcode.get(exc.errno or 0)
    words = REASONS.get(exc.errno or 0) or (exc.strerror or str(exc) or type(exc).__name__).lower()
    return f"{words} ({name})" if name else words


def as_output_error(path: str | Path, exc: OSError) -> OutputError:
    """``exc`` as an :class:`OutputError` for ``path`` (unchanged when it already is one)."""
    return exc if isinstance(exc, OutputError) else OutputError(path, exc)


def probe(path: str | Path, folder: str | Path | None = None) -> None:
    """Raise :class:`OutputError` (``probe=True``) naming ``path`` when no file can be written in ``folder`` (default:
    ``path``'s folder): read-only, permission denied, full disk, quota. A temporary file is created there, one block is
    written to it, and it is removed again: nothing is left behind."""
    path = Path(path)
    where = Path(folder) if folder is not None else (path.parent if str(path.parent) else Path("."))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=where)
    except OSError as exc:
        raise OutputError(path, exc, probe=True) from exc
    try:
        try:
            write_all(fd, bytes(PROBE_BYTES))
        finally:
            os.close(fd)  # a network file system may report a full disk or quota only here
    except OSError as exc:
        raise OutputError(path, exc, probe=True) from exc
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a write to a nearly full disk may write part, then fail)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
