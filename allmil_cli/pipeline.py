"""The diagnose pipeline: images -> cells -> embeddings -> patient call, one patient at a time.

Patients are streamed: a patient's crops and features are dropped once its result is built, so
memory stays flat however many patients a run holds. Each field is decoded once; the networks run
once per field (detector) and in batches (embedder, aggregator).

How the work is scheduled (look-ahead threads, worker processes with ``Options.workers`` > 1, the GPU front
end) lives in :mod:`allmil_cli.execution`, the base class of :class:`Pipeline`; every path gives the same results.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from allmil_cli.aggregate import Aggregator
from allmil_cli.crops import crop_cells
from allmil_cli.decision import RuleParams, decide
from allmil_cli.detect import cell_box, detect_cells
from allmil_cli.embed import Embedder
from allmil_cli.execution import Execution
from allmil_cli.images import MAX_PIXELS, Field, Patient, keep_freed_buffers
from allmil_cli.labels import read_points
from allmil_cli.models import Models
from allmil_cli.qc import describe, patient_qc
from allmil_cli.parallel import LOOKAHEAD_PER_WORKER, FieldOutcome, FileOutcome, StageTimer, ThreadLookahead
from allmil_cli.workers import ProcessPool
from allmil_cli.resample import Shrinker
from allmil_cli.scale import FieldStats, measure_field

REMOVE_CHOICES = ("none", "blasts", "normals")
#: Adequacy rule: a patient with fewer cells than this cannot be called normal (``Options.min_cells_normal``).
#: The smallest cells-per-patient count whose held-out (protocol 2) accuracy reaches 95 % in the ablation of
#: docs/classifier_results.md: 1 cell 78.2 %, 2 cells 89.8 %, 4 cells 97.0 %, 8 cells 97.8 %.
MIN_CELLS_NORMAL = 4
#: What a worker does with a file: ``analyse`` (up to the embeddings), ``crops`` (up to the stain-mapped crops;
#: the embedder runs in the main process, e.g. on a GPU), ``detect`` / ``detect+crops`` (``allmil detect``).
MODES = ("analyse", "crops", "detect", "detect+crops")
__all__ = ["LOOKAHEAD_PER_WORKER", "MODES", "Options", "Cell", "ImageResult", "PatientResult", "Evidence", "FieldOutcome",
           "FileOutcome", "StageTimer", "Pipeline"]


@dataclass
class Options:
    """User-tunable settings of a run (CLI flags map one to one)."""

    cell_size: float | None = None  # red-cell diameter in px; None = estimate per field
    detect_threshold: float | None = None  # None = the detector's own
    threshold: float | None = None  # p_all threshold for --labels metrics of p_all; None = the aggregator's own
    rule: RuleParams | None = None  # the patient rule's parameters; None = the aggregator's own (or a site profile's)
    min_cells: int = 1  # fewer cells => "insufficient"
    min_cells_normal: int = MIN_CELLS_NORMAL  # fewer cells and no ALL call => "insufficient"; 0 disables
    max_pixels: int = MAX_PIXELS
    # crops per embedder call; None: 1 on the CPU, 32 on a GPU. On the CPU one crop at a time is the fastest (6.6-6.9
    # vs 7.7-8.7 ms per crop at 32, one thread; a whole field 0.91-0.93x the time, bench/bench_ab.py): a big batch's
    # activations no longer fit the cache. The features are the same bytes whatever the batch (tested).
    batch_size: int | None = None
    seed: int = 0
    remove: str = "none"  # stress test: drop "blasts" or "normals" before the patient call
    truth_dir: Path | None = None  # stress test: .xyc blast centroids per image stem (else model scores)
    keep_features: bool = False  # keep per-cell features/crops-free arrays for `allmil embed`
    decode_workers: int = 1  # threads decoding upcoming files (more pays off when the networks run on a GPU)
    workers: int = 1  # worker processes analysing files (1: this process, with decode look-ahead threads)
    # detector and embedder: "fp32", or their "int8" copies (models.INT8_FILES). A Pipeline sets it to what its
    # models are, so worker processes load the same and reports say which ran.
    precision: str = "fp32"


@dataclass
class Cell:
    """A detected white cell. Coordinates are in the pixels of the (EXIF-rotated) field."""

    image: str
    x: float
    y: float
    box: tuple[float, float, float, float]
    det_score: float
    blast_score: float = float("nan")
    removed: bool = False


@dataclass
class ImageResult:
    image: str
    status: str  # ok / failed
    reason: str = ""
    width: int = 0
    height: int = 0
    rbc_px: float = 0.0
    n_cells: int = 0
    stats: FieldStats | None = None  # ruler, anchor colours, sharpness (QC evidence)


@dataclass
class PatientResult:
    patient: str
    status: str  # ok / failed / insufficient
    call: str  # ALL / review / normal (allmil_cli.decision); "review" too when no call is possible
    p_all: float
    n_images: int
    n_cells: int
    n_blast_like: int
    blast_fraction: float
    reason: str = ""
    # blast-like percentage of the counted cells and its 95 % Wilson interval (percent; nan without cells)
    blast_pct: float = float("nan")
    blast_pct_lo: float = float("nan")
    blast_pct_hi: float = float("nan")
    rule: dict = field(default_factory=dict)  # the patient rule's numbers for this patient (decision.Decision.evidence)
    images: list[ImageResult] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    features: np.ndarray | None = None  # (n_cells, 256) when Options.keep_features
    cell_threshold: float | None = None  # blast score at or above which a cell counts as blast-like
    skipped: list[dict[str, str]] = field(default_factory=list)  # files not analysed: {"file", "reason"}
    qc: list[str] = field(default_factory=list)  # quality flags (allmil_cli.qc); empty when clean
    qc_details: dict = field(default_factory=dict)  # the numbers behind each flag

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass
class Evidence:
    """What the networks saw of one patient, before the call: reusable across stress conditions."""

    images: list[ImageResult] = field(default_factory=list)
    cells: list[Cell] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)
    truth_flags: list[np.ndarray] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Pipeline(Execution):
    """Holds the models of one run; call :meth:`diagnose_patient` per patient."""

    def __init__(self, models: Models, options: Options | None = None, timer: StageTimer | None = None,
                 on_field: Callable[[Patient, Field, list[Cell], float], None] | None = None) -> None:
        keep_freed_buffers()  # a process that decodes fields: each one's memory serves the next
        self.models = models
        #: Called with each analysed field while it is still decoded (patient, field, its cells, red-cell px):
        #: the review page and --crops-dir take their thumbnails here, so no image is decoded twice.
        self.on_field = on_field
        self.options = options or Options()
        precision = getattr(models, "precision", "fp32")
        if self.options.precision != precision:
            self.options = replace(self.options, precision=precision)
        self.timer = timer or StageTimer()
        self.embedder = Embedder(models.embedder)
        self.aggregator = Aggregator(models.aggregator, self.embedder.blank_features())
        self.threshold = self.options.threshold if self.options.threshold is not None else self.aggregator.threshold
        #: The patient rule (allmil_cli.decision): a site profile's or the options', else the model's own.
        self.rule: RuleParams = self.options.rule or self.aggregator.rule
        self.cell_threshold = self.aggregator.cell_threshold
        self._ahead = ThreadLookahead(self._read, self.options.decode_workers)
        self._pool: ProcessPool | None = None
        #: Embed in this process, batched across fields, when the embedder runs on a GPU; else where the crops are cut.
        self.embed_here = models.provider != "CPUExecutionProvider"
        self.batch_size = int(self.options.batch_size or (32 if self.embed_here else 1))
        self._gpu: Any = None  # allmil_cli.gpu.GpuFront: nvJPEG decode and crops on the GPU
        if models.provider == "CUDAExecutionProvider" and getattr(models, "gpu_decode", False):
            self.use_gpu("cuda")

    # -- one field -----------------------------------------------------------------------------
    def measure(self, rgb: np.ndarray, shrinker: Shrinker | None = None) -> FieldStats:
        """The field's ruler (red-cell diameter, ``Options.cell_size`` when given), anchor colours and sharpness
        (``shrinker``: the field's shared downscales, :meth:`allmil_cli.images.Field.shrinker`)."""
        t = time.perf_counter()
        stats = measure_field(rgb, float(self.options.cell_size) if self.options.cell_size else None, shrinker)
        self.timer.add("scale", t)
        return stats

    def locate_cells(self, fld: Field, stats: FieldStats | None = None) -> tuple[list[Cell], FieldStats]:
        """WBC detection on one decoded field (``stats``: its measure; taken when None)."""
        rgb = fld.rgb
        stats = self.measure(rgb, fld.shrinker()) if stats is None else stats
        rbc_px = stats.rbc_px
        t = time.perf_counter()
        dets = detect_cells(self.models.detector, rgb, rbc_px, self.options.detect_threshold, fld.shrinker())
        fld.release()
        self.timer.add("detect", t)
        cells = [
            Cell(image=fld.label, x=float(d.x), y=float(d.y), box=cell_box(rgb, d.x, d.y, rbc_px), det_score=float(d.score))
            for d in dets
        ]
        return cells, stats

    @staticmethod
    def _failed_image(label: str, reason: str) -> ImageResult:
        return ImageResult(image=label, status="failed", reason=reason)

    @staticmethod
    def _info(fld: Field, stats: FieldStats, n_cells: int) -> ImageResult:
        h, w = fld.rgb.shape[:2]
        return ImageResult(image=fld.label, status="ok", width=w, height=h, rbc_px=round(stats.rbc_px, 1), n_cells=n_cells,
                           stats=stats)

    def _crops(self, fld: Field, cells: list[Cell], stats: FieldStats) -> np.ndarray:
        """The cells' embedder crops, mapped to the reference stain when the embedder was trained that way."""
        crops = crop_cells(fld.rgb, np.asarray([(c.x, c.y) for c in cells], dtype=np.float64).reshape(-1, 2), stats.rbc_px)
        return self.embedder.normalise(crops, stats)

    def analyse_field(self, fld: Field, stats: FieldStats | None = None) -> tuple[ImageResult, list[Cell], np.ndarray, FieldStats]:
        """Detect, crop and embed the cells of one decoded field."""
        cells, stats = self.locate_cells(fld, stats)
        t = time.perf_counter()
        crops = self._crops(fld, cells, stats)
        t = self.timer.add("crop", t)
        feats = self.embedder.embed(crops, batch_size=self.batch_size)
        self.timer.add("embed", t)
        return self._info(fld, stats, len(cells)), cells, feats, stats

    # -- one patient -------------------------------------------------------------------------------
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
                    ev.truth_flags.append(self._truth_blast_flags(outcome.path, fo.cells, rbc_px))
        self._embed_pending(feats, todo)
        ev.features = [f for f in feats if f is not None]
        return ev

    def diagnose_patient(self, patient: Patient, remove: str | None = None) -> PatientResult:
        """The patient call; ``remove`` ("blasts"/"normals") overrides Options.remove."""
        return self.decide(patient, self.collect(patient), remove)

    def _truth_blast_flags(self, path: Path, cells: list[Cell], rbc_px: float) -> np.ndarray:
        truth = read_points(Path(self.options.truth_dir) / f"{path.stem}.xyc")
        flags = np.zeros(len(cells), dtype=bool)
        if len(truth) == 0 or not cells:
            return flags
        xy = np.asarray([(c.x, c.y) for c in cells])
        d = np.sqrt(((xy[:, None, :] - truth[None, :, :]) ** 2).sum(-1))
        return d.min(axis=1) <= 0.8 * rbc_px

    def decide(self, patient: Patient, ev: Evidence, remove: str | None = None) -> PatientResult:
        """Per-cell blast scores, optional removal (stress test), the patient call, and its quality flags.

        The call is :func:`allmil_cli.decision.decide` on the blast-like count. A patient with a QC flag
        (``allmil_cli.qc``) is never silently called ``normal``: the call becomes ``review`` with the flags in the reason. ``ALL`` calls stand (ruling in needs less evidence)."""
        result = self._call(patient, ev, remove)
        if result.status == "failed":
            return result
        fields = [(i.image, i.stats) for i in result.images if i.status == "ok" and i.stats is not None]
        qc = patient_qc(fields, result.n_cells, self.options.min_cells_normal, self.embedder.stain_reference)
        result.qc, result.qc_details = qc.flags, qc.details
        if result.call == "normal" and qc.flags:
            result.call = "review"
            result.reason = " ".join(x for x in (f"Would be called normal ({result.reason.rstrip('.')}), but {describe(qc)} "
                                                 "Review the fields before ruling out ALL.",) if x)
        return result

    def _call(self, patient: Patient, ev: Evidence, remove: str | None = None) -> PatientResult:
        """Per-cell blast scores, optional removal (stress test), and the patient call."""
        opts = self.options
        remove = opts.remove if remove is None else remove
        if remove not in REMOVE_CHOICES:
            raise ValueError(f"remove must be one of {REMOVE_CHOICES}, not {remove!r}")
        images, feats, truth_flags = ev.images, ev.features, ev.truth_flags
        notes = list(ev.notes)
        cells = [replace(c) for c in ev.cells]
        n_ok = sum(1 for i in images if i.status == "ok")
        skipped = list(getattr(patient, "skipped", []))
        base = dict(patient=patient.name, n_images=n_ok, images=images, notes=notes, cell_threshold=self.cell_threshold,
                    skipped=skipped)
        if not patient.images:
            extra = f" ({len(skipped)} file(s) skipped: see the JSON report)" if skipped else ""
            return PatientResult(status="insufficient", call="review", p_all=float("nan"), n_cells=0,
                                 n_blast_like=0, blast_fraction=float("nan"),
                                 reason=f"no images in {patient.folder}{extra}; add JPEG/PNG/TIFF fields of this patient.", **base)
        if n_ok == 0:
            first = next((i.reason for i in images if i.reason), "no usable image")
            return PatientResult(status="failed", call="review", p_all=float("nan"), n_cells=0,
                                 n_blast_like=0, blast_fraction=float("nan"),
                                 reason=f"none of {len(images)} image(s) could be read; first problem: {first}", **base)
        X = np.concatenate(feats, axis=0)  # n_ok > 0, so at least one field's (possibly empty) features
        t = time.perf_counter()
        scores = self.aggregator.cell_scores(X)
        for c, s in zip(cells, scores):
            c.blast_score = float(s)
        keep = np.ones(len(cells), dtype=bool)
        if remove != "none" and len(cells):
            is_blast = np.concatenate(truth_flags) if opts.truth_dir is not None else scores >= self.cell_threshold
            keep = ~is_blast if remove == "blasts" else is_blast
            for c, k in zip(cells, keep):
                c.removed = not bool(k)
        kept = X[keep]
        n_blast = int((scores[keep] >= self.cell_threshold).sum())
        n_cells = int(keep.sum())
        failed = [i for i in images if i.status != "ok"]
        partial = f"{len(failed)} of {len(images)} image(s) unusable (see the JSON report)." if failed else ""
        if partial:
            notes.append(f"{patient.name}: {partial}")
        if n_cells < opts.min_cells:
            self.timer.add("aggregate", t)
            why = (f"{n_cells} white cell(s) found in {n_ok} usable image(s), fewer than --min-cells {opts.min_cells}; "
                   "add fields, or check the magnification (--cell-size).")
            return PatientResult(status="insufficient", call="review", p_all=float("nan"), n_cells=n_cells,
                                 n_blast_like=n_blast, blast_fraction=float("nan"),
                                 reason=" ".join(x for x in (why, partial) if x), cells=cells,
                                 features=X if opts.keep_features else None, **base)
        p = float(self.aggregator.patient_probability(kept, seed=opts.seed))
        self.timer.add("aggregate", t)
        d = decide(n_blast, n_cells, self.rule)
        counts = dict(n_cells=n_cells, n_blast_like=n_blast, blast_fraction=n_blast / n_cells, blast_pct=d.blast_pct,
                      blast_pct_lo=d.blast_pct_lo, blast_pct_hi=d.blast_pct_hi, rule=d.evidence(self.rule), cells=cells,
                      features=X if opts.keep_features else None, **base)
        if d.call != "ALL" and n_cells < opts.min_cells_normal:  # adequacy: ruling out needs enough cells
            why = (f"only {n_cells} white cell(s), {n_blast} blast-like, in {n_ok} usable image(s): too few to rule out ALL "
                   f"(--min-cells-normal {opts.min_cells_normal}; model p_all {p:.4f}). Add fields of this patient.")
            return PatientResult(status="insufficient", call="review", p_all=float("nan"),
                                 reason=" ".join(x for x in (why, partial) if x), **counts)
        return PatientResult(status="ok", call=d.call, p_all=p, reason=" ".join(x for x in (d.reason + ".", partial) if x),
                             **counts)

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
