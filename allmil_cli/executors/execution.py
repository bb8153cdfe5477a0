"""Where a run's files are analysed: the executors, and the one that picks among them.

Every executor runs the per-file function of :class:`allmil_cli.stages.analysis.FieldAnalyser` and hands back a
:class:`~allmil_cli.types.results.FileOutcome` per file, in the order asked for:

- :class:`InProcess` (``Options.workers`` 1): this process, files decoded and measured ahead in threads
  (``--decode-workers``, :class:`allmil_cli.executors.parallel.ThreadLookahead`);
- :class:`allmil_cli.executors.workers.ProcessPool` (``Options.workers`` > 1): worker processes, each with its own analyser
  (:func:`allmil_cli.stages.analysis.open_analyser`), so the results are the serial path's, bit for bit;
- :class:`allmil_cli.executors.gpu.GpuFront` (networks on CUDA and torch sees the GPU): nvJPEG decode and crops on the GPU;
  files it does not take run in this process.

:class:`FileExecutor` picks one per file. It knows nothing of patients or calls: it is handed paths and a mode
(:data:`allmil_cli.types.results.MODES`). When the embedder runs here (a GPU), files come back as crops and
:meth:`FileExecutor.embed` embeds them, batched across fields.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from allmil_cli.stages.analysis import FieldAnalyser, Reader, open_analyser
from allmil_cli.executors.parallel import ThreadLookahead
from allmil_cli.types.results import FileOutcome
from allmil_cli.executors.workers import ProcessPool, WorkerFactory, take_prestarted

if TYPE_CHECKING:
    from allmil_cli.executors.gpu import GpuFront

#: The per-file function an executor runs: (path, mode, keep the decoded field, where the decoded file comes from).
AnalyseFile = Callable[[Path, str, bool, Reader], FileOutcome]


class InProcess:
    """Files analysed in this process, each decoded and measured a few files ahead in threads."""

    def __init__(self, analyse_file: AnalyseFile, read: Reader, decode_workers: int = 1) -> None:
        self.analyse_file = analyse_file
        self._ahead = ThreadLookahead(read, decode_workers)

    def schedule(self, paths: list[Path]) -> None:
        self._ahead.schedule(paths)

    def fetch(self, path: Path, mode: str, keep_field: bool) -> FileOutcome:
        return self.analyse_file(path, mode, keep_field, self._ahead.fetch)

    def close(self) -> None:
        self._ahead.close()


class FileExecutor:
    """Runs ``analyser``'s per-file work where it goes fastest: the GPU front end, worker processes, or this process.

    ``factory``: what each worker process runs (:data:`allmil_cli.executors.workers.WorkerFactory`); it must build the same
    analyser as ``analyser`` for the results to be the same.
    """

    def __init__(self, analyser: FieldAnalyser, factory: WorkerFactory = open_analyser) -> None:
        self.analyser = analyser
        self.factory = factory
        self.timer = analyser.timer
        self.local = InProcess(analyser.analyse_file, analyser.read, analyser.options.decode_workers)
        self.pool: ProcessPool | None = None  # started on first use, when Options.workers > 1
        self.gpu: GpuFront | None = None  # use_gpu

    def use_gpu(self, device: str = "cuda") -> None:
        """Decode JPEGs, resize and crop with torch on ``device`` (:mod:`allmil_cli.executors.gpu`; "cpu": the same code on CPU
        tensors, for tests). The caller then embeds the crops with :meth:`embed`."""
        from allmil_cli.executors.gpu import GpuFront

        a = self.analyser
        self.gpu = GpuFront(a.models, a.options, a.embedder, a.timer, device=device)

    def prefetch(self, paths: list[Path], mode: str, keep_fields: bool) -> None:
        """Announce the files that will be asked for, in order, so they are read (or analysed) ahead."""
        if self.gpu is not None:
            self.gpu.schedule(paths)
            return
        pool = self._pool_for(paths)
        if pool is not None:
            # Every file goes to the workers, the first one too: this process only collects. Analysing the first
            # file here while the workers start put a third process on the cores and held the workers' next files
            # back until it was done (24 fields: 0.95x, 0.97x and 0.99x the time without it in three interleaved series
            # of 8 runs, 16 of 24 faster).
            pool.schedule(paths, mode, keep_fields)
        else:
            self.local.schedule(paths)

    def outcomes(self, paths: list[Path], mode: str, keep_fields: bool) -> Iterator[FileOutcome]:
        """The files analysed, in order (``keep_fields``: each outcome keeps its decoded fields)."""
        pool = self._pool_for(paths)
        if pool is not None and paths and not pool.scheduled(paths[0], mode, keep_fields):
            pool.schedule(list(paths), mode, keep_fields)  # not announced by prefetch: its fields still run in parallel
        for path in paths:
            outcome = self.gpu.analyse_file(path, mode, keep_fields) if self.gpu is not None else None
            if outcome is None and pool is not None:
                t = time.perf_counter()
                outcome = pool.fetch(path, mode, keep_fields)
                self.timer.add("wait", t)
            yield outcome if outcome is not None else self.local.fetch(path, mode, keep_fields)

    def embed(self, crops: list[np.ndarray]) -> np.ndarray:
        """The crops of several fields embedded in one batch run: on the GPU front end's device, else here."""
        if self.gpu is not None:
            return self.gpu.embed(crops)
        return self.analyser.embed(np.concatenate(crops))

    def _pool_for(self, paths: list[Path]) -> ProcessPool | None:
        """The worker pool (started on first use) when ``Options.workers`` > 1 and there is more than one file."""
        opts = self.analyser.options
        if self.pool is None and self.gpu is None and int(opts.workers) > 1 and len(paths) > 1:
            m, n = self.analyser.models, int(opts.workers)
            pool = (take_prestarted(m.weights_dir, opts, n, self.factory)
                    or ProcessPool(m.weights_dir, m.sha256, opts, n, factory=self.factory))
            pool.adopt(m.sha256, _failed_file, on_stage=self.timer.add_seconds)
            self.pool = pool
            pool.launch()  # not waited for: the first fetch checks that every worker loaded the run's models
        return self.pool

    def close(self) -> None:
        """Stop the look-ahead threads and the worker processes (pending work is dropped)."""
        self.local.close()
        if self.gpu is not None:
            self.gpu.close()
        if self.pool is not None:
            self.pool.close()
            self.pool = None


def _failed_file(path: Path, reason: str) -> FileOutcome:
    return FileOutcome(path=path, error=f"{path}: {reason}")
