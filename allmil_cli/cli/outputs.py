"""What the ``allmil`` commands do about their output files. Used by the ``cli*.py`` modules only.

- :func:`check_outputs`, first thing (before models load or workers start): each output of the command (report, JSON,
  review page, crops folder, journal...) must be writable. A temporary file is written beside it and removed again, so
  a read-only folder, a missing permission or a full disk ends the run at once with one line naming the file, why, and
  what to do: exit 4. ``-`` (stdout) is exempt. With a journal, it also takes the journal's lock
  (:mod:`allmil_cli.io.journal_lock`), held until the command ends: a second run on the same journal is refused, exit 2.
- :func:`fails_cleanly`, around each command: a write error during or after the run (an
  :class:`~allmil_cli.io.outputs.OutputError` from any writer, or an ``OSError`` about one of the command's outputs) ends
  it the same way: one line, exit 4, no traceback. Temporary files are gone (``atomic_write`` removes its own) and the
  journal keeps every patient finished before the error, so ``--resume`` goes on once it is fixed.
"""

from __future__ import annotations

import errno
import functools
import os
from collections.abc import Callable
from contextlib import ExitStack
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, TypeVar, cast

from allmil_cli.cli.console import EXIT_USAGE, check_output, fail
from allmil_cli.io.journal_lock import JournalBusy, hold
from allmil_cli.io.outputs import WRITE_ERRNOS, OutputError, describe, probe

EXIT_OUTPUT = 4
F = TypeVar("F", bound=Callable[..., Any])


@dataclass
class _Outputs:
    """The running command's outputs (absolute path -> its option, for the advice), its journal, and its locks."""

    files: dict[str, str] = field(default_factory=dict)
    folders: dict[str, str] = field(default_factory=dict)
    journal: Optional[Path] = None
    locks: ExitStack = field(default_factory=ExitStack)

    def option_for(self, path: str | Path) -> Optional[str]:
        p = os.path.abspath(path)
        if p in self.files:
            return self.files[p]
        return next((flag for folder, flag in self.folders.items() if p == folder or p.startswith(folder + os.sep)), None)


_CURRENT: ContextVar[Optional[_Outputs]] = ContextVar("allmil_outputs", default=None)


def fails_cleanly(command: F) -> F:
    """Run ``command`` so that an output it cannot write ends it with one line naming the file (exit 4)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        outputs = _Outputs()
        token = _CURRENT.set(outputs)
        try:
            with outputs.locks:
                return command(*args, **kwargs)
        except OSError as exc:
            path = _failed_output(exc, outputs)
            if path is None:
                raise
            fail(write_error_message(exc, path, outputs), EXIT_OUTPUT)
        finally:
            _CURRENT.reset(token)

    return cast(F, run)


def check_outputs(files: dict[str, Any], folders: Optional[dict[str, Optional[Path]]] = None,
                  journal: Optional[Path] = None) -> None:
    """Check, before any analysis, that every output can be written (``files``/``folders``: option -> path; None and
    ``-`` are skipped), then lock ``journal``. Ends the run: exit 2 for a missing folder, a folder given as a file or a
    journal another run holds; exit 4 for an output that cannot be written. Folders are created (as the run would)."""
    outputs = _CURRENT.get()
    if outputs is None:
        raise RuntimeError("check_outputs() runs inside a command decorated with @fails_cleanly")
    named = [(flag, Path(p)) for flag, p in files.items() if p is not None and str(p) != "-"]
    named += [("--journal", journal)] if journal is not None else []
    dirs = [(flag, d) for flag, d in (folders or {}).items() if d is not None]
    for flag, p in named:
        check_output(p, flag)
        outputs.files.setdefault(os.path.abspath(p), flag)
    for flag, d in dirs:
        if d.exists() and not d.is_dir():
            fail(f"{flag} {d}: is a file; give a folder (it is created when missing).", EXIT_USAGE)
        outputs.folders[os.path.abspath(d)] = flag
    for _, p in named:
        probe(p)
    if journal is not None:
        outputs.journal = journal
        try:
            outputs.locks.enter_context(hold(journal))
        except JournalBusy as exc:
            fail(str(exc), EXIT_USAGE)
    for _, d in dirs:
        try:
            d.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(d, exc, probe=True) from exc
        probe(d, folder=d)


def _failed_output(exc: OSError, outputs: _Outputs) -> Optional[Path]:
    """The output ``exc`` failed to write, or None when ``exc`` is not about writing an output."""
    if isinstance(exc, OutputError):
        return exc.path
    name = exc.filename
    if isinstance(name, (str, os.PathLike)) and (outputs.option_for(name) or exc.errno in WRITE_ERRNOS):
        return Path(name)
    return None


def write_error_message(exc: OSError, path: Path, outputs: _Outputs) -> str:
    """``cannot write FILE: WHY (ERRNO); WHAT TO DO.``, with ``--resume`` advice once the journal holds patients."""
    flag = outputs.option_for(path)
    other = f"choose another {flag} folder" if flag else "write it to another folder"
    folder = path if os.path.abspath(path) in outputs.folders else path.parent
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        todo = f"free space on that disk{' or raise the quota' if exc.errno == errno.EDQUOT else ''}, or {other}"
    elif exc.errno == errno.EROFS:
        todo = other
    elif exc.errno in (errno.EACCES, errno.EPERM):
        todo = f"make {folder} writable for this user, or {other}"
    else:
        todo = f"check that disk and {folder}, or {other}"
    journal = outputs.journal
    started = not getattr(exc, "probe", False) and journal is not None and _has_header(journal)
    then = (f"; the journal {journal} keeps every patient finished before this: rerun with --resume once fixed"
            if started else ", then rerun")
    return f"cannot write {path}: {describe(exc)}; {todo}{then}."


def _has_header(journal: Path) -> bool:
    try:
        return journal.stat().st_size > 0
    except OSError:
        return False
