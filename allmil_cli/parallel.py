"""Execution machinery of the pipeline: decode look-ahead threads, and worker processes that analyse whole files.

Two feeders, one contract: files are *scheduled* in the order the pipeline will ask for them, and *fetched*
in that order (a file fetched out of order drops the ones scheduled before it; a file never scheduled is
analysed by the caller). At most ``LOOKAHEAD_PER_WORKER`` files per worker are in flight, so memory stays
bounded however long the run.

- :class:`ThreadLookahead` (``--workers 1``): threads decode and measure upcoming files while the main
  thread runs the networks (Pillow and numpy release the GIL).
- :class:`ProcessPool` (``--workers N``, N > 1): N worker processes, each holding its own onnxruntime
  sessions (loaded and sha256-checked once per worker, ``intra_op_num_threads=1``), each analysing whole
  files (decode, ruler, detector, boxes, crops, and the embedder when it runs on the CPU) with the very
  code the serial path runs (:meth:`allmil_cli.pipeline.Pipeline.analyse_file`), so results are identical.
  Workers start with ``forkserver`` (``spawn`` where that is missing): never ``fork``, which would copy
  onnxruntime's thread pools mid-flight. They ignore Ctrl-C; the main process stops and reaps them.

Nothing here imports :mod:`allmil_cli.pipeline` at module level (the pipeline imports this module).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import select
import signal
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from allmil_cli.images import Field
    from allmil_cli.pipeline import Cell, ImageResult

#: Files in flight per worker (one being analysed, one waiting): bounds memory and keeps workers busy.
LOOKAHEAD_PER_WORKER = 2
#: A worker process that dies (killed, crashed in a decoder) takes the files in flight with it: the pool is
#: replaced and they are analysed again, at most this often per file before the file is reported as failed.
MAX_FILE_RETRIES = 2


@dataclass
class FieldOutcome:
    """One field as a worker hands it back (picklable). ``info.status`` failed: the rest is empty."""

    info: ImageResult
    cells: list[Cell] = field(default_factory=list)
    features: np.ndarray | None = None  # (n, 256), once embedded
    crops: np.ndarray | None = None  # uint8 (n, 224, 224, 3): stain-mapped, awaiting the embedder ("crops"), or raw ("detect+crops")
    decoded: Field | None = None  # the decoded field, only when asked for (``Pipeline.on_field``)


@dataclass
class FileOutcome:
    """One file: its fields in page order, notes on skipped pages, or ``error`` (ImageError text) when unusable."""

    path: Path
    fields: list[FieldOutcome] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    error: str | None = None


class StageTimer:
    """Wall-clock seconds spent per pipeline stage, summed over a run (for the benchmark).

    ``decode`` is the time the analysis waited for a decoded file; ``scale`` (the red-cell ruler) runs in
    the look-ahead threads, overlapping the networks. With worker processes, their stage seconds are added
    (summed over the workers, so they exceed the wall clock) and ``wait`` is the time this process waited.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self._lock = threading.Lock()  # the look-ahead threads time the ruler too

    def add(self, stage: str, start: float) -> float:
        now = time.perf_counter()
        with self._lock:
            self.seconds[stage] += now - start
        return now

    def add_seconds(self, stage: str, seconds: float) -> None:
        """Add seconds measured elsewhere (a worker process: there, stages are summed over the workers)."""
        with self._lock:
            self.seconds[stage] += seconds


