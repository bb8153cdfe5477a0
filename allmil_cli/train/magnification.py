"""Magnification robustness of detection, held out: ALL-IDB1 fields shrunk to lower magnifications.

Each ALL-IDB1 field is resized by a factor s (s = 1 is the original ~85 px red cells; s = 0.15 gives
~390x290 fields with ~13 px red cells and ~20 px white cells, the low end the product must handle) and
run through the product path: automatic red-cell ruler (``scale.estimate_rbc_diameter``) then
``detect.detect_cells`` with that fold's detector (``.cache/folds/detector_fold{k}.onnx``: trained without
the field). Reports blast-centroid recall (hit within 0.8 x the true ruler) and the ruler's error
relative to s x the full-size estimate.

    python -m allmil_cli.train.magnification [--scales 1 0.5 0.3 0.15] [--stains]
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
from PIL import Image

from allmil_cli.stages.detect import detect_cells
from allmil_cli.stages.scale import estimate_rbc_diameter
from allmil_cli.train.data import image_folds, load_rgb, read_all_idb1
from allmil_cli.train.detector_eval import FOLD_DIR, _hits
from allmil_cli.train.detector_model import _session


def run(scales: list[float]) -> dict[float, dict[str, float]]:
    recs = read_all_idb1()
    folds = image_folds([r.name for r in recs], [r.label for r in recs], k=5, seed=0)
    sessions = {k: _session(FOLD_DIR / f"detector_fold{k}.onnx") for k in range(5)}
    found = {s: 0 for s in scales}
    ruler_err: dict[float, list[float]] = {s: [] for s in scales}
    fps = {s: 0 for s in scales}
    n_blasts = 0
    for rec, k in zip(recs, folds):
        if len(rec.blasts) == 0:
            continue
        rgb = load_rgb(rec.path)
        ref = estimate_rbc_diameter(rgb)
        n_blasts += len(rec.blasts)
        for s in scales:
            h, w = rgb.shape[:2]
            small = rgb if s == 1 else np.asarray(Image.fromarray(rgb).resize((round(w * s), round(h * s)), Image.BILINEAR))
            rbc = estimate_rbc_diameter(small)
            ruler_err[s].append(rbc / (ref * s) - 1.0)
            det = np.asarray([(d.x / s, d.y / s) for d in detect_cells(sessions[k], small, rbc)]).reshape(-1, 2)
            found[s] += int(_hits(det, rec.blasts, 0.8 * ref).sum())
            fps[s] += len(det)
    return {
        s: {"blast_recall": found[s] / n_blasts, "blasts": n_blasts, "ruler_median_abs_err": float(np.median(np.abs(ruler_err[s]))),
            "ruler_max_abs_err": float(np.max(np.abs(ruler_err[s]))), "detections": fps[s]}
        for s in scales
    }


STAINS = {
    "none": lambda a: a,
    "paler (gamma 0.7)": lambda a: 255.0 * (a / 255.0) ** 0.7,
    "darker (gamma 1.4)": lambda a: 255.0 * (a / 255.0) ** 1.4,
    "bluer (R x0.85, B x1.1)": lambda a: a * np.array([0.85, 1.0, 1.1]),
    "redder (R x1.1, B x0.85)": lambda a: a * np.array([1.1, 1.0, 0.85]),
    "desaturated 40 %": lambda a: 0.6 * a + 0.4 * a.mean(axis=2, keepdims=True),
}


def run_stains() -> dict[str, float]:
    """Blast recall of the held-out fold detectors under global colour changes (other stains/cameras)."""
    recs = [r for r in read_all_idb1() if len(r.blasts)]
    all_recs = read_all_idb1()
    folds = dict(zip([r.name for r in all_recs], image_folds([r.name for r in all_recs], [r.label for r in all_recs], k=5, seed=0)))
    sessions = {k: _session(FOLD_DIR / f"detector_fold{k}.onnx") for k in range(5)}
    found = {name: 0 for name in STAINS}
    n = 0
    for rec in recs:
        rgb = load_rgb(rec.path).astype(np.float32)
        ref = estimate_rbc_diameter(rgb.astype(np.uint8))
        n += len(rec.blasts)
        for name, f in STAINS.items():
            img = np.clip(f(rgb), 0, 255).astype(np.uint8)
            det = np.asarray([(d.x, d.y) for d in detect_cells(sessions[folds[rec.name]], img, estimate_rbc_diameter(img))]).reshape(-1, 2)
            found[name] += int(_hits(det, rec.blasts, 0.8 * ref).sum())
    return {name: found[name] / n for name in STAINS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m allmil_cli.train.magnification", description=__doc__.split("\n")[0])
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 0.5, 0.3, 0.15])
    ap.add_argument("--stains", action="store_true", help="also: recall under global colour (stain/camera) changes")
    a = ap.parse_args(argv)
    print("| scale | field size (2592 wide) | blast recall | ruler error median / max | detections |")
    print("|---|---|---|---|---|")
    for s, m in run(a.scales).items():
        print(f"| {s:g} | {round(2592 * s)} px | {100 * m['blast_recall']:.2f} % ({m['blasts']}) | "
              f"{100 * m['ruler_median_abs_err']:.1f} / {100 * m['ruler_max_abs_err']:.1f} % | {m['detections']} |")
    if a.stains:
        print("\n| colour change | blast recall |\n|---|---|")
        for name, r in run_stains().items():
            print(f"| {name} | {100 * r:.2f} % |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
