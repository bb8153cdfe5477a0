"""Per-cell outputs: the detections CSV and crop PNGs of ``allmil detect``, the cells NPZ of ``allmil embed``.

Files are written atomically (see :func:`allmil_cli.io.report.atomic_write`).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from allmil_cli.types.results import Cell, PatientResult
from allmil_cli.io.report import atomic_write

#: ``same_as``: the row (0-based, among the same image's rows) of a stronger detection closer than a white cell, perhaps
#: the same cell (``diagnose`` counts the two once when neither is blast-like: ``allmil_cli.stages.count``); -1: none
DETECTION_COLUMNS = ["patient", "image", "x0", "y0", "x1", "y1", "cx", "cy", "score", "same_as"]


class DetectionsCsv:
    """The detections CSV, built patient by patient: one row per detected white cell (box, centre, score)."""

    def __init__(self) -> None:
        self._buf = io.StringIO()
        self._writer = csv.writer(self._buf, lineterminator="\n")
        self._writer.writerow(DETECTION_COLUMNS)

    def add(self, patient: str, cells: Sequence[Cell]) -> None:
        for c in cells:
            self._writer.writerow([patient, c.image, *(f"{v:.1f}" for v in c.box), f"{c.x:.1f}", f"{c.y:.1f}", f"{c.det_score:.4f}",
                                   c.same_as])

    def text(self) -> str:
        return self._buf.getvalue()


def save_crops(root: Path, patient: str, cells: Sequence[Cell], crop_arrays: Sequence[np.ndarray]) -> None:
    """One PNG per cell crop under ``root/patient/``, named by image, cell index and centre."""
    folder = root / patient
    folder.mkdir(parents=True, exist_ok=True)
    all_crops = np.concatenate(crop_arrays, axis=0)
    for i, (cell, crop) in enumerate(zip(cells, all_crops)):
        stem = Path(cell.image.replace("#", "_p")).stem
        b = io.BytesIO()
        Image.fromarray(crop).save(b, format="PNG")
        atomic_write(folder / f"{stem}_cell{i:03d}_x{int(cell.x)}_y{int(cell.y)}.png", b.getvalue())


def cells_npz(results: Sequence[PatientResult]) -> tuple[bytes, int]:
    """The cells of every patient run with ``keep_features`` as compressed NPZ bytes, and how many cells it holds.

    Arrays: features (N,256) float32, boxes (N,4), centres (N,2), det_score (N), blast_score (N), patient (N) str,
    image (N) str.
    """
    feats, boxes, centres, det, blast, pat, img = [], [], [], [], [], [], []
    for r in results:
        if r.features is not None and len(r.cells):
            feats.append(r.features)
            for c in r.cells:
                boxes.append(c.box)
                centres.append((c.x, c.y))
                det.append(c.det_score)
                blast.append(c.blast_score)
                pat.append(r.patient)
                img.append(c.image)
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        features=np.concatenate(feats).astype(np.float32) if feats else np.zeros((0, 256), np.float32),
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        centres=np.asarray(centres, np.float32).reshape(-1, 2),
        det_score=np.asarray(det, np.float32),
        blast_score=np.asarray(blast, np.float32),
        patient=np.asarray(pat, dtype=str),
        image=np.asarray(img, dtype=str),
    )
    return buf.getvalue(), sum(len(f) for f in feats)