def default_workers() -> int:
    """All cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` where that is missing)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def start_method() -> str:
    """``forkserver`` where the platform has it, else ``spawn``; never ``fork`` (onnxruntime holds threads)."""
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


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
        q = self._queue
        while q.upcoming and len(q.pending) < q.depth:
            path = q.pop()
            q.pending.append((path, self._submit(path)))

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


# ---- worker processes --------------------------------------------------------------------------
_WORKER: Any = None  # the worker process's Pipeline
_WORKER_ERROR: str | None = None  # why it could not be built


def _exit_with(pid: int) -> None:
    """Exit this worker as soon as process ``pid`` (the main process) is gone, however it died (even SIGKILL).

    A pool worker otherwise outlives a killed main process: it holds both ends of its own task pipe, so it never
    sees end-of-file, and the forkserver lives as long as its children.
    """
    try:
        fd = os.pidfd_open(pid)  # Linux >= 5.3: readable when the process exits
        select.select([fd], [], [])
    except (AttributeError, OSError):  # no pidfd here: poll
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            except PermissionError:
                pass
            time.sleep(1.0)
    os._exit(1)


def _init_worker(weights_dir: str, sha256: dict[str, str] | None, options: Any, main_pid: int) -> None:
    """Runs once in each worker process: load and check the models, build a serial Pipeline."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    threading.Thread(target=_exit_with, args=(main_pid,), name="allmil-watch-main", daemon=True).start()
    global _WORKER, _WORKER_ERROR
    try:
        from dataclasses import replace

        from allmil_cli.models import load_models
        from allmil_cli.pipeline import Pipeline

        models = load_models(Path(weights_dir), device="cpu", threads=1)
        if sha256 is not None and models.sha256 != sha256:
            raise RuntimeError(f"{weights_dir}: the model files changed since the run started; restart the run.")
        _WORKER = Pipeline(models, replace(options, workers=1, decode_workers=1))
    except Exception as exc:  # noqa: BLE001 - reported by the main process (start), not as a broken pool
        _WORKER_ERROR = str(exc) or type(exc).__name__


def _work(path: Path, mode: str, keep_field: bool) -> tuple[Any, dict[str, float]]:
    """One file in a worker: its :class:`FileOutcome` and the stage seconds it took there."""
    pipeline = _WORKER
    if pipeline is None:
        raise WorkerStartError(f"a worker process could not load the models ({_WORKER_ERROR})")
    pipeline.timer.seconds.clear()
    outcome = pipeline.analyse_file(path, mode=mode, keep_field=keep_field)
    return outcome, dict(pipeline.timer.seconds)


def _started() -> tuple[str | None, dict[str, str] | None]:
    return _WORKER_ERROR, None if _WORKER is None else dict(_WORKER.models.sha256)


class WorkerStartError(RuntimeError):
    """The worker processes could not start (models unloadable there); the message is for the user."""


