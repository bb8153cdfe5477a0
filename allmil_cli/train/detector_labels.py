"""Detector stage 1, labels: white-cell centres of every training field, and the training cache.

* BCCD (``train`` + ``val`` split only): WBC box centres. Test split is never trained on.
* ALL-IDB1: every blast centroid (``xyc/``) is a white cell. ``other/`` mixes normal white cells with
  platelets; each ``other`` centre is classified by the nucleus stain around it (:func:`_stain_mask`,
  :func:`_blob_area_at`), at a scale where red cells are 30 px. Stain mask: ``B - G > 45`` (3x3 mean),
  or dark (``G < 0.45`` x the field's median G) with ``B - G > 10``. Two areas, in red-cell disc areas:
  ``cc`` = the connected stain component at the centre (or nearest within 0.3 rbc), ``disc`` = stain
  pixels within 0.6 rbc of the centre (catches segmented neutrophil nuclei, whose lobes are separate
  components). Rule: ``cc >= 0.30`` or ``disc >= 0.25`` -> white cell (kept, positive);
  ``cc < 0.10`` and ``disc < 0.10`` (incl. no stain) -> platelet (left as background, a negative);
  otherwise ambiguous (on inspection mostly giant platelets / clumps) -> an ignore disc of radius
  0.5 rbc, neither positive nor negative. Every one of the 510 blasts passes the keep rule (min area
  0.56), a sanity check of the thresholds. Counts on the 1430 ``other`` centres: 293 kept as white
  cells, 1081 dropped as platelets, 56 ambiguous (``python -m allmil_cli.train.detector labels``).
  (Montages of each class were inspected: dropped = small platelets; kept = lymphocytes, monocytes,
  neutrophils, eosinophils.)
* Unlabelled strong stain blobs (area >= 0.30 red-cell area, e.g. smudge cells in ALL-IDB1, missing
  boxes in BCCD) farther than 0.8 red-cell diameter from every labelled white cell get an ignore mask
  (their pixels dilated by 0.3 red-cell diameter): no loss there, rather than forcing them negative.

Cache (:func:`build_cache`): every ALL-IDB1 and BCCD field rescaled so red cells are ``CACHE_RBC_PX``
(30) px across, with its centres and ignore mask, one ``.npz`` per field under ``.cache/detector_v2/``
plus ``index.json``; :func:`load_samples` reads it back for training. The rule is shared:
``allmil_cli.train.cells`` uses :func:`idb1_labels` for its normal white cells.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from allmil_cli.stages.scale import estimate_rbc_diameter
from allmil_cli.train.data import load_rgb, read_all_idb1, read_bccd

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO / ".cache" / "detector_v2"

CACHE_RBC_PX = 30.0  #: red-cell diameter of the cached training images (room for scale augmentation)
MATCH_RBC = 0.8  #: a detection within this many rbc diameters of a centre finds it (0.5 WBC diameter)

STAIN_THRESHOLD = 45.0
KEEP_AREA = 0.30
KEEP_DISC = 0.25
DROP_AREA = 0.10


@dataclass
class Sample:
    name: str
    source: str  # "bccd" or "idb1"
    image: np.ndarray  # uint8 (h, w, 3) at CACHE_RBC_PX
    centres: np.ndarray  # (K, 2) white-cell centres at cache scale
    ignore: np.ndarray  # bool (h, w), no loss there
    fill: np.ndarray  # (3,) median colour


def _rescale(rgb: np.ndarray, rbc_px: float, target: float) -> tuple[np.ndarray, float, float]:
    h, w = rgb.shape[:2]
    f = target / rbc_px
    nw, nh = max(1, int(round(w * f))), max(1, int(round(h * f)))
    return np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR)), nw / w, nh / h


def _stain_mask(img: np.ndarray) -> np.ndarray:
    """Nucleus-stain pixels: ``B - G > 45`` (3x3 mean), or dark (``G < 0.45`` x the field's median G)
    with ``B - G > 10`` (dark-stained lymphocytes/blasts whose B - G saturates)."""
    a = img.astype(np.float32)
    bg = float(np.median(a[::4, ::4, 1]))
    bmg = ndi.uniform_filter(a[..., 2] - a[..., 1], 3)
    g = ndi.uniform_filter(a[..., 1], 3)
    return (bmg > STAIN_THRESHOLD) | ((g < 0.45 * bg) & (bmg > 10.0))


def _stain_blobs(img: np.ndarray):
    """Connected components of :func:`_stain_mask` at cache scale; areas in red-cell disc areas."""
    mask = _stain_mask(img)
    lab, n = ndi.label(mask)
    rbc_area = math.pi * (CACHE_RBC_PX / 2) ** 2
    areas = np.bincount(lab.ravel(), minlength=n + 1).astype(np.float64) / rbc_area
    areas[0] = 0.0
    return lab, areas


def _blob_area_at(lab, areas, pts: np.ndarray) -> np.ndarray:
    """Per point: (area of the stain component at / within 0.3 rbc of it, stain area within a disc of
    radius 0.6 rbc around it), both in red-cell disc areas. The disc catches segmented (neutrophil) nuclei
    whose lobes are separate components."""
    if len(pts) == 0:
        return np.zeros((0, 2))
    dist, (iy, ix) = ndi.distance_transform_edt(lab == 0, return_indices=True)
    h, w = lab.shape
    c = int(CACHE_RBC_PX)
    yy, xx = np.mgrid[-c : c + 1, -c : c + 1]
    disc = (xx**2 + yy**2) <= (0.6 * CACHE_RBC_PX) ** 2
    padded = np.pad(lab > 0, c)
    rbc_area = math.pi * (CACHE_RBC_PX / 2) ** 2
    out = []
    for x, y in pts:
        xi, yi = min(max(int(x), 0), w - 1), min(max(int(y), 0), h - 1)
        cc = 0.0 if dist[yi, xi] > 0.3 * CACHE_RBC_PX else areas[lab[iy[yi, xi], ix[yi, xi]]]
        da = float((padded[yi : yi + 2 * c + 1, xi : xi + 2 * c + 1] & disc).sum()) / rbc_area
        out.append((cc, da))
    return np.asarray(out)


def _ignore_mask(lab, areas, centres: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """Pixels of strong unlabelled stain blobs (+ ambiguous ``extra`` centres), dilated."""
    h, w = lab.shape
    ign = np.zeros((h, w), dtype=bool)
    big = np.nonzero(areas >= KEEP_AREA)[0]
    if len(big):
        cy = ndi.center_of_mass(np.ones_like(lab), lab, big)
        near = MATCH_RBC * CACHE_RBC_PX
        for k, (yy, xx) in zip(big, cy):
            comp = lab == k
            if len(centres):
                # a labelled centre inside the blob or near its centroid explains it
                ci = np.clip(centres.astype(int), 0, [w - 1, h - 1])
                if comp[ci[:, 1], ci[:, 0]].any():
                    continue
                if (np.hypot(centres[:, 0] - xx, centres[:, 1] - yy) < near).any():
                    continue
            ign |= comp
        ign = ndi.binary_dilation(ign, iterations=int(0.3 * CACHE_RBC_PX))
    yy, xx = np.mgrid[0:h, 0:w]
    for x, y in extra:
        r = 0.5 * CACHE_RBC_PX
        x0, x1 = max(int(x - r), 0), min(int(x + r) + 1, w)
        y0, y1 = max(int(y - r), 0), min(int(y + r) + 1, h)
        ign[y0:y1, x0:x1] |= (xx[y0:y1, x0:x1] - x) ** 2 + (yy[y0:y1, x0:x1] - y) ** 2 <= r * r
    return ign


def idb1_labels(rec, rgb: np.ndarray | None = None, rbc_px: float | None = None) -> dict:
    """White-cell labels of one ALL-IDB1 field (full-res coords): blasts, kept others, dropped, ambiguous."""
    rgb = load_rgb(rec.path) if rgb is None else rgb
    rbc_px = estimate_rbc_diameter(rgb) if rbc_px is None else rbc_px
    img, sx, sy = _rescale(rgb, rbc_px, CACHE_RBC_PX)
    lab, areas = _stain_blobs(img)
    oth = rec.others * np.float32([sx, sy]) if len(rec.others) else rec.others
    a = _blob_area_at(lab, areas, oth).reshape(-1, 2)
    keep = (a[:, 0] >= KEEP_AREA) | (a[:, 1] >= KEEP_DISC)
    drop = (a[:, 0] < DROP_AREA) & (a[:, 1] < DROP_AREA)
    return {
        "rbc_px": rbc_px,
        "blasts": rec.blasts,
        "normals": rec.others[keep],
        "platelets": rec.others[drop],
        "ambiguous": rec.others[~keep & ~drop],
        "_img": img,
        "_lab": (lab, areas),
        "_scale": (sx, sy),
    }


def build_cache(force: bool = False, verbose: bool = True) -> Path:
    """Rescale every ALL-IDB1 and BCCD field to CACHE_RBC_PX and derive labels; one .npz per field."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    index_path = CACHE_DIR / "index.json"
    if index_path.exists() and not force:
        return index_path
    index = {"idb1": {}, "bccd": {}}
    t0 = time.time()
    for rec in read_all_idb1():
        rgb = load_rgb(rec.path)
        rbc = estimate_rbc_diameter(rgb)
        L = idb1_labels(rec, rgb, rbc)
        sx, sy = L["_scale"]
        s = np.float32([sx, sy])
        centres = np.concatenate([L["blasts"], L["normals"]]).reshape(-1, 2) * s
        amb = L["ambiguous"].reshape(-1, 2) * s
        lab, areas = L["_lab"]
        ign = _ignore_mask(lab, areas, centres, amb)
        np.savez_compressed(CACHE_DIR / f"idb1_{rec.name}.npz", image=L["_img"], centres=centres, ignore=ign)
        index["idb1"][rec.name] = {
            "label": rec.label, "rbc_px": rbc, "n_blasts": len(L["blasts"]), "n_normals": len(L["normals"]),
            "n_platelets": len(L["platelets"]), "n_ambiguous": len(amb),
            "normals": L["normals"].tolist(), "ambiguous": L["ambiguous"].tolist(),
            "platelets": L["platelets"].tolist(),
        }
    for rec in read_bccd():
        rgb = load_rgb(rec.path)
        rbc = estimate_rbc_diameter(rgb)
        img, sx, sy = _rescale(rgb, rbc, CACHE_RBC_PX)
        b = rec.boxes.get("WBC", np.zeros((0, 4), np.float32))
        centres = np.stack([(b[:, 0] + b[:, 2]) / 2 * sx, (b[:, 1] + b[:, 3]) / 2 * sy], 1).reshape(-1, 2)
        lab, areas = _stain_blobs(img)
        ign = _ignore_mask(lab, areas, centres, np.zeros((0, 2)))
        np.savez_compressed(CACHE_DIR / f"bccd_{rec.name}.npz", image=img, centres=centres, ignore=ign)
        index["bccd"][rec.name] = {"split": rec.split, "rbc_px": rbc, "n_wbc": len(b)}
    index_path.write_text(json.dumps(index))
    if verbose:
        print(f"cache built in {time.time() - t0:.0f}s -> {CACHE_DIR}", flush=True)
    return index_path


def load_samples(idb1_names: list[str], bccd_splits=("train", "val")) -> list[Sample]:
    index = json.loads((CACHE_DIR / "index.json").read_text())
    out = []
    todo = [("idb1", n) for n in idb1_names] + [
        ("bccd", n) for n, v in index["bccd"].items() if v["split"] in bccd_splits
    ]
    for src, n in todo:
        z = np.load(CACHE_DIR / f"{src}_{n}.npz")
        img = z["image"]
        out.append(Sample(n, src, img, z["centres"].astype(np.float32).reshape(-1, 2), z["ignore"],
                          np.median(img[::4, ::4].reshape(-1, 3), 0).astype(np.uint8)))
    return out


#: PBC (CellaVision, another hospital) images of these types give the detector one centred white cell each.
PBC_DETECTOR_TYPES = ("lymphocyte", "monocyte", "neutrophil", "eosinophil", "basophil", "ig")
#: Only the disc of this many red-cell diameters around a PBC image's centre carries a loss: beyond it another white
#: cell could lie unlabelled.
PBC_LABELLED_RBC = 2.0


def pbc_samples(paths: list[Path], rbc_px: float) -> list[Sample]:
    """PBC images as detector samples: one white cell at the image centre (CellaVision centres the cell it
    classifies), the red cells around it as background, everything beyond ``PBC_LABELLED_RBC`` ignored.

    They teach one peak per cell for the large, lobed cells (eosinophils, monocytes, neutrophils) that ALL-IDB1 and
    BCCD hold few of. Erythroblasts are left out: a nucleated red cell is not a white cell."""
    out = []
    for p in paths:
        img, fx, fy = _rescale(load_rgb(p), rbc_px, CACHE_RBC_PX)
        h, w = img.shape[:2]
        yy, xx = np.mgrid[0:h, 0:w]
        ignore = np.hypot(xx - w / 2.0, yy - h / 2.0) > PBC_LABELLED_RBC * CACHE_RBC_PX
        out.append(Sample(p.stem, "pbc", img, np.float32([[w / 2.0, h / 2.0]]), ignore,
                          np.median(img[::4, ::4].reshape(-1, 3), 0).astype(np.uint8)))
    return out


def label_counts() -> dict:
    build_cache()
    idx = json.loads((CACHE_DIR / "index.json").read_text())["idb1"]
    return {k: int(sum(v[k] for v in idx.values())) for k in ("n_blasts", "n_normals", "n_platelets", "n_ambiguous")}
