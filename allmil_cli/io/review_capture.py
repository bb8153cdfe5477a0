"""What a reviewer sees of each patient, captured while its fields are decoded (no image is read twice).

:class:`ReviewCollector` plugs into the pipeline: ``Pipeline(on_field=collector.on_field)`` hands it each
analysed field while the field is still in memory, and ``pipeline.run(on_done=collector.finish)`` hands
it the patient's result. On a field it keeps a small JPEG of the field and a small crop of every cell
(cell scores are not known yet); on ``finish`` it keeps only the most and least blast-like cells and
the most telling fields, writes the ``--crops-dir`` PNGs, and drops the rest, so memory stays flat
over a long run (about 40 kB per cell of the patient in progress, 190 kB with ``--crops-dir``).

A result whose fields were analysed elsewhere (a Ray actor, a worker process, a journal read back by
``--resume``) has no captured fields: for it, and only when it is known through ``patients``, ``finish``
reads the patient's images once more and cuts the thumbnails at the cells the result reports.
"""

from __future__ import annotations

import csv
import io
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from allmil_cli.stages.count import twin_positions
from allmil_cli.stages.crops import CROP_SIZE, crop_cells
from allmil_cli.types.field import Field
from allmil_cli.stages.images import ImageError, load_fields
from allmil_cli.types.field import Patient
from allmil_cli.types.results import Cell, PatientResult
from allmil_cli.io.report import atomic_write

TOP_CELLS = 12  # most blast-like cells shown (and saved with --crops-dir) per patient
LOW_CELLS = 4  # least blast-like cells shown for contrast
MAX_FIELDS = 4  # field thumbnails shown per patient (those holding the most blast-like cells first)
CELL_PX = 96  # cell thumbnail side on the page
REVIEW_ZOOM = 0.7  # cell thumbnails span 0.7 x the model's crop window (2.1 red-cell diameters): the cell fills it
FIELD_PX = 320  # long side of a field thumbnail
JPEG_QUALITY = 72


@dataclass
class CellThumb:
    index: int  # position in PatientResult.cells
    image: str
    x: float
    y: float
    score: float
    blast_like: bool
    jpeg: bytes
    merged: tuple[float, ...] = ()  # detector scores of the weaker heatmap peaks counted as this same cell
    twins: tuple[float, ...] = ()  # blast scores of the twin detections counted with this cell (stages.count)


@dataclass
class FieldThumb:
    image: str
    width: int  # the field's own pixels (cell boxes are in these)
    height: int
    jpeg: bytes
    #: the counted cells: box, blast score, blast-like, the detector scores of the weaker peaks merged into the cell
    #: (Cell.merged_scores), and the blast scores of its twins counted with it (Cell.merged)
    cells: list[tuple[tuple[float, float, float, float], float, bool, tuple[float, ...], tuple[float, ...]]] = field(default_factory=list)


@dataclass
class Gallery:
    """The cells and fields the review page shows for one patient."""

    patient: str
    top: list[CellThumb] = field(default_factory=list)
    low: list[CellThumb] = field(default_factory=list)
    fields: list[FieldThumb] = field(default_factory=list)
    n_fields: int = 0
    crops_folder: Path | None = None
    crops_saved: int = 0
    note: str = ""


@dataclass
class _Pending:
    fields: list[FieldThumb] = field(default_factory=list)
    starts: list[int] = field(default_factory=list)  # index in PatientResult.cells of each field's first cell
    counts: list[int] = field(default_factory=list)  # cells per field
    thumbs: list[np.ndarray] = field(default_factory=list)
    archive: list[np.ndarray] = field(default_factory=list)
    next_start: int = 0


