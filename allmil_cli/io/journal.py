"""The run journal: one JSON line per finished patient, so a crashed or killed run loses at most the patient
in flight and ``--resume`` picks up where it stopped.

File layout (UTF-8, one JSON object per line):

- line 1, the header: ``{"allmil_journal": 1, "fingerprint": {...}, "meta": {...}}``. The fingerprint holds
  everything that changes a call (allmil version, model sha256s, thresholds, cell size, min cells, seed,
  per-image, shard...); a resume whose fingerprint differs is refused. ``meta`` is the JSON report's header.
- ``{"plan": {"n_patients": N, "started": ISO, "pid": P, "host": H}}``: written by each run (fresh or resumed) before
  its patients: how many patients that run was to cover (``allmil merge`` checks a shard journal is complete against
  it), and which process ran it (named when a second run finds the journal locked).
- ``{"patient": {...}, "key": "..."}``: one finished patient, serialised in full (per-image and per-cell data):
  the reports are rebuilt from these lines alone. ``key`` orders patients as discovery does.

Every patient line is written and fsynced before the next patient starts. A line cut short by a kill
(no trailing newline, or not valid JSON) is dropped on resume and that patient is analysed again. A write that fails
(disk full, quota) is cut back off the file, so the journal ends with the last patient that was written in full, and
raises :class:`~allmil_cli.io.outputs.OutputError`. One run at a time: the journal is ``flock``-ed by the run writing it
(:mod:`allmil_cli.io.journal_lock`; each ``plan`` line records that run's pid and host).
Floats are written with Python's shortest round-trip repr (NaN as ``NaN``), so a report rebuilt from the journal is
byte-identical to one built from the live results.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import types
import typing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from allmil_cli.io import journal_lock
from allmil_cli.io.outputs import OutputError, write_all
from allmil_cli.types.results import PatientResult

FORMAT = 1


class JournalError(Exception):
    """A journal that cannot be resumed (other weights/options, unreadable); the message is for the user."""


# ---- PatientResult <-> JSON-able dict -------------------------------------------------------------------
# Generic over the dataclasses' fields and type hints, so a field added to PatientResult, ImageResult or Cell
# (or a nested dataclass such as the images' FieldStats) is journalled without touching this module.
def encode(obj: Any) -> Any:
    """A JSON-able copy of ``obj`` (dataclasses, numpy arrays, tuples); floats keep every bit (NaN included)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.ravel().tolist(), "shape": list(obj.shape), "dtype": str(obj.dtype)}
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): encode(v) for k, v in obj.items()}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    return obj


def decode(value: Any, hint: Any) -> Any:
    """Rebuild a value of type ``hint`` from :func:`encode`'s output."""
    if value is None:
        return None
    if isinstance(value, dict) and "__ndarray__" in value:
        return np.asarray(value["__ndarray__"], dtype=value["dtype"]).reshape(value["shape"])
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is not type(None):
                try:
                    return decode(value, arg)
                except (TypeError, ValueError, KeyError):
                    continue
        return value
    if dataclasses.is_dataclass(hint):
        hints = _hints(hint)
        return hint(**{k: decode(v, hints.get(k, Any)) for k, v in value.items() if k in hints})
    if origin is list:
        return [decode(v, args[0] if args else Any) for v in value]
    if origin is tuple:
        return tuple(decode(v, args[0] if args else Any) for v in value)
    if origin is dict:
        return {k: decode(v, args[1] if len(args) == 2 else Any) for k, v in value.items()}
    if hint is float and isinstance(value, int):
        return float(value)
    return value


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = {f.name: t for f, t in ((f, typing.get_type_hints(cls).get(f.name, Any)) for f in dataclasses.fields(cls))}
    return _HINTS[cls]


def result_to_dict(r: PatientResult) -> dict[str, Any]:
    """Everything a PatientResult holds (per-image and per-cell data included), exactly."""
    return encode(r)


def result_from_dict(d: dict[str, Any]) -> PatientResult:
    return decode(d, PatientResult)


