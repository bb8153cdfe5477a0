"""The look-ahead every executor shares: work scheduled in order, fetched in order, a bounded number in flight.

Two feeders (:class:`ThreadLookahead` here; worker processes in :mod:`allmil_cli.executors.workers`), one contract: files
are *scheduled* in the order the run will ask for them, and *fetched* in that order (a file fetched out of order drops the ones scheduled before it; a file never scheduled is
analysed by the caller). At most ``LOOKAHEAD_PER_WORKER`` files per worker are in flight, so memory stays
bounded however long the run.

- :class:`ThreadLookahead` (``--workers 1``): threads decode and measure upcoming files while the main
  thread runs the networks (Pillow and numpy release the GIL).
- :class:`allmil_cli.executors.workers.ProcessPool` (``--workers N``, N > 1): worker processes analysing whole files.

Standard library only: the worker processes' forkserver is started through :mod:`allmil_cli.executors.workers`, which imports
this module, before the main process's own heavy imports.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

#: Files in flight per worker (one being analysed, one waiting): bounds memory and keeps workers busy.
LOOKAHEAD_PER_WORKER = 2


class _Ordered:
    """Scheduled keys and their futures, in order; the common part of both feeders.

    ``upcoming``: keys scheduled, not yet submitted (with a count per key, so membership is O(1) however long the
    run); ``pending``: at most ``depth`` submitted keys and their futures."""

    def __init__(self, depth: int) -> None:
        self.depth = max(1, depth)
        self.upcoming: deque[Hashable] = deque()
        self._count: Counter[Hashable] = Counter()
        self.pending: deque[tuple[Hashable, Future]] = deque()

    def push(self, keys: Iterable[Hashable], front: bool = False) -> None:
        """Schedule ``keys`` after (or, ``front``, before) those already waiting, in their order."""
        keys = list(keys)
        self._count.update(keys)
        if front:
            self.upcoming.extendleft(reversed(keys))
        else:
            self.upcoming.extend(keys)

    def pop(self) -> Hashable:
        """The next waiting key (removed)."""
        key = self.upcoming.popleft()
        self._count[key] -= 1
        if self._count[key] <= 0:
            del self._count[key]
        return key

    def is_upcoming(self, key: Hashable) -> bool:
        return key in self._count

    def is_pending(self, key: Hashable) -> bool:
        return any(k == key for k, _ in self.pending)

    def take(self, key: Hashable, submit: Callable[[Hashable], Future]) -> Future | None:
        """The future of ``key``, dropping keys scheduled before it; None when ``key`` was never scheduled."""
        if not self.is_pending(key):
            if not self.is_upcoming(key):
                return None
            while self.pop() != key:  # scheduled, not yet submitted: drop everything before it
                pass
            for _, fut in self.pending:
                fut.cancel()
            self.pending.clear()
            return submit(key)
        while True:
            k, fut = self.pending.popleft()
            if k == key:
                return fut
            fut.cancel()

    def refill(self, submit: Callable[[Hashable], Future]) -> None:
        """Submit waiting keys, in order, until ``depth`` are in flight."""
        while self.upcoming and len(self.pending) < self.depth:
            key = self.pop()
            self.pending.append((key, submit(key)))

    def clear(self) -> None:
        self.upcoming.clear()
        self._count.clear()
        for _, fut in self.pending:
            fut.cancel()
        self.pending.clear()


class ThreadLookahead:
    """Decode (and measure) upcoming files in threads; ``read(path)`` is what each thread runs."""

    def __init__(self, read: Callable[[Path], Any], workers: int = 1) -> None:
        self._read = read
        self._workers = max(1, int(workers))
        self._queue = _Ordered(LOOKAHEAD_PER_WORKER * self._workers)
        self._executor: ThreadPoolExecutor | None = None

    def schedule(self, paths: list[Path]) -> None:
        self._queue.push(paths)
        self._refill()

    def _refill(self) -> None:
        self._queue.refill(self._submit)

    def _submit(self, path: Hashable) -> Future:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="allmil-decode")
        return self._executor.submit(self._read, path)

    def fetch(self, path: Path) -> Any:
        """``read(path)``'s result (or its exception), from the look-ahead when it was scheduled."""
        fut = self._queue.take(path, self._submit)
        self._refill()
        return self._read(path) if fut is None else fut.result()

    def close(self) -> None:
        self._queue.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
