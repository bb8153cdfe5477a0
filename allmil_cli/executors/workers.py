"""Worker processes (``--workers N``, N > 1) that analyse whole files, and their early start.

:class:`ProcessPool`: N worker processes. Each builds its :class:`FileWorker` once with the factory it is handed
(by default :func:`allmil_cli.stages.analysis.open_analyser`: its own onnxruntime sessions, sha256-checked,
``intra_op_num_threads=1``) and runs its ``analyse_file`` on whole files (decode, ruler, detector, boxes, crops,
and the embedder when it runs on the CPU): the very code the serial path runs, so results are identical. Files are scheduled and fetched
in order, at most ``LOOKAHEAD_PER_WORKER`` per worker in flight (the contract of :mod:`allmil_cli.executors.parallel`).
Workers start with ``forkserver`` (``spawn`` where that is missing): never ``fork``, which would copy
onnxruntime's thread pools mid-flight. They ignore Ctrl-C; the main process stops and reaps them.
:func:`prestart` launches them as the CLI starts, so their imports and model loads overlap the main process's.

This module imports only the standard library and :mod:`allmil_cli.executors.parallel` when it loads (the CLI starts the
forkserver through it before its own heavy imports); it never imports :mod:`allmil_cli.pipeline.runner`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from allmil_cli.executors.parallel import LOOKAHEAD_PER_WORKER, _Ordered

if TYPE_CHECKING:
    from allmil_cli.types.results import FileOutcome, Options, StageTimer

#: A worker process that dies (killed, crashed in a decoder) takes the files in flight with it: the pool is
#: replaced and they are analysed again, at most this often per file before the file is reported as failed.
MAX_FILE_RETRIES = 2


def default_workers() -> int:
    """All cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` where that is missing)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS, Windows
        return max(1, os.cpu_count() or 1)


def start_method() -> str:
    """``forkserver`` where the platform has it, else ``spawn``; never ``fork`` (onnxruntime holds threads)."""
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


#: What the forkserver imports once, so that each worker it forks starts with them loaded.
PRELOAD = ["allmil_cli.stages.analysis", "onnxruntime", "scipy.ndimage"]


class FileWorker(Protocol):
    """What a worker process runs on each file; built once per process by the pool's factory."""

    timer: StageTimer

    @property
    def sha256(self) -> dict[str, str]: ...  # the model files it runs (checked against the main process's)

    def analyse_file(self, path: Path, mode: str, keep_field: bool) -> FileOutcome: ...


#: Builds a worker process's :class:`FileWorker` from (weights folder, the run's model sha256s, the run's options);
#: a module-level function, so it pickles by name. Default: :func:`allmil_cli.stages.analysis.open_analyser`.
WorkerFactory = Callable[[str, "dict[str, str] | None", "Options"], FileWorker]


def default_factory() -> WorkerFactory:
    """The field analyser (imported here, not at the top: this module must load light, see the module docstring)."""
    from allmil_cli.stages.analysis import open_analyser

    return open_analyser


_WORKER: FileWorker | None = None  # this worker process's analyser
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


def _init_worker(factory: WorkerFactory, weights_dir: str, sha256: dict[str, str] | None, options: Options,
                 main_pid: int) -> None:
    """Runs once in each worker process: build its :class:`FileWorker` (load and check the models)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle
    threading.Thread(target=_exit_with, args=(main_pid,), name="allmil-watch-main", daemon=True).start()
    global _WORKER, _WORKER_ERROR
    try:
        _WORKER = factory(weights_dir, sha256, options)
    except Exception as exc:  # noqa: BLE001 - reported by the main process (start), not as a broken pool
        _WORKER_ERROR = str(exc) or type(exc).__name__


def _work(path: Path, mode: str, keep_field: bool) -> tuple[FileOutcome, dict[str, float]]:
    """One file in a worker: its :class:`~allmil_cli.types.results.FileOutcome` and the stage seconds it took there."""
    worker = _WORKER
    if worker is None:
        raise WorkerStartError(f"a worker process could not load the models ({_WORKER_ERROR})")
    worker.timer.seconds.clear()
    outcome = worker.analyse_file(path, mode, keep_field)
    return outcome, dict(worker.timer.seconds)


def _started() -> tuple[str | None, dict[str, str] | None]:
    return _WORKER_ERROR, None if _WORKER is None else dict(_WORKER.sha256)


def _start_forkserver_deaf_to_ctrl_c() -> None:
    """Start multiprocessing's forkserver (if not yet running) with SIGINT ignored, which it and the workers it forks
    inherit: a Ctrl-C at the terminal reaches the whole process group, and only the main process should act on it
    (it stops the workers). Otherwise one pressed while the server imports, or a worker boots, prints their
    tracebacks over the user's terminal."""
    from multiprocessing import forkserver

    if threading.current_thread() is not threading.main_thread():  # only the main thread may touch signal handlers
        forkserver.ensure_running()
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        forkserver.ensure_running()
    finally:
        signal.signal(signal.SIGINT, previous)


class WorkerStartError(RuntimeError):
    """The worker processes could not start (models unloadable there); the message is for the user."""


class ProcessPool:
    """``workers`` processes analysing whole files in order (see the module docstring).

    ``factory(weights_dir, sha256, options)`` builds each process's :class:`FileWorker` (default: the field analyser).
    ``on_stage(stage, seconds)`` receives each worker's stage seconds (for the benchmark's breakdown).
    ``failed(path, reason)`` builds the outcome of a file whose worker died twice or raised unexpectedly.
    """

    def __init__(self, weights_dir: Path, sha256: dict[str, str] | None, options: Options, workers: int,
                 failed: Callable[[Path, str], FileOutcome] | None = None, on_stage: Callable[[str, float], None] | None = None,
                 factory: WorkerFactory | None = None) -> None:
        self.workers = max(1, int(workers))
        self.weights_dir, self.options, self.sha256 = Path(weights_dir).resolve(), options, sha256
        self.factory = factory or default_factory()
        self._initargs = (self.factory, str(weights_dir), None if sha256 is None else dict(sha256), options, os.getpid())
        self._failed = failed or (lambda path, reason: None)
        self._on_stage = on_stage
        self._starting: list[Future] = []
        self._queue = _Ordered(LOOKAHEAD_PER_WORKER * self.workers)
        self._tries: dict[Hashable, int] = {}
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._ready = False  # every worker has reported its models (start())
        self._launcher: threading.Thread | None = None  # launch()'s thread, creating the workers
        self._launch_error: BaseException | None = None

    @staticmethod
    def _context() -> Any:
        ctx = mp.get_context(start_method())
        if ctx.get_start_method() == "forkserver":
            ctx.set_forkserver_preload(PRELOAD)
            _start_forkserver_deaf_to_ctrl_c()
        return ctx

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            self._executor = ProcessPoolExecutor(max_workers=self.workers, mp_context=self._context(),
                                                 initializer=_init_worker, initargs=self._initargs)
        return self._executor

    def launch(self) -> None:
        """Start the workers loading their models, without waiting for them.

        The forkserver starts here, unless :func:`start_forkserver` started it already, and imports the pipeline in
        the background (~0.6 s); creating a worker waits for those imports, so the workers are created in a thread:
        this process imports and loads its own models meanwhile (measured: ``prestart`` held the main process
        0.54-0.61 s before)."""
        if self._starting or self._launcher is not None:
            return
        self._context()  # quick; and signal dispositions can only be set from the main thread
        self._launcher = threading.Thread(target=self._launch_now, name="allmil-worker-launch", daemon=True)
        self._launcher.start()

    def _launch_now(self) -> None:
        try:
            pool = self._pool()
            self._starting = [pool.submit(_started) for _ in range(self.workers)]
        except Exception as exc:  # noqa: BLE001 - reported by start() as a start failure (exit 3)
            self._launch_error = exc

    def _launched(self) -> None:
        """Wait for :meth:`launch`'s thread, when another thread needs the pool."""
        launcher = self._launcher
        if launcher is not None and launcher is not threading.current_thread():
            launcher.join()

    def adopt(self, sha256: dict[str, str], failed: Callable[[Path, str], FileOutcome],
              on_stage: Callable[[str, float], None] | None) -> None:
        """Take over a pool launched before the run's models were loaded (:func:`prestart`)."""
        self.sha256, self._failed, self._on_stage = dict(sha256), failed, on_stage

    def start(self) -> None:
        """Wait until every worker has loaded its models (the run's, by sha256); :class:`WorkerStartError` if not."""
        self.launch()
        self._launched()
        if self._launch_error is not None:
            self.close()
            raise WorkerStartError(f"the worker processes could not start ({self._launch_error}); rerun with --workers 1.")
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
        self._queue.refill(self._submit)

    def _submit(self, key: Hashable) -> Future:
        self._launched()
        try:
            return self._pool().submit(_work, *key)
        except BrokenProcessPool as exc:  # found broken on submit: handled like a broken future, when fetched
            fut: Future = Future()
            fut.set_exception(exc)
            return fut

    def scheduled(self, path: Path, mode: str, keep_field: bool) -> bool:
        key = (path, mode, keep_field)
        return self._queue.is_upcoming(key) or self._queue.is_pending(key)

    def fetch(self, path: Path, mode: str, keep_field: bool) -> FileOutcome | None:
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
        self._launched()
        with self._lock:
            self._terminate()


# ---- workers started early ---------------------------------------------------------------------
_PRESTARTED: list[ProcessPool] = []


def _settings(options: Options) -> Options:
    from dataclasses import replace

    return replace(options, workers=1, decode_workers=1)


def start_forkserver() -> None:
    """Start the forkserver, which the worker processes are forked from, and its imports (~0.6 s) now, before this
    process's own imports; :class:`ProcessPool` then finds it ready. Nothing to do where the start method is spawn."""
    ProcessPool._context()


def prestart(weights_dir: Path, options: Options, workers: int, factory: WorkerFactory | None = None) -> None:
    """Launch ``workers`` worker processes now, so their start (imports, model load) overlaps the main process's
    own; the run's next pool with the same weights, options, workers and factory takes them over
    (:func:`take_prestarted`). Unclaimed ones are stopped at exit."""
    if workers <= 1 or _PRESTARTED:
        return
    pool = ProcessPool(weights_dir, None, options, workers, factory=factory)
    pool.launch()
    _PRESTARTED.append(pool)
    import atexit

    atexit.register(pool.close)


def take_prestarted(weights_dir: Path, options: Options, workers: int, factory: WorkerFactory | None = None) -> ProcessPool | None:
    """The pool :func:`prestart` launched, if it fits this run (else it is stopped)."""
    if not _PRESTARTED:
        return None
    pool = _PRESTARTED.pop()
    fits = (pool.workers, pool.weights_dir, _settings(pool.options)) == (workers, Path(weights_dir).resolve(), _settings(options))
    if fits and pool.factory is (factory or default_factory()):
        return pool
    pool.close()
    return None