# ---- reading ---------------------------------------------------------------------------------------------
def is_journal(path: Path) -> bool:
    """True when ``path`` starts with a journal header line."""
    try:
        with open(path, "rb") as f:
            first = f.readline()
        return isinstance(head := json.loads(first), dict) and "allmil_journal" in head
    except (OSError, ValueError):
        return False


class Contents:
    """What a journal file holds: header, the latest plan, finished patients (name -> (key, result))."""

    def __init__(self) -> None:
        self.header: dict[str, Any] = {}
        self.n_planned: int | None = None
        self.patients: dict[str, tuple[str, PatientResult]] = {}
        self.bad_lines: set[int] = set()  # line numbers cut short or unparsable (dropped)

    @property
    def dropped(self) -> int:
        return len(self.bad_lines)

    @property
    def results(self) -> list[PatientResult]:
        return [r for _, r in sorted(self.patients.values(), key=lambda kr: kr[0])]


def read_journal(path: Path) -> Contents:
    """Parse a journal line by line, dropping a line cut short by a kill (and any other unparsable line)."""
    c = Contents()
    try:
        with open(path, "rb") as f:
            for i, raw in enumerate(f):
                if not _take(c, i, raw, path):
                    c.bad_lines.add(i)
    except OSError as exc:
        raise JournalError(f"{path}: cannot read the journal ({exc.strerror or exc}).") from exc
    if not c.header:
        raise JournalError(f"{path}: empty or not an allmil journal; remove it or pass another --out/--journal.")
    return c


def _take(c: Contents, i: int, raw: bytes, path: Path) -> bool:
    """Add one journal line to ``c``; False when it is cut short or unreadable (to be dropped)."""
    try:  # a line without its newline was cut short by a kill, even when what is there parses
        obj = json.loads(raw) if raw.endswith(b"\n") else None
    except ValueError:
        obj = None
    if i == 0:
        if not isinstance(obj, dict) or "allmil_journal" not in obj:
            raise JournalError(f"{path}: not an allmil journal (its first line is not a journal header); "
                               "pass another --out or --journal.")
        c.header = obj
        return True
    if isinstance(obj, dict) and "plan" in obj:
        c.n_planned = int(obj["plan"]["n_patients"])
        return True
    if isinstance(obj, dict) and "patient" in obj:
        try:
            r = result_from_dict(obj["patient"])
        except (KeyError, TypeError, ValueError, IndexError):
            return False
        c.patients[r.patient] = (str(obj.get("key", r.patient)), r)
        return True
    return not raw.strip()  # blank lines are harmless


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two fingerprints (empty when they match)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    out.append(f"{key}[{sub}]: journal {_short(a.get(sub))}, now {_short(b.get(sub))}")
        else:
            out.append(f"{key}: journal {_short(a)}, now {_short(b)}")
    return out


def _short(v: Any) -> str:
    return f"{v[:12]}..." if isinstance(v, str) and len(v) == 64 else repr(v)