def jpeg_bytes(rgb: np.ndarray, quality: int = JPEG_QUALITY) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def png_bytes(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def safe_name(name: str) -> str:
    """A single, harmless folder or file name for user text (patient names may hold '/', '..', controls)."""
    s = re.sub(r"[\x00-\x1f/\\:*?\"<>|]+", "_", name).strip().lstrip(".")
    return s[:120] or "_"


def _place(parts: list[np.ndarray], starts: list[int], n: int, size: int) -> np.ndarray:
    """Per-field crop arrays put at their cells' positions in the patient's cell list."""
    out = np.zeros((n, size, size, 3), np.uint8)
    for arr, s in zip(parts, starts):
        out[s : s + len(arr)] = arr
    return out


class ReviewCollector:
    """Collects thumbnails for the review page (``review``) and/or top cell crops (``crops_dir``)."""

    def __init__(self, review: bool = True, crops_dir: Path | None = None, top: int = TOP_CELLS, low: int = LOW_CELLS,
                 patients: list[Patient] | None = None) -> None:
        self.review = review
        self.crops_dir = Path(crops_dir) if crops_dir is not None else None
        self.top, self.low = top, low
        self.galleries: dict[str, Gallery] = {}
        self.n_reread = 0  # patients whose images were read again (their fields were analysed elsewhere)
        self._pending: dict[str, _Pending] = {}
        self._patients = {p.name: p for p in patients or []}

    def expect(self, patients: list[Patient]) -> None:
        """Make ``patients`` known, so results analysed elsewhere can be captured by reading them again."""
        self._patients.update({p.name: p for p in patients})

    # -- pipeline hooks ---------------------------------------------------------------------------
    def on_field(self, patient: Patient, fld: Field, cells: list[Cell], rbc_px: float, start: int | None = None) -> None:
        """``Pipeline.on_field``: keep a field thumbnail and a small crop of each cell."""
        pend = self._pending.setdefault(patient.name, _Pending())
        pend.starts.append(pend.next_start if start is None else start)
        pend.next_start = pend.starts[-1] + len(cells)
        h, w = fld.rgb.shape[:2]
        centres = np.asarray([(c.x, c.y) for c in cells], dtype=np.float64).reshape(-1, 2)
        if self.review:
            im = Image.fromarray(fld.rgb)
            im.thumbnail((FIELD_PX, FIELD_PX), Image.BILINEAR, reducing_gap=2.0)
            pend.fields.append(FieldThumb(image=fld.label, width=w, height=h, jpeg=jpeg_bytes(np.asarray(im))))
            pend.thumbs.append(crop_cells(fld.rgb, centres, rbc_px * REVIEW_ZOOM, size=CELL_PX))
        if self.crops_dir is not None:
            pend.archive.append(crop_cells(fld.rgb, centres, rbc_px, size=CROP_SIZE))  # the window the model saw
        pend.counts.append(len(cells))

    def _reread(self, patient: Patient, result: PatientResult) -> _Pending:
        """Capture a result analysed elsewhere: decode its images again, cut at the cells it reports."""
        self.n_reread += 1
        slots: dict[str, list[tuple[int, int, float]]] = {}
        start = 0
        for im in result.images:
            if im.status == "ok":
                slots.setdefault(im.image, []).append((start, im.n_cells, im.rbc_px))
                start += im.n_cells
        if start != len(result.cells):
            return _Pending()
        for path in patient.images:
            try:
                fields, _ = load_fields(path)
            except ImageError:
                continue
            for fld in fields:
                if slots.get(fld.label):
                    s, n, rbc_px = slots[fld.label].pop(0)
                    self.on_field(patient, fld, result.cells[s : s + n], rbc_px, start=s)
        return self._pending.pop(patient.name, _Pending())

    def finish(self, result: PatientResult) -> Gallery:
        """``Pipeline.run(on_done=...)``: choose what to keep of this patient, save its crops, drop the rest."""
        if result.patient in self.galleries:  # stress test: one result per condition, same cells and scores
            return self.galleries[result.patient]
        pend = self._pending.pop(result.patient, None)
        if pend is None and result.patient in self._patients and result.n_images:
            pend = self._reread(self._patients[result.patient], result)
        pend = pend or _Pending()
        gallery = Gallery(patient=result.patient, n_fields=len(pend.counts))
        self.galleries[result.patient] = gallery
        cells = result.cells
        captured = np.zeros(len(cells), dtype=bool)
        for s, n in zip(pend.starts, pend.counts):
            if s + n > len(cells):
                gallery.note = "cell thumbnails unavailable: the captured fields do not match the result's cells."
                return gallery
            captured[s : s + n] = True
        if len(cells) and not captured.all():
            gallery.note = f"{int((~captured).sum())} of {len(cells)} cell(s) could not be shown (their image could not be read again)."
        scores = np.asarray([c.blast_score for c in cells], dtype=np.float64)
        order = [int(i) for i in np.argsort(-np.nan_to_num(scores, nan=-1.0), kind="stable") if captured[i] and not cells[i].merged]
        twins = twins_of(cells)
        top = order[: self.top]
        low = [i for i in order[::-1] if i not in top][: self.low]
        thr = result.cell_threshold

        def blast_like(i: int) -> bool:
            return thr is not None and not math.isnan(scores[i]) and scores[i] >= thr

        if self.review:
            thumbs = _place(pend.thumbs, pend.starts, len(cells), CELL_PX)

            def thumb(i: int) -> CellThumb:
                c = cells[i]
                return CellThumb(index=i, image=c.image, x=c.x, y=c.y, score=float(scores[i]), blast_like=blast_like(i),
                                 jpeg=jpeg_bytes(thumbs[i], quality=80), merged=tuple(c.merged_scores),
                                 twins=tuple(float(scores[j]) for j in twins.get(i, ())))

            gallery.top = [thumb(i) for i in top]
            gallery.low = [thumb(i) for i in low]
            best: list[tuple[float, int]] = []
            for k, (ft, start, n) in enumerate(zip(pend.fields, pend.starts, pend.counts)):
                ft.cells = [(cells[i].box, float(scores[i]), blast_like(i), tuple(cells[i].merged_scores),
                             tuple(float(scores[j]) for j in twins.get(i, ()))) for i in range(start, start + n) if not cells[i].merged]
                best.append((max((c[1] for c in ft.cells if not math.isnan(c[1])), default=-1.0), k))
            keep = sorted(k for _, k in sorted(best, key=lambda t: (-t[0], t[1]))[:MAX_FIELDS])
            gallery.fields = [pend.fields[k] for k in keep]
        if self.crops_dir is not None and top:
            self._save_crops(gallery, result, _place(pend.archive, pend.starts, len(cells), CROP_SIZE), top, scores, blast_like)
        return gallery

    # -- --crops-dir ------------------------------------------------------------------------------
    def _save_crops(self, gallery: Gallery, result: PatientResult, crops: np.ndarray, top: list[int], scores: np.ndarray,
                    blast_like) -> None:
        folder = self.crops_dir / safe_name(result.patient)
        folder.mkdir(parents=True, exist_ok=True)
        index = io.StringIO()
        w = csv.writer(index, lineterminator="\n")
        w.writerow(["rank", "file", "image", "x", "y", "blast_score", "blast_like"])
        for rank, i in enumerate(top, 1):
            c = result.cells[i]
            name = f"{rank:02d}_score{scores[i]:.3f}_{safe_name(Path(c.image.replace('#', '_p')).stem)}_x{int(c.x)}_y{int(c.y)}.png"
            atomic_write(folder / name, png_bytes(crops[i]))
            w.writerow([rank, name, c.image, f"{c.x:.1f}", f"{c.y:.1f}", f"{scores[i]:.4f}", int(blast_like(i))])
        atomic_write(folder / "cells.csv", index.getvalue())
        gallery.crops_folder, gallery.crops_saved = folder, len(top)


def twins_of(cells: Sequence[Cell]) -> dict[int, list[int]]:
    """Each counted cell's twins counted with it (Cell.merged), followed down a chain of merged twins: positions in
    ``cells``."""
    pos = twin_positions([c.image for c in cells], [c.same_as for c in cells])
    out: dict[int, list[int]] = {}
    for g, c in enumerate(cells):
        j = pos[g]
        if not c.merged or j < 0:
            continue
        while cells[j].merged and pos[j] >= 0:
            j = pos[j]
        out.setdefault(j, []).append(g)
    return out
