"""The diagnose pipeline: images -> cells -> embeddings -> patient call, one patient at a time.

Patients are streamed: a patient's crops and features are dropped once its result is built, so
memory stays flat however many patients a run holds. Each field is decoded once; the networks run
once per field (detector) and in batches (embedder, aggregator).

:class:`Pipeline` composes three parts (docs/architecture.md): the per-field stages
(:class:`allmil_cli.stages.analysis.FieldAnalyser`), an executor that runs them file by file (look-ahead threads, worker
processes with ``Options.workers`` > 1, the GPU front end: :class:`allmil_cli.executors.execution.FileExecutor`; every path gives
the same results), and the patient call (:class:`allmil_cli.stages.patient.PatientCaller`). The data types live in
:mod:`allmil_cli.types.results`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from allmil_cli.stages.aggregate import Aggregator
from allmil_cli.stages.analysis import FieldAnalyser
from allmil_cli.types.rule import RuleParams
from allmil_cli.executors.execution import FileExecutor
from allmil_cli.types.field import Field
from allmil_cli.types.field import Patient
from allmil_cli.stages.models import Models, load_models
from allmil_cli.stages.patient import PatientCaller, truth_blast_flags
from allmil_cli.types.resample import Shrinker
from allmil_cli.types.results import (Cell, Evidence, FileOutcome,
                                ImageResult, Options, PatientResult, StageTimer)
from allmil_cli.types.field import FieldStats

__all__ = ["OnField", "Pipeline"]

#: Called with each analysed field while it is still decoded: (patient, field, its cells, red-cell px).
OnField = Callable[[Patient, Field, list[Cell], float], None]


class Pipeline:
    """Holds the models of one run; call :meth:`diagnose_patient` per patient, or :meth:`run` over them all."""

    def __init__(self, models: Models, options: Options | None = None, timer: StageTimer | None = None,
                 on_field: OnField | None = None) -> None:
        self.models = models
        #: The review page and --crops-dir take their thumbnails here, so no image is decoded twice.
        self.on_field = on_field
        self.options = options or Options()
        precision = getattr(models, "precision", "fp32")
        if self.options.precision != precision:
            self.options = replace(self.options, precision=precision)
        self.timer = timer or StageTimer()
        #: decode -> measure -> detect -> crop -> embed, one field at a time
        self.analyser = FieldAnalyser(models, self.options, self.timer)
        self.embedder = self.analyser.embedder
        self.aggregator = Aggregator(models.aggregator, self.embedder.blank_features())
        self.threshold = self.options.threshold if self.options.threshold is not None else self.aggregator.threshold
        #: The patient rule (allmil_cli.stages.decision): a site profile's or the options', else the model's own.
        self.rule: RuleParams = self.options.rule or self.aggregator.rule
        self.cell_threshold = (self.options.cell_threshold if self.options.cell_threshold is not None
                               else self.aggregator.cell_threshold)
        #: evidence -> the patient's call and quality flags
        self.caller = PatientCaller(self.aggregator, self.options, self.rule, self.cell_threshold,
                                    self.embedder.stain_reference, self.timer)
        #: where each file is analysed: this process, worker processes, or the GPU front end
        self.executor = FileExecutor(self.analyser)
        #: Embed in this process, batched across fields, when the embedder runs on a GPU; else where the crops are cut.
        self.embed_here = models.provider != "CPUExecutionProvider"
        if models.provider == "CUDAExecutionProvider" and getattr(models, "gpu_decode", False):
            self.use_gpu("cuda")

    @classmethod
    def from_weights(cls, weights_dir: Path, device: str, threads: int | None, options: Options) -> Pipeline:
        """A pipeline with its own models (``options.precision``'s), e.g. in a Ray actor (:mod:`allmil_cli.executors.engine_ray`)."""
        return cls(load_models(Path(weights_dir), device=device, threads=threads, precision=options.precision), options)

    @property
    def batch_size(self) -> int:
        """Crops per embedder call (``Options.batch_size``; 1 on the CPU, 32 on a GPU)."""
        return self.analyser.batch_size

    def use_gpu(self, device: str = "cuda") -> None:
        """Decode JPEGs, resize and crop with torch on ``device`` (:mod:`allmil_cli.executors.gpu`; "cpu": the same code on CPU
        tensors, for tests). The embedder then runs here, batched across fields."""
        self.executor.use_gpu(device)
        self.embed_here = True

    # -- one field (the stages: allmil_cli.stages.analysis) -----------------------------------------------
    def measure(self, rgb: np.ndarray, shrinker: Shrinker | None = None) -> FieldStats:
        """The field's ruler, anchor colours and sharpness (:meth:`FieldAnalyser.measure`)."""
        return self.analyser.measure(rgb, shrinker)

    def locate_cells(self, fld: Field, stats: FieldStats | None = None) -> tuple[list[Cell], FieldStats]:
        """WBC detection on one decoded field (:meth:`FieldAnalyser.locate_cells`)."""
        return self.analyser.locate_cells(fld, stats)

    def _crops(self, fld: Field, cells: list[Cell], stats: FieldStats) -> np.ndarray:
        """The cells' embedder crops (:meth:`FieldAnalyser.crops`; ``allmil_cli.train.quantize`` calibrates on them)."""
        return self.analyser.crops(fld, cells, stats)

    def analyse_field(self, fld: Field, stats: FieldStats | None = None) -> tuple[ImageResult, list[Cell], np.ndarray, FieldStats]:
        """Detect, crop and embed the cells of one decoded field (:meth:`FieldAnalyser.analyse_field`)."""
        return self.analyser.analyse_field(fld, stats)

    # -- one patient -------------------------------------------------------------------------------
    def outcomes(self, patient: Patient, mode: str = "analyse") -> Iterator[FileOutcome]:
        """The patient's files analysed in order (``mode``: :data:`MODES`), wherever the executor runs them."""
        return self.executor.outcomes(list(patient.images), mode, self.on_field is not None)

    def detect_patient(self, patient: Patient, with_crops: bool = False) -> tuple[list[ImageResult], list[Cell], list[np.ndarray]]:
        """Detection only (``allmil detect``): cells per field, and their crops when asked."""
        images: list[ImageResult] = []
        cells: list[Cell] = []
        crops: list[np.ndarray] = []
        for outcome in self.outcomes(patient, "detect+crops" if with_crops else "detect"):
            if outcome.error is not None:
                images.append(ImageResult(image=outcome.path.name, status="failed", reason=outcome.error))
                continue
            for fo in outcome.fields:
                images.append(fo.info)
                if fo.info.status == "ok":
                    cells.extend(fo.cells)
                    if with_crops:
                        crops.append(fo.crops)
        return images, cells, crops

    def collect(self, patient: Patient) -> Evidence:
        """Decode, detect, crop and embed all of a patient's fields (the expensive part)."""
        ev = Evidence()
        feats: list[np.ndarray | None] = []
        todo: list[tuple[int, np.ndarray]] = []  # (index in feats, crops) awaiting the embedder here
        for outcome in self.outcomes(patient, "crops" if self.embed_here else "analyse"):
            if outcome.error is not None:
                ev.images.append(ImageResult(image=outcome.path.name, status="failed", reason=outcome.error))
                continue
            ev.notes.extend(outcome.notes)
            for fo in outcome.fields:
                ev.images.append(fo.info)
                if fo.info.status != "ok":
                    continue
                rbc_px = fo.info.stats.rbc_px
                ev.cells.extend(fo.cells)
                feats.append(fo.features)
                if fo.features is None:
                    todo.append((len(feats) - 1, fo.crops))
                    if sum(len(c) for _, c in todo) >= 4 * self.batch_size:
                        self._embed_pending(feats, todo)
                if self.on_field is not None and fo.decoded is not None:
                    self.on_field(patient, fo.decoded, fo.cells, rbc_px)
                if self.options.truth_dir is not None:
                    ev.truth_flags.append(truth_blast_flags(self.options.truth_dir, outcome.path, fo.cells, rbc_px))
        self._embed_pending(feats, todo)
        ev.features = [f for f in feats if f is not None]
        return ev

    def _embed_pending(self, feats: list[np.ndarray | None], todo: list[tuple[int, np.ndarray]]) -> None:
        """Embed the crops of several fields in one batch run (this process; a GPU when ``embed_here``)."""
        if not todo:
            return
        t = time.perf_counter()
        out = self.executor.embed([c for _, c in todo])
        start = 0
        for i, crops in todo:
            feats[i] = out[start : start + len(crops)]
            start += len(crops)
        todo.clear()
        self.timer.add("embed", t)

    def decide(self, patient: Patient, ev: Evidence, remove: str | None = None) -> PatientResult:
        """The patient call from its evidence (:meth:`allmil_cli.stages.patient.PatientCaller.decide`); ``remove``
        ("blasts"/"normals") overrides Options.remove."""
        return self.caller.decide(patient, ev, remove)

    def diagnose_patient(self, patient: Patient, remove: str | None = None) -> PatientResult:
        """The patient call; ``remove`` ("blasts"/"normals") overrides Options.remove."""
        return self.decide(patient, self.collect(patient), remove)

    # -- a run -------------------------------------------------------------------------------------
    def prefetch(self, patients: Iterable[Patient], mode: str = "analyse") -> None:
        """Announce the order in which patients will be processed, so their files are read (or analysed) ahead.

        ``mode``: what will be asked of them (``detect_patient`` asks "detect" / "detect+crops").
        """
        if mode == "analyse" and self.embed_here:
            mode = "crops"
        paths = [path for p in patients for path in p.images]
        self.executor.prefetch(paths, mode, self.on_field is not None)

    def run(self, patients: Iterable[Patient], on_done: Callable[[PatientResult], None] | None = None) -> Iterator[PatientResult]:
        """Diagnose patients one by one (streamed); their files are read (or, with worker processes, analysed) ahead."""
        patients = list(patients)
        try:
            self.prefetch(patients)
            for patient in patients:
                result = self.diagnose_patient(patient)
                if on_done:
                    on_done(result)
                yield result
        finally:
            self.close()

    def close(self) -> None:
        """Stop the look-ahead threads and the worker processes (pending work is dropped)."""
        self.executor.close()
