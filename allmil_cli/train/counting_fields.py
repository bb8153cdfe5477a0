"""The fields of :mod:`allmil_cli.train.counting`: which fields, their known red-cell sizes and ground truth, how they are
resized to a known red-cell size, and the ruler before and after the low-end change (for comparison)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from allmil_cli.stages.detect import Decoding
from allmil_cli.stages.scale import measure_field
from allmil_cli.train.data import load_rgb, read_bccd
from allmil_cli.train.detector_labels import CACHE_DIR as LABELS_DIR
from allmil_cli.train.detector_labels import REPO
from allmil_cli.train.pbc_split import camera_rbc, pbc_camera_rbc, pbc_paths
from allmil_cli.train.shifts import jpeg, rescale

FOLD_DIR = REPO / ".cache" / "folds"
WEIGHTS = REPO / "weights" / "detector.onnx"
SIZES = (12.0, 14.0, 20.0, 30.0, 50.0, 85.0)
QUALITIES = (None, 70)
DUP_RBC = 0.7  #: half a white cell (1.3-1.5 red cells across): extra detections this close to a cell are duplicates
MATCH_RBC = 0.8  #: a ground-truth cell is found by a detection this close (docs/detector_results.md, protocol 3)
#: The decoding shipped before this change (and still): one greedy suppression radius of 0.6 red-cell diameter.
RADIUS_ONLY = Decoding(min_dist_rbc=0.6, merge_dist_rbc=0.0, valley=1.0)
#: The valley rule picked on the design fields (``counting design``), measured on the held-out sets and not shipped
#: (it merged touching blasts; docs/detector_results.md, section 5).
VALLEY_RULE = Decoding(min_dist_rbc=0.6, merge_dist_rbc=1.0, valley=0.5, valley_far=1.0)
#: Largest field side the ruler test makes: an enlarged field is cut to its centre first (a camera at a higher
#: magnification sees a smaller part of the smear), so no field grows beyond a 2592 x 1944 sensor.
MAX_SIDE = 2592


@dataclass
class Case:
    """One field to resize: where it is, its known red-cell size (px at full resolution), its ground truth."""

    name: str
    path: Path
    rbc: float
    cells: np.ndarray  # (N, 2) every ground-truth white cell (full-resolution px)
    blasts: np.ndarray  # (M, 2) the blasts among them
    detector: Path
    source: str


def _session(path: Path):
    from allmil_cli.train.detector_model import _session as open_session

    return open_session(path)


# ------------------------------------------------------------------------------------------- field sets
def idb1_cases(which: str = "heldout") -> list[Case]:
    """ALL-IDB1 fields with their fold detector: ``heldout`` (the fold that never saw the field) or ``train`` (the
    next fold's detector, which trained on it: design data)."""
    from allmil_cli.train.protocol2 import K, fields

    index = json.loads((LABELS_DIR / "index.json").read_text())["idb1"]
    recs, folds = fields()
    out = []
    for rec, k in zip(recs, folds):
        info = index[rec.name]
        normals = np.asarray(info["normals"], np.float64).reshape(-1, 2)
        blasts = rec.blasts.astype(np.float64).reshape(-1, 2)
        kk = k if which == "heldout" else (k + 1) % K
        out.append(Case(rec.name, rec.path, float(info["rbc_px"]), np.concatenate([blasts, normals]), blasts,
                        FOLD_DIR / f"detector_fold{kk}.onnx", "ALL-IDB1"))
    return out


def bccd_camera_rbc() -> float:
    """The known red-cell size of every BCCD field (one camera): the median ruler reading over train+val."""
    return camera_rbc("bccd", (r.path for r in read_bccd() if r.split != "test"), "BCCD train+val")


def bccd_cases(split: str = "test") -> list[Case]:
    """BCCD fields of ``split`` (``test``, or ``trainval``: design data) with the shipped detector."""
    rbc = bccd_camera_rbc()
    out = []
    for r in read_bccd():
        if (r.split == "test") != (split == "test"):
            continue
        b = r.boxes.get("WBC", np.zeros((0, 4), np.float32)).astype(np.float64)
        c = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], 1).reshape(-1, 2)
        out.append(Case(r.name, r.path, rbc, c, np.zeros((0, 2)), WEIGHTS, "BCCD"))
    return out


def pbc_cases(half: str = "report") -> list[Case]:
    rbc = pbc_camera_rbc()
    out = []
    for p in pbc_paths(half):
        h, w = load_rgb(p).shape[:2]  # one centred white cell per image
        out.append(Case(p.stem, p, rbc, np.array([[w / 2.0, h / 2.0]]), np.zeros((0, 2)), WEIGHTS, "PBC"))
    return out


FULL = 0.0  #: "size" of the field as it is (full resolution, no resizing)


def resize_to(rgb: np.ndarray, known_rbc: float, size: float, quality: int | None) -> tuple[np.ndarray, float]:
    """The field resized so its red cells are ``size`` px (``known_rbc`` at full resolution; ``FULL``: as it is), then
    JPEG at ``quality`` (None: none). Returns the image and the factor."""
    f = 1.0 if size == FULL else size / known_rbc
    img = rgb if abs(f - 1.0) < 1e-6 else rescale(rgb, f)
    return (jpeg(img, quality) if quality else img), f


def redness_reading(rgb: np.ndarray) -> tuple[float, bool]:
    """The ruler before this change (and still the reading of every full-resolution field): the redness mask of the
    512 px thumbnail only."""
    from allmil_cli.stages.scale import (
        DEFAULT_RBC_PX,
        _otsu,
        _ruler,
        fill_holes,
        open_cross,
        thumbnail,
    )

    a, factor = thumbnail(rgb)
    redness = np.clip((a[..., 0] - a[..., 1]) * 2.0 + 128.0, 0.0, 255.0)
    v = None if float(redness.max() - redness.min()) < 8.0 else _ruler(fill_holes(open_cross(redness > _otsu(redness))), factor)
    return (DEFAULT_RBC_PX, False) if v is None else (v, True)


def current_reading(rgb: np.ndarray) -> tuple[float, bool]:
    s = measure_field(rgb)
    return s.rbc_px, s.measured


def ruler_field(rgb: np.ndarray, known: float, size: float, quality: int | None) -> np.ndarray:
    """The field resized so its red cells are ``size`` px (``known`` at full resolution), an enlarged one cut to its
    centre first (``MAX_SIDE``), then JPEG at ``quality``."""
    f = size / known
    h, w = rgb.shape[:2]
    if f > 1.0:
        cw, ch = min(w, int(MAX_SIDE / f)), min(h, int(MAX_SIDE * 0.75 / f))
        x0, y0 = (w - cw) // 2, (h - ch) // 2
        rgb = rgb[y0 : y0 + ch, x0 : x0 + cw]
    img = rgb if abs(f - 1.0) < 1e-6 else rescale(rgb, f)
    return jpeg(img, quality) if quality else img
