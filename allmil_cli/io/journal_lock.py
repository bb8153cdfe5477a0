"""One run per journal: an exclusive ``flock`` on the journal file itself.

A ``diagnose`` run locks its journal (``fcntl.flock(LOCK_EX | LOCK_NB)``) from before its models load until its
reports are written (:func:`hold`), or, when there is no journal yet, from the moment it creates it. A second run on the
same journal, fresh or ``--resume``, is refused with :class:`JournalBusy`, naming the journal and the other run (its pid
from ``/proc/locks``, else the pid and host its ``plan`` line records). The kernel releases the lock when the run ends,
however it ends (a kill included). Shards, each with its own journal, do not touch each other's locks.

The lock stays on one file: a fresh run truncates the journal in place rather than replacing it, and a run that must
replace it (dropping damaged lines on resume) locks the new file before it is renamed over the old one. A run that
gets the lock checks that the path still names the file it locked, so it never writes to a replaced one.

This module holds the locks this process has taken (:func:`hold`), so that the journal's writer (:func:`take`) uses
them instead of locking the same file a second time, which ``flock`` would refuse.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from allmil_cli.io.outputs import OutputError

#: flock errors meaning "this file system has no locks": the run goes on unlocked rather than not at all.
NO_LOCKS = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL})
RECORD_BYTES = 1 << 20  # how much of the journal's start and end is read for the other run's plan line


class JournalBusy(Exception):
    """Another live run holds the journal; the message names the journal, that run, and what to do."""


def journal_path_for(out: str | Path | None, json_out: str | Path | None) -> Path | None:
    """The default journal beside the report: ``report.csv`` -> ``report.journal.jsonl`` (None: both on stdout)."""
    for p in (out, json_out):
        if p is not None and str(p) != "-":
            p = Path(p)
            return p.with_name(f"{p.stem}.journal.jsonl")
    return None


@dataclass
class _Held:
    fd: int | None  # the locked journal; None while it does not exist yet (its writer locks it on creation)


_HELD: dict[str, _Held] = {}


def _key(path: Path) -> str:
    return os.path.realpath(path)


def lock(path: Path, create: bool) -> int | None:
    """Open ``path`` for appending and lock it: the file descriptor (None when it does not exist and not ``create``).

    Raises :class:`JournalBusy` when another process holds it, :class:`OutputError` when it cannot be opened to write.
    """
    flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    while True:
        try:
            fd = os.open(path, flags, 0o666)
        except FileNotFoundError as exc:
            if create:
                raise OutputError(path, exc) from exc
            return None
        except OSError as exc:
            raise OutputError(path, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in NO_LOCKS:
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise JournalBusy(busy_message(path)) from None
                raise OutputError(path, exc) from exc
        if same_file(fd, path):
            return fd
        os.close(fd)  # replaced or removed between open and lock: lock what is there now


def lock_new(fd: int) -> None:
    """Lock a file nobody else can have open yet (a new journal, before it is renamed into place)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in NO_LOCKS:
            raise


def same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


@contextmanager
def hold(path: Path | None) -> Iterator[None]:
    """Hold ``path``'s lock for the block: a second run on it is refused (:class:`JournalBusy`) until the block ends.

    A journal that does not exist yet is locked by its writer when it creates it (:func:`take`), and held from then on.
    """
    if path is None or _key(path) in _HELD:
        yield
        return
    key, held = _key(path), _Held(lock(path, create=False))
    _HELD[key] = held
    try:
        yield
    finally:
        _HELD.pop(key, None)
        if held.fd is not None:
            os.close(held.fd)


def take(path: Path, create: bool) -> tuple[int | None, bool]:
    """The journal's writer's lock on ``path``: the locked descriptor (None: no file and not ``create``), and whether
    the caller owns it (closes it when done) or a :func:`hold` does."""
    held = _HELD.get(_key(path))
    if held is not None and held.fd is not None and same_file(held.fd, path):
        return held.fd, False
    fd = lock(path, create)
    if held is None or fd is None:
        return fd, True
    if held.fd is not None:
        os.close(held.fd)
    held.fd = fd
    return fd, False


def switch(path: Path, old: int, new: int) -> None:
    """After ``new`` (locked) was renamed over ``path``: a :func:`hold` of ``path`` keeps ``new`` instead of ``old``."""
    held = _HELD.get(_key(path))
    if held is not None and held.fd == old:
        held.fd = new
        os.close(old)


def run_record() -> dict[str, object]:
    """Who is running: written into each run's ``plan`` line, read back by a run that finds the journal locked."""
    return {"pid": os.getpid(), "host": socket.gethostname()}


def busy_message(path: Path) -> str:
    pid, host = _holder(path)
    who = f" (pid {pid} on {host})" if pid else ""
    return (f"{path}: another allmil run{who} is using this journal; wait for it to end (or stop it), or give this run "
            "another --out or --journal (shards run side by side need one --out each).")


def _holder(path: Path) -> tuple[int | None, str]:
    """The pid and host of the run holding ``path``'s lock: from /proc/locks (this host), else its plan line."""
    pid = _lock_owner(path)
    if pid:
        return pid, f"this host, {socket.gethostname()}"
    record = _last_plan(path)
    if record and isinstance(record.get("pid"), int):
        return record["pid"], f"host {record.get('host', '?')}, as its journal records"
    return None, ""


def _lock_owner(path: Path) -> int | None:
    """The pid /proc/locks gives for a flock on ``path`` (None where there is no /proc/locks, or no such lock)."""
    try:
        st = os.stat(path)
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            text = f.read()
    except OSError:
        return None
    want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in text.splitlines():  # "1: FLOCK  ADVISORY  WRITE 2328 fe:00:2147070 0 EOF"
        parts = line.split()
        if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == want and parts[4].isdigit():
            return int(parts[4])
    return None


def _last_plan(path: Path) -> dict[str, object] | None:
    """The last ``plan`` record among the journal's first and last :data:`RECORD_BYTES` (a huge journal is not read)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(0)
            head = f.read(RECORD_BYTES)
            f.seek(max(RECORD_BYTES, size - RECORD_BYTES))
            tail = f.read(RECORD_BYTES)
    except OSError:
        return None
    for chunk in (tail, head):
        at = chunk.rfind(b'{"plan":')
        if at >= 0:
            try:
                plan = json.loads(chunk[at:].split(b"\n", 1)[0])["plan"]
            except (ValueError, KeyError, TypeError):
                continue
            return plan if isinstance(plan, dict) else None
    return None
