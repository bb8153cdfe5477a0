"""How the pipeline's work is executed: where each file is analysed, and what runs ahead.

:class:`Execution` is the part of :class:`allmil_cli.pipeline.Pipeline` that schedules work (the pipeline
itself says *what* is computed per field and per patient). Each file becomes a :class:`FileOutcome`, from one of:

- this process (``Options.workers`` 1), with files decoded and measured ahead in threads (``--decode-workers``);
- worker processes (``Options.workers`` > 1, :class:`allmil_cli.workers.ProcessPool`), which run
  :meth:`Execution.analyse_file` on their own Pipeline, so the results are the serial path's, bit for bit;
- the GPU front end (:mod:`allmil_cli.gpu`: nvJPEG decode, crops on the GPU) when the networks run on CUDA and
  torch sees the GPU; files it does not take run here on the CPU.

When the embedder runs on a GPU (``embed_here``), files come back as crops and are embedded here, batched
across fields (``_embed_pending``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from allmil_cli.crops import crop_cells
from allmil_cli.images import Field, ImageError, Patient, load_fields
from allmil_cli.parallel import FieldOutcome, FileOutcome
from allmil_cli.workers import ProcessPool, take_prestarted
from allmil_cli.scale import FieldStats


class Execution:
    """Scheduling half of :class:`allmil_cli.pipeline.Pipeline` (a mixin: it uses the pipeline's models, options,
    timer, embedder, ``on_field`` and per-field methods)."""

    models: Any
    options: Any
    timer: Any
    embedder: Any
    on_field: Any
    embed_here: bool
    batch_size: int
    _ahead: Any
    _pool: ProcessPool | None
    _gpu: Any

    def use_gpu(self, device: str = "cuda") -> None:
        """Decode JPEGs, resize and crop with torch on ``device`` (:mod:`allmil_cli.gpu`; "cpu": the same code on CPU
        tensors, for tests). The embedder then runs here, batched across fields."""
        from allmil_cli.gpu import GpuFront

        self._gpu = GpuFront(self.models, self.options, self.embedder, self.timer, device=device)
        self.embed_here = True

    def _read(self, path: Path) -> tuple[list[tuple[Field, FieldStats]], list[str]]:
        """Decode one file and measure each field (ruler, colours; runs in the look-ahead thread)."""
        try:
            fields, notes = load_fields(path, max_pixels=self.options.max_pixels)
        except ImageError:
            raise
        except Exception as exc:  # noqa: BLE001 - an unexpected decoder failure is this file's problem only
            raise ImageError(f"{path}: unexpected error while reading ({exc}); re-export the image.") from exc
        return [(f, self.measure(f.rgb, f.shrinker())) for f in fields], notes

    def _fetch(self, path: Path) -> tuple[list[tuple[Field, FieldStats]], list[str]]:
        return self._ahead.fetch(path)

    def analyse_file(self, path: Path, mode: str = "analyse", keep_field: bool = False) -> FileOutcome:
        """Decode one file and analyse each of its fields (``mode``: see ``MODES``); what a worker process runs.

        Files are decoded once, a few files ahead in background threads (``Options.decode_workers``); the
        time spent waiting for a file is counted as ``decode``. A bad file or field is an outcome, never an error.
        """
        t = time.perf_counter()
        try:
            fields, notes = self._fetch(path)
        except ImageError as exc:
            self.timer.add("decode", t)
            return FileOutcome(path=path, error=str(exc))
        self.timer.add("decode", t)
        return FileOutcome(path=path, fields=[self._field_outcome(f, s, mode, keep_field) for f, s in fields], notes=notes)

    def _field_outcome(self, fld: Field, stats: FieldStats, mode: str, keep_field: bool) -> FieldOutcome:
        crops = feats = None
        try:
            if mode == "analyse":
                info, cells, feats, stats = self.analyse_field(fld, stats)
            else:
                cells, stats = self.locate_cells(fld, stats)
                t = time.perf_counter()
                if mode == "crops":
                    crops = self._crops(fld, cells, stats)
                elif mode == "detect+crops":
                    crops = crop_cells(fld.rgb, np.asarray([(c.x, c.y) for c in cells]).reshape(-1, 2), stats.rbc_px)
                self.timer.add("crop", t)
                info = self._info(fld, stats, len(cells))
        except Exception as exc:  # noqa: BLE001 - one field's failure is reported, not fatal
            what = "detection" if mode.startswith("detect") else "analysis"
            return FieldOutcome(self._failed_image(fld.label, f"{fld.path}: {what} failed ({exc})."))
        return FieldOutcome(info, cells, feats, crops, fld if keep_field else None)

    def _failed_file(self, path: Path, reason: str) -> FileOutcome:
        return FileOutcome(path=path, error=f"{path}: {reason}")

    def outcomes(self, patient: Patient, mode: str = "analyse") -> Iterator[FileOutcome]:
        """The patient's files analysed in order: by the worker processes when ``Options.workers`` > 1."""
        keep = self.on_field is not None
        pool = self._workers_for(patient.images)
        if pool is not None and patient.images and not pool.scheduled(patient.images[0], mode, keep):
            pool.schedule(list(patient.images), mode, keep)  # not announced by prefetch: its fields still run in parallel
        for path in patient.images:
            outcome = self._gpu.analyse_file(path, mode, keep) if self._gpu is not None else None
            if outcome is None and pool is not None:
                t = time.perf_counter()
                outcome = pool.fetch(path, mode, keep)
                self.timer.add("wait", t)
            yield outcome if outcome is not None else self.analyse_file(path, mode, keep)

    def _workers_for(self, paths: list[Path]) -> ProcessPool | None:
        """The worker pool (started on first use) when ``Options.workers`` > 1 and there is more than one file."""
        if self._pool is None and self._gpu is None and int(self.options.workers) > 1 and len(paths) > 1:
            m, n = self.models, int(self.options.workers)
            pool = take_prestarted(m.weights_dir, self.options, n) or ProcessPool(m.weights_dir, m.sha256, self.options, n)
            pool.adopt(m.sha256, self._failed_file, on_stage=self.timer.add_seconds)
            self._pool = pool
            pool.launch()  # not waited for: the first fetch checks that every worker loaded the run's models
        return self._pool

    def _embed_pending(self, feats: list[np.ndarray | None], todo: list[tuple[int, np.ndarray]]) -> None:
        """Embed the crops of several fields in one batch run (this process; a GPU when ``embed_here``)."""
        if not todo:
            return
        t = time.perf_counter()
        batch = [c for _, c in todo]
        out = (self._gpu.embed(batch) if self._gpu is not None
               else self.embedder.embed(np.concatenate(batch), batch_size=self.batch_size))
        start = 0
        for i, crops in todo:
            feats[i] = out[start : start + len(crops)]
            start += len(crops)
        todo.clear()
        self.timer.add("embed", t)

    def prefetch(self, patients: Iterable[Patient], mode: str = "analyse") -> None:
        """Announce the order in which patients will be processed, so their files are read (or analysed) ahead.

        ``mode``: what will be asked of them (``detect_patient`` asks "detect" / "detect+crops").
        """
        paths = [path for p in patients for path in p.images]
        if self._gpu is not None:
            self._gpu.schedule(paths)
            return
        pool = self._workers_for(paths)
        if pool is not None:
            if mode == "analyse" and self.embed_here:
                mode = "crops"
            # Every file goes to the workers, the first one too: this process only collects. Analysing the first
            # file here while the workers start put a third process on the cores and held the workers' next files
            # back until it was done (24 fields: 0.95x, 0.97x and 0.99x the time without it in three interleaved series
            # of 8 runs, 16 of 24 faster).
            pool.schedule(paths, mode, self.on_field is not None)
        else:
            self._ahead.schedule(paths)

    def close(self) -> None:
        """Stop the look-ahead threads and the worker processes (pending work is dropped)."""
        self._ahead.close()
        if self._gpu is not None:
            self._gpu.close()
        if self._pool is not None:
            self._pool.close()
            self._pool = None