# ---- writing ---------------------------------------------------------------------------------------------
class Journal:
    """An open journal, locked against a second run; :meth:`append` makes one patient durable (write, fsync)."""

    def __init__(self, path: Path, fd: int, owns: bool = True) -> None:
        self.path = path
        self._fd: int | None = fd
        self._owns = owns  # False: a journal_lock.hold() keeps the file open (and locked) after this journal closes

    @classmethod
    def create(cls, path: Path, fingerprint: dict[str, Any], meta: dict[str, Any], n_planned: int) -> Journal:
        """Start a new journal (an existing file at ``path`` is emptied and rewritten in place, keeping its lock).

        Raises :class:`~allmil_cli.io.journal_lock.JournalBusy` when another run holds it, OutputError when it cannot
        be written (then no empty journal is left behind)."""
        fd, owns = journal_lock.take(path, create=True)
        assert fd is not None
        j = cls(path, fd, owns)
        head = {"allmil_journal": FORMAT, "fingerprint": fingerprint, "meta": meta}
        try:
            try:
                os.ftruncate(fd, 0)
            except OSError as exc:
                raise OutputError(path, exc) from exc
            j._write(_line(head) + _line(_plan(n_planned)))
        except BaseException:
            j._remove_if_empty()
            j.close()
            raise
        return j

    @classmethod
    def resume(cls, path: Path, fingerprint: dict[str, Any], n_planned: int) -> tuple[Journal, Contents]:
        """Reopen ``path`` (locked) for appending after checking it was written with the same fingerprint.

        Lines cut short by a kill are dropped (cut off the end, or the file is rewritten without them, atomically).
        Raises JournalBusy while another run holds it.
        """
        fd, owns = journal_lock.take(path, create=False)
        if fd is None:
            raise JournalError(f"{path}: the journal was removed while this run started; rerun.")
        j = cls(path, fd, owns)
        try:
            contents = read_journal(path)
            diff = fingerprint_diff(contents.header.get("fingerprint", {}), fingerprint)
            if diff:
                raise JournalError(
                    f"{path}: cannot resume: this journal was written with other weights or options ("
                    + "; ".join(diff) + "). Rerun with the journal's weights and options, or start afresh without "
                    "--resume (the journal is replaced) or with another --out."
                )
            if contents.dropped:
                j._drop(contents.bad_lines)
            j._write(_line(_plan(n_planned)))
        except BaseException:
            j.close()
            raise
        return j, contents

    def append(self, result: PatientResult, key: str) -> None:
        self._write(_line({"patient": result_to_dict(result), "key": key}))

    def _write(self, text: str) -> None:
        """Append ``text`` and fsync it. A write that fails is cut back off (no torn line is left) and raised as
        :class:`OutputError`; the journal then ends with the last line written in full."""
        fd = self._open_fd()
        start = os.lseek(fd, 0, os.SEEK_END)
        try:
            write_all(fd, text.encode("utf-8"))
            os.fsync(fd)
        except OSError as exc:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass  # the part left has no newline: read_journal drops it
            raise OutputError(self.path, exc) from exc

    def _drop(self, bad: set[int]) -> None:
        """Remove the lines cut short or unreadable: cut them off when they all end the file (a kill cuts the last
        line), else write the good lines to a new file, lock it and rename it over this one."""
        fd, first = self._open_fd(), min(bad)
        cut, n_lines = 0, 0  # the bytes before the first bad line, and how many lines there are
        with open(self.path, "rb") as src:
            for i, line in enumerate(src):
                n_lines = i + 1
                if i < first:
                    cut += len(line)
        try:
            if set(range(first, n_lines)) <= bad:
                os.ftruncate(fd, cut)
                os.fsync(fd)
                return
            new, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        except OSError as exc:
            raise OutputError(self.path, exc) from exc
        try:
            journal_lock.lock_new(new)
            with open(self.path, "rb") as src:
                for i, line in enumerate(src):
                    if i not in bad:
                        write_all(new, line)
            os.fsync(new)
            os.fchmod(new, os.fstat(fd).st_mode & 0o7777)
            os.replace(tmp, self.path)
        except BaseException as exc:
            os.close(new)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            if isinstance(exc, OSError) and not isinstance(exc, OutputError):
                raise OutputError(self.path, exc) from exc
            raise
        self._fd = new
        if self._owns:
            os.close(fd)
        else:
            journal_lock.switch(self.path, fd, new)

    def _open_fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.path}: the journal is closed")
        return self._fd

    def _remove_if_empty(self) -> None:
        try:
            if self._fd is not None and os.fstat(self._fd).st_size == 0 and journal_lock.same_file(self._fd, self.path):
                os.unlink(self.path)
        except OSError:
            pass

    def close(self) -> None:
        if self._fd is not None and self._owns:
            os.close(self._fd)
        self._fd = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plan(n: int) -> dict[str, Any]:
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    return {"plan": {"n_patients": n, "started": started, **journal_lock.run_record()}}


def _line(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")) + "\n"
