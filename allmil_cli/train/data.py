"""Readers for the training data sets: ALL-IDB1 fields, ALL-IDB2 crops, BCCD (VOC), labelled crop folders.

Only plain Python + numpy + Pillow: these readers are also used by evaluation code and tests.
Nothing here copies or caches images; callers load pixels with :func:`load_rgb` when they need them.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from allmil_cli.stages.labels import read_points

DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data"

_IDB_NAME = re.compile(r"^(Im\d{3})_([01])$")


@dataclass(frozen=True)
class FieldRecord:
    """One ALL-IDB1 field. ``blasts``/``others`` are (x, y) centroids in full-resolution pixels."""

    name: str  # e.g. "Im001_1"
    path: Path
    label: int  # 1: from an ALL patient (at least one blast), 0: healthy donor
    blasts: np.ndarray  # (N, 2) float32
    others: np.ndarray  # (M, 2) float32: normal WBCs AND platelets (see DATA.md), unfiltered


@dataclass(frozen=True)
class CropRecord:
    """One single-cell crop (ALL-IDB2 or a lab's own folder). label 1 = blast, 0 = not a blast."""

    name: str
    path: Path
    label: int
    source: str = ""  # field the crop was cut from, when known (ALL-IDB2 names do NOT say: see idb2_map)


@dataclass(frozen=True)
class BoxRecord:
    """One BCCD field with its VOC boxes (x0, y0, x1, y1) per class."""

    name: str
    path: Path
    split: str  # train / val / test (published split)
    boxes: dict[str, np.ndarray] = field(default_factory=dict)


def load_rgb(path: Path) -> np.ndarray:
    """Decode an image file to RGB uint8 (H, W, 3)."""
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def read_all_idb1(root: Path = DEFAULT_DATA_ROOT / "ALL-IDB1") -> list[FieldRecord]:
    """All ALL-IDB1 fields, sorted by name, with blast (``xyc/``) and non-blast (``other/``) centroids."""
    records = []
    for path in sorted((root / "im").glob("*.jpg")):
        m = _IDB_NAME.match(path.stem)
        if not m:
            continue
        records.append(
            FieldRecord(
                name=path.stem,
                path=path,
                label=int(m.group(2)),
                blasts=read_points(root / "xyc" / f"{path.stem}.xyc").astype(np.float32),
                others=read_points(root / "other" / f"{path.stem}.xyc").astype(np.float32),
            )
        )
    return records


def read_all_idb2(root: Path = DEFAULT_DATA_ROOT / "ALL-IDB2") -> list[CropRecord]:
    """ALL-IDB2 single-cell crops (their names do not match ALL-IDB1 fields)."""
    out = []
    for path in sorted((root / "img").glob("*.tif")):
        m = _IDB_NAME.match(path.stem)
        if m:
            out.append(CropRecord(name=path.stem, path=path, label=int(m.group(2))))
    return out


def read_bccd(root: Path = DEFAULT_DATA_ROOT / "BCCD") -> list[BoxRecord]:
    """BCCD fields with WBC/RBC/Platelets boxes and the published split (val counts as train)."""
    split_of: dict[str, str] = {}
    for split in ("train", "val", "test"):
        f = root / "ImageSets" / "Main" / f"{split}.txt"
        if f.exists():
            for stem in f.read_text().split():
                split_of[stem] = split
    out = []
    for xml in sorted((root / "Annotations").glob("*.xml")):
        img = root / "JPEGImages" / f"{xml.stem}.jpg"
        if not img.exists():
            continue
        boxes: dict[str, list[list[float]]] = {}
        for obj in ET.parse(xml).getroot().iter("object"):
            name = (obj.findtext("name") or "").strip()
            bb = obj.find("bndbox")
            if bb is None:
                continue
            box = [float(bb.findtext(k) or 0) for k in ("xmin", "ymin", "xmax", "ymax")]
            if box[2] > box[0] and box[3] > box[1]:
                boxes.setdefault(name, []).append(box)
        out.append(
            BoxRecord(
                name=xml.stem,
                path=img,
                split=split_of.get(xml.stem, "train"),
                boxes={k: np.asarray(v, dtype=np.float32).reshape(-1, 4) for k, v in boxes.items()},
            )
        )
    return out


def read_crop_folder(root: Path) -> list[CropRecord]:
    """A lab's own labelled crops: ``root/blast/*.png`` (label 1) and ``root/normal/*.png`` (label 0).

    Folder names accepted for blasts: blast, blasts, ALL, 1; for non-blasts: normal, normals, other, 0.
    """
    names = {"blast": 1, "blasts": 1, "all": 1, "1": 1, "normal": 0, "normals": 0, "other": 0, "0": 0}
    out = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        label = names.get(sub.name.lower())
        if label is None:
            continue
        for path in sorted(sub.rglob("*")):
            if path.suffix.lower() in {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}:
                out.append(CropRecord(name=path.stem, path=path, label=label, source=""))
    return out


def image_folds(names: list[str], labels: list[int], k: int = 5, seed: int = 0) -> list[int]:
    """Stratified fold index (0..k-1) for each image; deterministic for a given seed."""
    rng = np.random.default_rng(seed)
    fold = [0] * len(names)
    for cls in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == cls]
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            fold[i] = j % k
    return fold
