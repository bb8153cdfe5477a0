"""Each white cell counted once, at any magnification: duplicate detections, blast detection and the red-cell
ruler on fields shrunk or enlarged to known red-cell sizes.

``python -m allmil_cli.train.counting dups``: every field is resized so its red cells are 12, 14, 20, 30, 50 and
85 px across (with and without JPEG quality 70, :mod:`allmil_cli.train.shifts`), then goes through the product
path: ruler (:func:`allmil_cli.scale.measure_field` on the resized field) -> detector -> heatmap peaks, decoded
twice from the same heatmap: with the shipped decoding before this change (``radius``: one suppression radius of
0.6 red-cell diameter) and with the current one (``current``: :data:`allmil_cli.detect.DECODING`). Fields:

* ALL-IDB1, held out: each field with the detector of its protocol-2 fold (``.cache/folds/detector_fold{k}.onnx``,
  trained without it; folds from :func:`allmil_cli.train.protocol2.fields`). Ground truth: the blast centroids
  (``xyc/``) and the normal white cells kept by the training rule (``other/`` filtered by the nucleus-stain rule of
  :mod:`allmil_cli.train.detector_labels`, read from its ``index.json``). The known red-cell size of a field is its
  ruler reading at full resolution (``index.json``'s ``rbc_px``; the unit every model is calibrated in).
* BCCD test split (72 fields, shipped detector: never trained on them). Ground truth: the WBC box centres. BCCD
  is one camera: the known size of every field is one number, the median ruler reading of the BCCD train+val fields.
* PBC, report half (another hospital, CellaVision; one centred white cell per image; the detector never saw PBC).
  Known size: the median ruler reading of the PBC design half.

Counts (all distances in red-cell diameters of the resized field, from its known size, not from the ruler):

* a detection belongs to the nearest ground-truth cell within ``DUP_RBC`` (0.7: half a white cell, which is
  1.3-1.5 red cells across); every detection beyond the first on one cell is a **duplicate**; the duplicate
  share is duplicates / all detections;
* **near a stronger detection**: detections within ``DUP_RBC`` of a higher-scoring one (no ground truth needed,
  the issue's measure);
* **blast detection**: ground-truth blasts with a detection within ``MATCH_RBC`` (0.8) red-cell diameters (the
  definition of ``docs/detector_results.md`` and protocol 3); WBC detection likewise over all ground-truth cells.

``python -m allmil_cli.train.counting design``: the same counts on the design fields only (BCCD train+val, PBC
design half, ALL-IDB1 fields seen by their fold detector in training), for a sweep of decoding settings: where the
decoding constants were chosen. ``... ruler``: the ruler's error per red-cell size, 6 to 260 px
(``docs/ruler.md``). Results go to ``.cache/counting/``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from allmil_cli.detect import DECODING, Decoding, heatmap_detections, model_meta, prepare_input
from allmil_cli.scale import measure_field
from allmil_cli.train.data import load_rgb, read_bccd
from allmil_cli.train.detector_labels import CACHE_DIR as LABELS_DIR
from allmil_cli.train.detector_labels import REPO
from allmil_cli.train.shifts import jpeg, rescale

OUT = REPO / ".cache" / "counting"
FOLD_DIR = REPO / ".cache" / "folds"
WEIGHTS = REPO / "weights" / "detector.onnx"
SIZES = (12.0, 14.0, 20.0, 30.0, 50.0, 85.0)
QUALITIES = (None, 70)
DUP_RBC = 0.7  #: half a white cell (1.3-1.5 red cells across): extra detections this close to a cell are duplicates
MATCH_RBC = 0.8  #: a ground-truth cell is found by a detection this close (docs/detector_results.md, protocol 3)
#: The decoding shipped before this change: one greedy suppression radius of 0.6 red-cell diameter.
RADIUS_ONLY = Decoding(min_dist_rbc=0.6, merge_dist_rbc=0.0, valley=1.0)
PBC_PER_TYPE = {"lymphocyte": 60, "monocyte": 40, "neutrophil": 40, "eosinophil": 40, "basophil": 40, "ig": 40,
                "erythroblast": 40}


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
    f = OUT / "bccd_camera_rbc.json"
    if f.exists():
        return float(json.loads(f.read_text())["rbc_px"])
    from allmil_cli.scale import estimate_rbc_diameter

    v = float(np.median([estimate_rbc_diameter(load_rgb(r.path)) for r in read_bccd() if r.split != "test"]))
    OUT.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({"rbc_px": v, "fields": "BCCD train+val"}))
    return v


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


def pbc_paths(half: str) -> list[Path]:
    """PBC images split by sorted position within each type: even -> ``design``, odd -> ``report``; up to
    ``PBC_PER_TYPE`` each (PBC has no donor ids: a split by image)."""
    from allmil_cli.train.data import DEFAULT_DATA_ROOT

    out = []
    for kind, n in PBC_PER_TYPE.items():
        files = sorted((DEFAULT_DATA_ROOT / "PBC" / kind).glob("*.jpg"))
        files = files[0::2] if half == "design" else files[1::2]
        step = max(1, len(files) // n)
        out += files[::step][:n]
    return out


def pbc_camera_rbc() -> float:
    f = OUT / "pbc_camera_rbc.json"
    if f.exists():
        return float(json.loads(f.read_text())["rbc_px"])
    from allmil_cli.scale import estimate_rbc_diameter

    v = float(np.median([estimate_rbc_diameter(load_rgb(p)) for p in pbc_paths("design")]))
    OUT.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({"rbc_px": v, "fields": "PBC design half"}))
    return v


def pbc_cases(half: str = "report") -> list[Case]:
    rbc = pbc_camera_rbc()
    out = []
    for p in pbc_paths(half):
        h, w = load_rgb(p).shape[:2]  # one centred white cell per image
        out.append(Case(p.stem, p, rbc, np.array([[w / 2.0, h / 2.0]]), np.zeros((0, 2)), WEIGHTS, "PBC"))
    return out


# ------------------------------------------------------------------------------------------- counting
def resize_to(rgb: np.ndarray, known_rbc: float, size: float, quality: int | None) -> tuple[np.ndarray, float]:
    """The field resized so its red cells are ``size`` px (``known_rbc`` at full resolution), then JPEG at
    ``quality`` (None: none). Returns the image and the factor."""
    f = size / known_rbc
    img = rgb if abs(f - 1.0) < 1e-6 else rescale(rgb, f)
    return (jpeg(img, quality) if quality else img), f


def count(det: np.ndarray, cells: np.ndarray, blasts: np.ndarray, rbc: float) -> dict[str, int]:
    """Counts of one field: ``det`` (K, 3) x, y, score; ground truth in the same pixels; ``rbc`` its known size."""
    out = {"det": len(det), "dup": 0, "near": 0, "cells": len(cells), "cells_found": 0, "blasts": len(blasts),
           "blasts_found": 0, "unmatched": 0}
    if len(det) == 0:
        return out
    if len(cells):
        d = np.hypot(det[:, None, 0] - cells[None, :, 0], det[:, None, 1] - cells[None, :, 1])
        j = d.argmin(1)
        own = d[np.arange(len(det)), j] <= DUP_RBC * rbc
        per_cell = np.bincount(j[own], minlength=len(cells))
        out["dup"] = int(np.maximum(per_cell - 1, 0).sum())
        out["cells_found"] = int((d.min(0) <= MATCH_RBC * rbc).sum())
        out["unmatched"] = int((d.min(1) > MATCH_RBC * rbc).sum())
    else:
        out["unmatched"] = len(det)
    if len(blasts):
        db = np.hypot(det[:, None, 0] - blasts[None, :, 0], det[:, None, 1] - blasts[None, :, 1])
        out["blasts_found"] = int((db.min(0) <= MATCH_RBC * rbc).sum())
    order = np.argsort(-det[:, 2], kind="stable")
    s = det[order]
    for i in range(1, len(s)):
        if (np.hypot(s[:i, 0] - s[i, 0], s[:i, 1] - s[i, 1]) <= DUP_RBC * rbc).any():
            out["near"] += 1
    return out


def _add(tally: dict, key: str, c: dict[str, int]) -> None:
    t = tally.setdefault(key, {})
    for k, v in c.items():
        t[k] = t.get(k, 0) + v
    t["fields"] = t.get("fields", 0) + 1


def _key(source: str, size: float, quality: int | None, ruler: str, decoding: str) -> str:
    return f"{source}|{size:g}|{quality or 0}|{ruler}|{decoding}"


def run(cases: list[Case], sizes=SIZES, qualities=QUALITIES, decodings: dict[str, Decoding] | None = None,
        given_ruler: bool = False, verbose: bool = True, tally: dict | None = None,
        threshold: float | None = None) -> dict:
    """Counts per (source, size, JPEG quality, ruler, decoding), summed over ``cases``.

    ``ruler``: ``auto`` (the product's: measured on the resized field) and, with ``given_ruler``, ``given`` (the
    known size passed as ``--cell-size`` would)."""
    decodings = decodings or {"radius": RADIUS_ONLY, "current": DECODING}
    tally = {} if tally is None else tally
    sessions: dict[Path, object] = {}
    t0 = time.time()
    for i, case in enumerate(cases):
        sess = sessions.get(case.detector)
        if sess is None:
            sess = sessions[case.detector] = _session(case.detector)
        meta = model_meta(sess)
        rgb = load_rgb(case.path)
        for size in sizes:
            for q in qualities:
                img, f = resize_to(rgb, case.rbc, size, q)
                rulers = {"auto": measure_field(img).rbc_px}
                if given_ruler:
                    rulers["given"] = case.rbc * f
                h, w = img.shape[:2]
                for rname, rbc_px in rulers.items():
                    x, sx, sy = prepare_input(img, rbc_px, meta["canonical_rbc_px"])
                    heat = sess.run(None, {sess.get_inputs()[0].name: x})[0][0, 0]
                    for dname, dec in decodings.items():
                        dets = heatmap_detections(heat, meta, threshold, w, h, sx, sy, decoding=dec)
                        det = np.asarray([(d.x, d.y, d.score) for d in dets], np.float64).reshape(-1, 3)
                        c = count(det, case.cells * f, case.blasts * f, size)
                        c["merged"] = int(sum(len(d.merged_scores) for d in dets))
                        _add(tally, _key(case.source, size, q, rname, dname), c)
                    if rname == "auto":
                        t = tally.setdefault(_key(case.source, size, q, "auto", "ruler"), {"ratios": []})
                        t["ratios"].append(rbc_px / size)
        if verbose and (i + 1) % 10 == 0:
            print(f"  {case.source}: {i + 1}/{len(cases)} fields, {time.time() - t0:.0f}s", flush=True)
    return tally


def summary(t: dict) -> dict[str, float]:
    det = max(t["det"], 1)
    return {"det": t["det"], "dup_pct": 100.0 * t["dup"] / det, "near_pct": 100.0 * t["near"] / det,
            "blast_pct": 100.0 * t["blasts_found"] / t["blasts"] if t["blasts"] else float("nan"),
            "cell_pct": 100.0 * t["cells_found"] / max(t["cells"], 1), "fp_per_field": t["unmatched"] / max(t["fields"], 1),
            "merged": t.get("merged", 0)}


# ------------------------------------------------------------------------------------------- tables
def _fmt(x: float, nd: int = 1) -> str:
    return "-" if x != x else f"{x:.{nd}f}"


def dup_table(tally: dict, source: str, ruler: str = "auto", sizes=SIZES) -> list[str]:
    lines = ["| red cells | JPEG | detections (before / after) | duplicates % before -> after | near a stronger detection % "
             "before -> after | blasts detected % before -> after | WBCs detected % before -> after | ruler reads (median x known) |",
             "|---|---|---|---|---|---|---|---|"]
    for size in sizes:
        for q in QUALITIES:
            a, b = tally.get(_key(source, size, q, ruler, "radius")), tally.get(_key(source, size, q, ruler, "current"))
            if not a or not b:
                continue
            sa, sb = summary(a), summary(b)
            r = tally.get(_key(source, size, q, "auto", "ruler"), {}).get("ratios", [])
            lines.append(f"| {size:g} px | {q or '-'} | {sa['det']} / {sb['det']} | {_fmt(sa['dup_pct'])} -> **{_fmt(sb['dup_pct'])}** | "
                         f"{_fmt(sa['near_pct'])} -> {_fmt(sb['near_pct'])} | {_fmt(sa['blast_pct'])} -> **{_fmt(sb['blast_pct'])}** | "
                         f"{_fmt(sa['cell_pct'])} -> {_fmt(sb['cell_pct'])} | {_fmt(float(np.median(r)), 2) if r else '-'} |")
    return lines


# ------------------------------------------------------------------------------------------- ruler
RULER_SIZES = (6.0, 8.0, 9.0, 10.0, 12.0, 14.0, 16.0, 20.0, 30.0, 50.0, 85.0, 130.0, 180.0, 260.0)
#: Largest field side the ruler test makes: an enlarged field is cut to its centre first (a camera at a higher
#: magnification sees a smaller part of the smear), so no field grows beyond a 2592 x 1944 sensor.
MAX_SIDE = 2592


def ruler_field(rgb: np.ndarray, known: float, size: float, quality: int | None) -> np.ndarray:
    f = size / known
    h, w = rgb.shape[:2]
    if f > 1.0:
        cw, ch = min(w, int(MAX_SIDE / f)), min(h, int(MAX_SIDE * 0.75 / f))
        x0, y0 = (w - cw) // 2, (h - ch) // 2
        rgb = rgb[y0 : y0 + ch, x0 : x0 + cw]
    img = rgb if abs(f - 1.0) < 1e-6 else rescale(rgb, f)
    return jpeg(img, quality) if quality else img


def redness_reading(rgb: np.ndarray) -> tuple[float, bool]:
    """The ruler before this change (and still the reading of every full-resolution field): the redness mask of the
    512 px thumbnail only."""
    from allmil_cli.scale import DEFAULT_RBC_PX, _otsu, _ruler, fill_holes, open_cross, thumbnail

    a, factor = thumbnail(rgb)
    redness = np.clip((a[..., 0] - a[..., 1]) * 2.0 + 128.0, 0.0, 255.0)
    v = None if float(redness.max() - redness.min()) < 8.0 else _ruler(fill_holes(open_cross(redness > _otsu(redness))), factor)
    return (DEFAULT_RBC_PX, False) if v is None else (v, True)


def current_reading(rgb: np.ndarray) -> tuple[float, bool]:
    s = measure_field(rgb)
    return s.rbc_px, s.measured


def run_ruler(sets: dict[str, list[tuple[Path, float | None]]], sizes=RULER_SIZES, qualities=QUALITIES,
              verbose: bool = True) -> dict:
    """Per set, known size (``own``: the field's full-resolution reading; ``camera``: its camera's), red-cell size and
    JPEG quality: each field's reading / known size, by the ruler before this change (``before``) and now
    (``after``). NaN: unmeasured (the ``ruler`` QC flag). ``sets``: name -> (path, camera size) pairs."""
    out: dict = {}
    t0 = time.time()
    for name, items in sets.items():
        res = out.setdefault(name, {"native_before": [], "native_after": [], "camera": [], "reads": {}})
        for i, (path, camera) in enumerate(items):
            rgb = load_rgb(path)
            native, _ = redness_reading(rgb)
            res["native_before"].append(native)
            res["native_after"].append(current_reading(rgb)[0])
            res["camera"].append(camera)
            for truth, known in (("own", native), ("camera", camera)):
                if not known:
                    continue
                for size in sizes:
                    for q in qualities:
                        img = ruler_field(rgb, known, size, q)
                        for est_name, est in (("before", redness_reading), ("after", current_reading)):
                            v, ok = est(img)
                            res["reads"].setdefault(f"{size:g}|{q or 0}|{truth}|{est_name}", []).append(v / size if ok else float("nan"))
            if verbose and (i + 1) % 20 == 0:
                print(f"  ruler {name}: {i + 1}/{len(items)} fields, {time.time() - t0:.0f}s", flush=True)
    return out


def ruler_sets(design: bool = False) -> dict[str, list[tuple[Path, float | None]]]:
    """Report sets: ALL-IDB1 (camera size: the median full-resolution reading of the fields of its image size), BCCD
    test (the BCCD train+val median), PBC report half (every 2nd; the PBC design-half median)."""
    from allmil_cli.train.data import read_all_idb1

    if design:
        return {"BCCD train+val": [(r.path, bccd_camera_rbc()) for r in read_bccd() if r.split != "test"][::2],
                "PBC design": [(p, pbc_camera_rbc()) for p in pbc_paths("design")][::2]}
    index = json.loads((LABELS_DIR / "index.json").read_text())["idb1"]
    recs = read_all_idb1()
    from PIL import Image

    size_of = {r.name: Image.open(r.path).size for r in recs}
    groups: dict[tuple[int, int], list[float]] = {}
    for r in recs:
        groups.setdefault(size_of[r.name], []).append(float(index[r.name]["rbc_px"]))
    camera = {k: float(np.median(v)) for k, v in groups.items()}
    return {"ALL-IDB1": [(r.path, camera[size_of[r.name]]) for r in recs],
            "BCCD test": [(r.path, bccd_camera_rbc()) for r in read_bccd() if r.split == "test"],
            "PBC report": [(p, pbc_camera_rbc()) for p in pbc_paths("report")][::2]}


def ruler_table(res: dict, truth: str, sizes=RULER_SIZES) -> list[str]:
    """Median |error| % / 90th percentile |error| % per size, set and JPEG setting, before -> after this change
    (unmeasured fields, which raise the ``ruler`` flag, in brackets)."""
    names = list(res)
    lines = ["| red cells | " + " | ".join(f"{n} | {n}, JPEG 70" for n in names) + " |",
             "|---" * (1 + 2 * len(names)) + "|"]

    def cell(v: np.ndarray) -> str:
        if len(v) == 0:
            return "-"
        e = np.abs(v[np.isfinite(v)] - 1.0) * 100.0
        miss = int((~np.isfinite(v)).sum())
        return (f"{np.median(e):.0f} / {np.percentile(e, 90):.0f}" if len(e) else "-") + (f" ({miss})" if miss else "")

    for size in sizes:
        row = [f"{size:g} px"]
        for n in names:
            for q in QUALITIES:
                b = np.asarray(res[n]["reads"].get(f"{size:g}|{q or 0}|{truth}|before", []), np.float64)
                a = np.asarray(res[n]["reads"].get(f"{size:g}|{q or 0}|{truth}|after", []), np.float64)
                row.append("-" if len(a) == 0 else f"{cell(b)} -> **{cell(a)}**")
        lines.append("| " + " | ".join(row) + " |")
    return lines


# ------------------------------------------------------------------------------------------- floor
FLOOR_SIZES = (8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 16.0, 18.0, 20.0, 30.0)
FLOOR_TARGET = 0.90  #: the smallest red cells at which held-out blast recall stays at or above this


def floor_shifts(sizes=FLOOR_SIZES, qualities=QUALITIES):
    """Protocol-3 style resolution shifts: the field resized so its red cells are ``size`` px, then JPEG or not."""
    from allmil_cli.train.shifts import Shift

    def make(size: float, q: int | None):
        def apply(rgb: np.ndarray, rbc: float) -> tuple[np.ndarray, float]:
            img, f = resize_to(rgb, rbc, size, q)
            return img, f
        return apply

    return [Shift(f"res{size:g}" + (f"+jpeg{q}" if q else ""), "resolution", make(size, q)) for size in sizes for q in qualities]


def run_floor(recipe: str = "v2pbc", sizes=FLOOR_SIZES, limit: int | None = None) -> dict:
    """Held-out blast recall per red-cell size through the product path with the fold models of ``recipe``
    (:func:`allmil_cli.train.protocol3.run_fields`): blasts detected, and detected and scored blast-like."""
    from allmil_cli.train.protocol3 import run_fields, summarise

    tally = run_fields([recipe], shifts=floor_shifts(sizes), limit=limit)
    out = {}
    for name, d in tally[recipe].items():
        m = summarise(d)
        out[name] = {"blast_detected": m["blast_detected"], "blast_recall": m["blast_recall"],
                     "blast_recall_shipped": m["blast_recall_shipped"], "blasts": d["blasts"],
                     "sensitivity": m["sensitivity"], "specificity": m["specificity"], "cells_median": m["cells_median"]}
    return out


def floor_of(res: dict, key: str = "blast_recall", target: float = FLOOR_TARGET) -> dict[str, float | None]:
    """Per JPEG setting, the smallest measured size from which ``key`` stays >= ``target`` at every larger size."""
    out: dict[str, float | None] = {}
    for q in QUALITIES:
        suffix = f"+jpeg{q}" if q else ""
        rows = sorted((float(n[3:].split("+")[0]), v[key]) for n, v in res.items() if n.endswith(suffix) and ("+" in n) == bool(q))
        ok = None
        for size, v in reversed(rows):
            if v < target:
                break
            ok = size
        out[f"jpeg{q}" if q else "none"] = ok
    return out


# ------------------------------------------------------------------------------------------- CLI
def _save(name: str, obj: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    f = OUT / name
    f.write_text(json.dumps(obj))
    return f


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m allmil_cli.train.counting", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("dups", help="duplicates and blast detection per red-cell size (held-out / test fields)")
    p.add_argument("--sources", nargs="+", default=["idb1", "bccd", "pbc"], choices=["idb1", "bccd", "pbc"])
    p.add_argument("--limit", type=int, default=None, help="first N fields per source (a quick look; not a result)")
    p.add_argument("--given", action="store_true", help="also run with the known red-cell size given (--cell-size)")
    p.add_argument("--out", default="dups.json")
    p = sub.add_parser("design", help="the same counts on design fields, for a sweep of decoding settings")
    p.add_argument("--limit", type=int, default=None)
    p = sub.add_parser("ruler", help="ruler error per red-cell size, 6-260 px")
    p.add_argument("--design", action="store_true", help="design fields (BCCD train+val, PBC design half)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", default=None)
    p = sub.add_parser("floor", help="held-out blast recall per red-cell size (fold models: detector + embedder)")
    p.add_argument("--recipe", default="v2pbc")
    p.add_argument("--limit", type=int, default=None)
    p = sub.add_parser("table", help="print the tables of a saved result")
    p.add_argument("file")
    a = ap.parse_args(argv)
    if a.cmd == "dups":
        cases: list[Case] = []
        for s in a.sources:
            c = {"idb1": idb1_cases, "bccd": bccd_cases, "pbc": pbc_cases}[s]()
            cases += c[: a.limit] if a.limit else c
        tally = run(cases, given_ruler=a.given)
        f = _save(a.out, {"tally": tally, "decoding": DECODING.__dict__, "limit": a.limit})
        _print_dups(tally, a.given)
        print(f"-> {f}")
    elif a.cmd == "design":
        _design(a.limit)
    elif a.cmd == "ruler":
        sets = ruler_sets(a.design)
        if a.limit:
            sets = {k: v[: a.limit] for k, v in sets.items()}
        res = run_ruler(sets)
        f = _save(a.out or ("ruler_design.json" if a.design else "ruler.json"), res)
        _print_ruler(res)
        print(f"-> {f}")
    elif a.cmd == "floor":
        import torch

        torch.set_num_threads(1)
        res = run_floor(a.recipe, limit=a.limit)
        f = _save("floor.json" if not a.limit else "floor_limit.json", {"recipe": a.recipe, "by_shift": res})
        _print_floor(res)
        print(f"-> {f}")
    elif a.cmd == "table":
        obj = json.loads(Path(a.file).read_text())
        if "tally" in obj:
            _print_dups(obj["tally"], True)
        else:
            _print_ruler(obj)
    return 0


def _print_floor(res: dict) -> None:
    print("| red cells | JPEG | blasts detected % | blast recall % (detected and scored >= 0.5) | at the shipped cell threshold | "
          "sensitivity % | specificity % | cells/field |")
    print("|---|---|---|---|---|---|---|---|")
    for name, v in res.items():
        size, _, q = name[3:].partition("+jpeg")
        print(f"| {size} px | {q or '-'} | {100 * v['blast_detected']:.1f} | {100 * v['blast_recall']:.1f} | "
              f"{100 * v['blast_recall_shipped']:.1f} | {100 * v['sensitivity']:.1f} | {100 * v['specificity']:.1f} | {v['cells_median']:.0f} |")
    print("floor (blast recall >= 90 % from there up):", floor_of(res), "; on detection alone:", floor_of(res, "blast_detected"))


def _print_dups(tally: dict, given: bool) -> None:
    for src in ("ALL-IDB1", "BCCD", "PBC"):
        for ruler in ("auto", "given") if given else ("auto",):
            if any(k.startswith(src + "|") and f"|{ruler}|" in k for k in tally):
                print(f"\n{src}, ruler {ruler}")
                print("\n".join(dup_table(tally, src, ruler)))


def _print_ruler(res: dict) -> None:
    for truth in ("own", "camera"):
        print(f"\nknown size: {truth}; median / 90th percentile |error| %")
        print("\n".join(ruler_table(res, truth)))


def design_sweep() -> dict[str, Decoding]:
    """The decoding settings compared on the design fields."""
    out = {"radius": RADIUS_ONLY, "radius0.8": Decoding(0.8, 0.0, 1.0), "radius1.0": Decoding(1.0, 0.0, 1.0)}
    for v in (0.5, 0.6, 0.7, 0.8):
        for m in (1.0, 1.2):
            out[f"valley{v}@{m}"] = Decoding(0.6, m, v)
    out["current"] = DECODING
    return out


def _design(limit: int | None) -> None:
    cases = bccd_cases("trainval")[::2] + pbc_cases("design")
    if all((FOLD_DIR / f"detector_fold{k}.onnx").exists() for k in range(5)):
        cases += idb1_cases("train")
    if limit:
        cases = cases[:limit]
    sweep = design_sweep()
    tally = run(cases, decodings=sweep)
    _save("design.json", {"tally": tally, "sweep": {k: v.__dict__ for k, v in sweep.items()}})
    for src in ("ALL-IDB1", "BCCD", "PBC"):
        print(f"\n{src} (design fields): duplicates % / blasts (or WBCs) detected %, per decoding")
        print("| decoding | " + " | ".join(f"{s:g}{'j' if q else ''}" for s in SIZES for q in QUALITIES) + " |")
        for d in sweep:
            row = []
            for s in SIZES:
                for q in QUALITIES:
                    t = tally.get(_key(src, s, q, "auto", d))
                    if not t:
                        row.append("-")
                        continue
                    m = summary(t)
                    row.append(f"{_fmt(m['dup_pct'])}/{_fmt(m['blast_pct'] if m['blast_pct'] == m['blast_pct'] else m['cell_pct'])}")
            print(f"| {d} | " + " | ".join(row) + " |")


if __name__ == "__main__":
    raise SystemExit(main())
