"""The data of a run: its options, what it finds per cell, field and patient, and what each stage hands the next.

Plain dataclasses, the bottom layer of allmil_cli (docs/architecture.md): every stage, executor and output imports
them from here, and this module imports only its neighbours in ``allmil_cli/types/`` (``field.Field``,
``field.FieldStats``, ``rule.RuleParams``).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from allmil_cli.types.rule import RuleParams
from allmil_cli.types.field import MAX_PIXELS, Field
from allmil_cli.types.field import FieldStats

REMOVE_CHOICES = ("none", "blasts", "normals")
#: Adequacy rule: a patient with fewer cells than this cannot be called normal (``Options.min_cells_normal``).
#: The smallest cells-per-patient count whose held-out (protocol 2) accuracy reaches 95 % in the ablation of
#: docs/classifier_results.md: 1 cell 78.2 %, 2 cells 89.8 %, 4 cells 97.0 %, 8 cells 97.8 %.
MIN_CELLS_NORMAL = 4
#: What a worker does with a file: ``analyse`` (up to the embeddings), ``crops`` (up to the stain-mapped crops;
#: the embedder runs in the main process, e.g. on a GPU), ``detect`` / ``detect+crops`` (``allmil detect``).
MODES = ("analyse", "crops", "detect", "detect+crops")


@dataclass
class Options:
    """User-tunable settings of a run (CLI flags map one to one)."""

    cell_size: float | None = None  # red-cell diameter in px; None = estimate per field
    detect_threshold: float | None = None  # None = the detector's own
    threshold: float | None = None  # p_all threshold for --labels metrics of p_all; None = the aggregator's own
    rule: RuleParams | None = None  # the patient rule's parameters; None = the aggregator's own (or a site profile's)
    cell_threshold: float | None = None  # blast score at or above which a cell is blast-like; None = the model's
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
    site: str | None = None  # sha256 of the site profile (allmil_cli.io.site) whose rule this run uses; None = the model's


@dataclass
class Cell:
    """A detected white cell. Coordinates are in the pixels of the (EXIF-rotated) field."""

    image: str
    x: float
    y: float
    box: tuple[float, float, float, float]
    det_score: float
    blast_score: float = float("nan")
    merged_scores: tuple[float, ...] = ()  # detector scores of weaker heatmap peaks taken as this same cell
    removed: bool = False
    #: index (among this field's cells) of a stronger detection closer than a white cell: perhaps the same cell
    #: (detect.Detection.same_as); -1: none
    same_as: int = -1
    #: counted once with that twin (neither is blast-like: allmil_cli.stages.count), so not counted on its own
    merged: bool = False


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
    call: str  # ALL / review / normal (allmil_cli.stages.decision); "review" too when no call is possible
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
    qc: list[str] = field(default_factory=list)  # quality flags (allmil_cli.stages.qc); empty when clean
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


@dataclass
class FieldOutcome:
    """One field as the per-field stage hands it back (picklable, for worker processes). ``info.status`` failed: the rest
    is empty."""

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
    """Wall-clock seconds spent per stage, summed over a run (for the benchmark).

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
