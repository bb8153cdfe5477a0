"""The per-field stages, one file at a time: decode -> measure -> detect -> crop -> embed.

:class:`FieldAnalyser` holds what these stages need (the detector and embedder sessions, the options, a stage timer)
and nothing about scheduling: the executors (:mod:`allmil_cli.executors.execution`, :mod:`allmil_cli.executors.workers`) call
:meth:`FieldAnalyser.analyse_file` wherever they run it, in this process or in a worker process
(:func:`open_analyser` builds one there), so every path computes the same bytes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from allmil_cli.stages.crops import crop_cells
from allmil_cli.stages.detect import cell_box, detect_cells
from allmil_cli.stages.embed import Embedder
from allmil_cli.types.field import Field
from allmil_cli.stages.images import ImageError, keep_freed_buffers, load_fields
from allmil_cli.stages.models import Models, load_models
from allmil_cli.types.resample import Shrinker
from allmil_cli.types.results import Cell, FieldOutcome, FileOutcome, ImageResult, Options, StageTimer
from allmil_cli.types.field import FieldStats
from allmil_cli.stages.scale import measure_field

#: A decoded file: each field with its measure (ruler, colours), and notes on pages left out.
Decoded = tuple[list[tuple[Field, FieldStats]], list[str]]
#: Reads one file (:meth:`FieldAnalyser.read`, or an executor's look-ahead serving its result).
Reader = Callable[[Path], Decoded]


class FieldAnalyser:
    """The per-field stages with the models they run (``options``: cell size, detector threshold, pixel limit, batch)."""

    def __init__(self, models: Models, options: Options, timer: StageTimer | None = None) -> None:
        keep_freed_buffers()  # a process that decodes fields: each one's memory serves the next
        self.models = models
        self.options = options
        self.timer = timer or StageTimer()
        self.embedder = Embedder(models.embedder)
        #: crops per embedder call: one on the CPU (the fastest there), 32 when the embedder runs on a GPU
        self.batch_size = int(options.batch_size or (32 if models.provider != "CPUExecutionProvider" else 1))

    @property
    def sha256(self) -> dict[str, str]:
        """The sha256 of the model files this analyser runs (a worker process reports them to the main process)."""
        return dict(self.models.sha256)

    # -- the stages of one field ---------------------------------------------------------------------
    def read(self, path: Path) -> Decoded:
        """Decode one file and measure each field (ruler, colours); runs in a look-ahead thread."""
        try:
            fields, notes = load_fields(path, max_pixels=self.options.max_pixels)
        except ImageError:
            raise
        except Exception as exc:  # noqa: BLE001 - an unexpected decoder failure is this file's problem only
            raise ImageError(f"{path}: unexpected error while reading ({exc}); re-export the image.") from exc
        return [(f, self.measure(f.rgb, f.shrinker(), f.jpeg_quality)) for f in fields], notes

    def measure(self, rgb: np.ndarray, shrinker: Shrinker | None = None, jpeg_quality: int | None = None) -> FieldStats:
        """The field's ruler (red-cell diameter, ``Options.cell_size`` when given), anchor colours and sharpness
        (``shrinker``: the field's shared downscales, :meth:`allmil_cli.types.field.Field.shrinker`), carrying the
        file's ``jpeg_quality`` (:attr:`allmil_cli.types.field.Field.jpeg_quality`) for the QC flags."""
        t = time.perf_counter()
        stats = measure_field(rgb, float(self.options.cell_size) if self.options.cell_size else None, shrinker)
        self.timer.add("scale", t)
        return stats if jpeg_quality is None else replace(stats, jpeg_quality=jpeg_quality)

    def locate_cells(self, fld: Field, stats: FieldStats | None = None) -> tuple[list[Cell], FieldStats]:
        """WBC detection on one decoded field (``stats``: its measure; taken when None)."""
        rgb = fld.rgb
        stats = self.measure(rgb, fld.shrinker(), fld.jpeg_quality) if stats is None else stats
        rbc_px = stats.rbc_px
        t = time.perf_counter()
        dets = detect_cells(self.models.detector, rgb, rbc_px, self.options.detect_threshold, fld.shrinker())
        fld.release()
        self.timer.add("detect", t)
        cells = [
            Cell(image=fld.label, x=float(d.x), y=float(d.y), box=cell_box(rgb, d.x, d.y, rbc_px), det_score=float(d.score),
                 merged_scores=tuple(float(m) for m in d.merged_scores), same_as=int(d.same_as))
            for d in dets
        ]
        return cells, stats

    def crops(self, fld: Field, cells: list[Cell], stats: FieldStats) -> np.ndarray:
        """The cells' embedder crops, mapped to the reference stain when the embedder was trained that way."""
        crops = crop_cells(fld.rgb, np.asarray([(c.x, c.y) for c in cells], dtype=np.float64).reshape(-1, 2), stats.rbc_px)
        return self.embedder.normalise(crops, stats)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """(n, 224, 224, 3) uint8 crops -> (n, 256) features, ``batch_size`` crops per call."""
        return self.embedder.embed(crops, batch_size=self.batch_size)

    def analyse_field(self, fld: Field, stats: FieldStats | None = None) -> tuple[ImageResult, list[Cell], np.ndarray, FieldStats]:
        """Detect, crop and embed the cells of one decoded field."""
        cells, stats = self.locate_cells(fld, stats)
        t = time.perf_counter()
        crops = self.crops(fld, cells, stats)
        t = self.timer.add("crop", t)
        feats = self.embed(crops)
        self.timer.add("embed", t)
        return field_info(fld, stats, len(cells)), cells, feats, stats

    # -- one file ------------------------------------------------------------------------------------
    def analyse_file(self, path: Path, mode: str = "analyse", keep_field: bool = False, read: Reader | None = None) -> FileOutcome:
        """Decode one file and analyse each of its fields (``mode``: see :data:`allmil_cli.types.results.MODES`).

        ``read``: where the decoded file comes from (an executor's look-ahead; :meth:`read` when None); the time
        spent waiting for it is counted as ``decode``. A bad file or field is an outcome, never an error.
        """
        t = time.perf_counter()
        try:
            fields, notes = (read or self.read)(path)
        except ImageError as exc:
            self.timer.add("decode", t)
            return FileOutcome(path=path, error=str(exc))
        self.timer.add("decode", t)
        return FileOutcome(path=path, fields=[self.field_outcome(f, s, mode, keep_field) for f, s in fields], notes=notes)

    def field_outcome(self, fld: Field, stats: FieldStats, mode: str, keep_field: bool) -> FieldOutcome:
        """One decoded field taken as far as ``mode`` asks: embeddings, crops, or cells only."""
        crops = feats = None
        try:
            if mode == "analyse":
                info, cells, feats, stats = self.analyse_field(fld, stats)
            else:
                cells, stats = self.locate_cells(fld, stats)
                t = time.perf_counter()
                if mode == "crops":
                    crops = self.crops(fld, cells, stats)
                elif mode == "detect+crops":
                    crops = crop_cells(fld.rgb, np.asarray([(c.x, c.y) for c in cells]).reshape(-1, 2), stats.rbc_px)
                self.timer.add("crop", t)
                info = field_info(fld, stats, len(cells))
        except Exception as exc:  # noqa: BLE001 - one field's failure is reported, not fatal
            what = "detection" if mode.startswith("detect") else "analysis"
            return FieldOutcome(failed_image(fld.label, f"{fld.path}: {what} failed ({exc})."))
        return FieldOutcome(info, cells, feats, crops, fld if keep_field else None)


def field_info(fld: Field, stats: FieldStats, n_cells: int) -> ImageResult:
    """The per-image entry of an analysed field."""
    h, w = fld.rgb.shape[:2]
    return ImageResult(image=fld.label, status="ok", width=w, height=h, rbc_px=round(stats.rbc_px, 1), n_cells=n_cells,
                       stats=stats)


def failed_image(label: str, reason: str) -> ImageResult:
    return ImageResult(image=label, status="failed", reason=reason)


def open_analyser(weights_dir: str, sha256: dict[str, str] | None, options: Options) -> FieldAnalyser:
    """A CPU analyser with one onnxruntime thread, for a worker process: the run's models (checked against ``sha256``,
    the main process's), its options (``options.precision`` picks the model files)."""
    models = load_models(Path(weights_dir), device="cpu", threads=1, precision=options.precision)
    if sha256 is not None and models.sha256 != sha256:
        raise RuntimeError(f"{weights_dir}: the model files changed since the run started; restart the run.")
    return FieldAnalyser(models, replace(options, workers=1, decode_workers=1))