class ProcessPool:
    """``workers`` processes analysing whole files in order (see the module docstring).

    ``on_stage(stage, seconds)`` receives each worker's stage seconds (for the benchmark's breakdown).
    ``failed(path, reason)`` builds the outcome of a file whose worker died twice or raised unexpectedly.
    """

    def __init__(self, weights_dir: Path, sha256: dict[str, str] | None, options: Any, workers: int,
                 failed: Callable[[Path, str], Any] | None = None, on_stage: Callable[[str, float], None] | None = None) -> None:
        self.workers = max(1, int(workers))
        self.weights_dir, self.options, self.sha256 = Path(weights_dir).resolve(), options, sha256
        self._initargs = (str(weights_dir), None if sha256 is None else dict(sha256), options, os.getpid())
        self._failed = failed or (lambda path, reason: None)
        self._on_stage = on_stage
        self._starting: list[Future] = []
        self._queue = _Ordered(LOOKAHEAD_PER_WORKER * self.workers)
        self._tries: dict[Hashable, int] = {}
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._ready = False  # every worker has reported its models (start())

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            ctx = mp.get_context(start_method())
            if ctx.get_start_method() == "forkserver":
                ctx.set_forkserver_preload(["allmil_cli.pipeline", "onnxruntime", "scipy.ndimage"])
            self._executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=ctx, initializer=_init_worker,
                                                 initargs=self._initargs)
        return self._executor

    def launch(self) -> None:
        """Start the workers loading their models, without waiting for them."""
        if not self._starting:
            pool = self._pool()
            self._starting = [pool.submit(_started) for _ in range(self.workers)]

    def adopt(self, sha256: dict[str, str], failed: Callable[[Path, str], Any],
              on_stage: Callable[[str, float], None] | None) -> None:
        """Take over a pool launched before the run's models were loaded (:func:`prestart`)."""
        self.sha256, self._failed, self._on_stage = dict(sha256), failed, on_stage

    def start(self) -> None:
        """Wait until every worker has loaded its models (the run's, by sha256); :class:`WorkerStartError` if not."""
        self.launch()
        try:
            started = [f.result() for f in self._starting]
        except BrokenProcessPool as exc:
            self.close()
            raise WorkerStartError(f"the worker processes could not start ({exc}); rerun with --workers 1.") from exc
        errors = [e for e, _ in started if e]
        if not errors and self.sha256 is not None and any(s != self.sha256 for _, s in started):
            errors = [f"{self.weights_dir}: the model files changed since the run started; restart the run"]
        if errors:
            self.close()
            raise WorkerStartError(f"the worker processes could not start: {errors[0]}; rerun with --workers 1.")
        self._ready = True

    def schedule(self, paths: list[Path], mode: str, keep_field: bool) -> None:
        self._queue.push((p, mode, keep_field) for p in paths)
        self._refill()

    def _refill(self) -> None:
        q = self._queue
        while q.upcoming and len(q.pending) < q.depth:
            key = q.pop()
            q.pending.append((key, self._submit(key)))

    def _submit(self, key: Hashable) -> Future:
        try:
            return self._pool().submit(_work, *key)
        except BrokenProcessPool as exc:  # found broken on submit: handled like a broken future, when fetched
            fut: Future = Future()
            fut.set_exception(exc)
            return fut

    def scheduled(self, path: Path, mode: str, keep_field: bool) -> bool:
        key = (path, mode, keep_field)
        return self._queue.is_upcoming(key) or self._queue.is_pending(key)

    def fetch(self, path: Path, mode: str, keep_field: bool) -> Any | None:
        """The file's outcome, or None when it was not scheduled (the caller analyses it itself)."""
        key = (path, mode, keep_field)
        fut = self._queue.take(key, self._submit)
        if fut is None:
            return None
        if not self._ready:  # the first result: first make sure every worker runs the run's models
            self.start()
        while True:
            try:
                outcome, seconds = fut.result()
            except BrokenProcessPool as exc:  # a worker died (killed, or crashed inside a decoder)
                fut = self._restart(key, exc)
                if fut is None:
                    self._refill()
                    return self._failed(path, f"the worker process analysing it died ({exc or 'killed'}); "
                                              "check the file (re-export it) and the free memory, then rerun.")
                continue
            except WorkerStartError:
                raise
            except Exception as exc:  # noqa: BLE001 - unexpected error inside the worker: this file's problem only
                self._refill()
                return self._failed(path, f"unexpected error while analysing ({exc}); re-export the image.")
            break
        self._tries.pop(key, None)
        self._refill()
        if self._on_stage is not None:
            for stage, s in seconds.items():
                self._on_stage(stage, s)
        return outcome

    def _restart(self, key: Hashable, exc: BaseException) -> Future | None:
        """Replace the broken pool and resubmit what was in flight; None when ``key`` has used its retries."""
        tries = self._tries.get(key, 0) + 1
        self._tries[key] = tries
        lost = [k for k, _ in self._queue.pending]
        self._queue.pending.clear()
        self._terminate()
        self._queue.push(lost, front=True)
        if tries > MAX_FILE_RETRIES:
            return None
        fut = self._submit(key)
        self._refill()
        return fut

    def _terminate(self) -> None:
        ex, self._executor = self._executor, None
        if ex is None:
            return
        procs = list(getattr(ex, "_processes", {}).values())  # no public way to stop busy workers before 3.14
        ex.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join(timeout=1)

    def close(self) -> None:
        """Drop what is in flight and stop the workers (no orphan processes, also after Ctrl-C)."""
        self._queue.clear()
        with self._lock:
            self._terminate()


# ---- workers started early ---------------------------------------------------------------------
_PRESTARTED: list[ProcessPool] = []


def _settings(options: Any) -> Any:
    from dataclasses import replace

    return replace(options, workers=1, decode_workers=1)


def prestart(weights_dir: Path, options: Any, workers: int) -> None:
    """Launch ``workers`` worker processes now, so their start (imports, model load) overlaps the main process's
    own; the next :class:`allmil_cli.pipeline.Pipeline` with the same weights, options and workers takes them
    over (:func:`take_prestarted`). Unclaimed ones are stopped at exit."""
    if workers <= 1 or _PRESTARTED:
        return
    pool = ProcessPool(weights_dir, None, options, workers)
    pool.launch()
    _PRESTARTED.append(pool)
    import atexit

    atexit.register(pool.close)


def take_prestarted(weights_dir: Path, options: Any, workers: int) -> ProcessPool | None:
    """The pool :func:`prestart` launched, if it fits this run (else it is stopped)."""
    if not _PRESTARTED:
        return None
    pool = _PRESTARTED.pop()
    if (pool.workers, pool.weights_dir, _settings(pool.options)) == (workers, Path(weights_dir).resolve(), _settings(options)):
        return pool
    pool.close()
    return None
