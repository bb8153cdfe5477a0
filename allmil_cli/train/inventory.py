"""Training cells: which white cells of ALL-IDB1, ALL-IDB2, BCCD and PBC the cell models learn from.

Cells (``inventory()``, cached at ``.cache/cells/inventory.json``):
* ALL-IDB1 blasts: every ``xyc/`` centroid (label 1).
* ALL-IDB1 normal white cells: the ``other/`` centroids whose stained blob (``B - G > 45`` at a scale of
  30 px per red cell, the detector's rule ``allmil_cli.train.detector.idb1_labels``) covers >= 0.30 of a
  red-cell disc: ~395 of 1430 kept; platelets (< 0.10) and ambiguous blobs (0.10..0.30) are dropped.
* ALL-IDB2 crops (130 blast, 130 normal): located in their ALL-IDB1 source field by ``idb2_map`` and
  re-cut from the field with ``crop_cells`` (exactly the inference crop; the ALL-IDB1 centroid of the
  same cell, if any within 0.5 red-cell diameter, is dropped as a duplicate; the ALL-IDB2 label wins).
* BCCD ``train``+``val`` WBC box centres (label 0: no blasts in BCCD; a different lab/stain/camera).
* "junk" (label 0): every 3rd ALL-IDB1 ``other/`` centroid classified as a platelet (blob < 0.10 red-cell
  area) and every ambiguous one (0.10..0.30): the kind of object a detector's false positives are, so the
  aggregator learns that a platelet or clump in a bag is not evidence of ALL. Not used as test cells.
* PBC (``pbc_cells()``, recipes that use it): normal white cells of another hospital (CellaVision, MGG
  stain), one centred cell per image, label 0.
Each cell knows its ALL-IDB1 source field (``idb1_field``), so protocol-2 folds exclude every cell of a
test image, including ALL-IDB2 crops cut from it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from allmil_cli.stages.scale import CROP_RBC_RATIO, estimate_rbc_diameter
from allmil_cli.train.data import load_rgb, read_all_idb1, read_all_idb2, read_bccd

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache" / "cells"
WEIGHTS = REPO / "weights"


@dataclass
class Cell:
    key: str
    kind: str  # idb1 | idb2 | bccd
    path: str  # field image the crop is cut from
    x: float
    y: float
    rbc_px: float
    label: int  # 1 blast, 0 normal white cell
    idb1_field: str  # ALL-IDB1 source field ("" for BCCD)


def inventory(refresh: bool = False) -> list[Cell]:
    f = CACHE / "inventory.json"
    if f.exists() and not refresh:
        return [Cell(**r) for r in json.loads(f.read_text())]
    from allmil_cli.train.detector import idb1_labels
    from allmil_cli.train.idb2_map import load_map

    mp = load_map()
    cells: list[Cell] = []
    rbc_of: dict[str, float] = {}
    idb2 = read_all_idb2()
    by_field: dict[str, list] = {}
    for c in idb2:
        s = mp.get(c.name)
        if s is not None and s.score >= 0.9:
            by_field.setdefault(s.field, []).append((c, s))
    for rec in read_all_idb1():
        rgb = load_rgb(rec.path)
        rbc = estimate_rbc_diameter(rgb)
        rbc_of[rec.name] = rbc
        L = idb1_labels(rec, rgb, rbc)
        mapped = by_field.get(rec.name, [])
        mc = np.array([[s.x, s.y] for _, s in mapped], np.float64).reshape(-1, 2)
        for c, s in mapped:
            cells.append(Cell(f"idb2/{c.name}", "idb2", str(rec.path), s.x, s.y, rbc, c.label, rec.name))
        for lab, pts in ((1, L["blasts"]), (0, L["normals"])):
            for i, (x, y) in enumerate(np.asarray(pts).reshape(-1, 2)):
                if len(mc) and np.hypot(mc[:, 0] - x, mc[:, 1] - y).min() < 0.5 * rbc:
                    continue
                cells.append(Cell(f"idb1/{rec.name}/{lab}/{i}", "idb1", str(rec.path), float(x), float(y), rbc, lab, rec.name))
        # detector-style false positives as non-blasts: platelets (every 3rd) and ambiguous stain blobs
        junk = np.concatenate([np.asarray(L["platelets"]).reshape(-1, 2)[::3], np.asarray(L["ambiguous"]).reshape(-1, 2)])
        for i, (x, y) in enumerate(junk):
            cells.append(Cell(f"junk/{rec.name}/{i}", "junk", str(rec.path), float(x), float(y), rbc, 0, rec.name))
    for c in idb2:  # unmapped crops (none expected): the crop itself is the field
        s = mp.get(c.name)
        if s is None or s.score < 0.9:
            cells.append(Cell(f"idb2/{c.name}", "idb2", str(c.path), 128.0, 128.0, 257 / CROP_RBC_RATIO, c.label, ""))
    for rec in read_bccd():
        if rec.split == "test":
            continue
        b = rec.boxes.get("WBC")
        if b is None or len(b) == 0:
            continue
        rbc = estimate_rbc_diameter(load_rgb(rec.path))
        for i, (x0, y0, x1, y1) in enumerate(b):
            cells.append(Cell(f"bccd/{rec.name}/{i}", "bccd", str(rec.path), float(x0 + x1) / 2, float(y0 + y1) / 2, rbc, 0, ""))
    CACHE.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps([asdict(c) for c in cells]))
    return cells


def tiny_inventory(n_fields: int = 2, per_field: int = 3) -> list[Cell]:
    """CI smoke data: a few ground-truth cells of 2 ALL and 2 healthy ALL-IDB1 fields (no idb2 map, no cache)."""
    from allmil_cli.train.detector import idb1_labels

    recs = read_all_idb1()
    if not recs:
        raise FileNotFoundError("ALL-IDB1 not found (../shared/data/ALL-IDB1)")
    pick = [r for r in recs if r.label == 1][:n_fields] + [r for r in recs if r.label == 0][:n_fields]
    cells: list[Cell] = []
    for rec in pick:
        rgb = load_rgb(rec.path)
        rbc = estimate_rbc_diameter(rgb)
        L = idb1_labels(rec, rgb, rbc)
        for lab, pts in ((1, L["blasts"]), (0, L["normals"])):
            for i, (x, y) in enumerate(np.asarray(pts).reshape(-1, 2)[:per_field]):
                cells.append(Cell(f"idb1/{rec.name}/{lab}/{i}", "idb1", str(rec.path), float(x), float(y), rbc, lab, rec.name))
    return cells


PBC_TYPES = ("lymphocyte", "monocyte", "neutrophil", "eosinophil", "basophil", "ig", "erythroblast")


def pbc_cells(root: Path | None = None, per_type: dict[str, int] | None = None, seed: int = 0) -> list[Cell]:
    """PBC normal white cells (one centred cell per 360x363 image; CC BY 4.0, Acevedo et al. 2020), label 0.

    ``per_type`` caps the images taken per cell type (a seeded random subset, by image: PBC has no donor ids);
    None takes them all. The red-cell ruler runs on each image (its red cells are ~65-75 px across)."""
    from allmil_cli.train.data import DEFAULT_DATA_ROOT

    root = Path(root) if root else DEFAULT_DATA_ROOT / "PBC"
    tag = hashlib.md5(json.dumps(per_type, sort_keys=True).encode()).hexdigest()[:8] if per_type else "all"
    f = CACHE / f"pbc_{seed}_{tag}.json"
    if f.exists():
        return [Cell(**r) for r in json.loads(f.read_text())]
    rng = np.random.default_rng(seed)
    cells: list[Cell] = []
    for kind in PBC_TYPES:
        files = sorted((root / kind).glob("*.jpg"))
        if per_type and kind in per_type and per_type[kind] < len(files):
            files = [files[i] for i in sorted(rng.choice(len(files), per_type[kind], replace=False))]
        for p in files:
            rgb = load_rgb(p)
            h, w = rgb.shape[:2]
            cells.append(Cell(f"pbc/{kind}/{p.stem}", "pbc", str(p), w / 2.0, h / 2.0, estimate_rbc_diameter(rgb), 0, ""))
    CACHE.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps([asdict(c) for c in cells]))
    return cells


#: PBC cells that join the training cells of recipes with ``pbc=True`` (lymphocytes, the look-alikes of
#: blasts, weigh most); the rest of PBC is never trained on by any model.
PBC_TRAIN = {"lymphocyte": 600, "monocyte": 80, "neutrophil": 60, "eosinophil": 40, "basophil": 40, "ig": 60, "erythroblast": 40}
