"""The red-cell ruler's error per red-cell size (6-260 px) and held-out blast recall per size (the ``resolution`` QC
floor): ``python -m allmil_cli.train.counting ruler`` / ``floor`` (docs/ruler.md)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from allmil_cli.train.counting_fields import (
    LABELS_DIR, QUALITIES, bccd_camera_rbc, current_reading, load_rgb, pbc_camera_rbc, pbc_paths, read_bccd,
    redness_reading, resize_to, ruler_field,
)


# ------------------------------------------------------------------------------------------- ruler
RULER_SIZES = (6.0, 8.0, 9.0, 10.0, 12.0, 14.0, 16.0, 20.0, 30.0, 50.0, 85.0, 130.0, 180.0, 260.0)


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


def run_floor(recipe: str = "v2pbc", sizes=FLOOR_SIZES, limit: int | None = None, qualities=QUALITIES) -> dict:
    """Held-out blast recall per red-cell size through the product path with the fold models of ``recipe``
    (:func:`allmil_cli.train.protocol3.run_fields`): blasts detected, and detected and scored blast-like."""
    from allmil_cli.train.protocol3 import run_fields, summarise

    tally = run_fields([recipe], shifts=floor_shifts(sizes, qualities), limit=limit)
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
    seen = {int(n.partition("+jpeg")[2]) if "+jpeg" in n else None for n in res}
    for q in sorted(seen, key=lambda x: -1 if x is None else x):
        suffix = f"+jpeg{q}" if q else ""
        rows = sorted((float(n[3:].split("+")[0]), v[key]) for n, v in res.items() if n.endswith(suffix) and ("+" in n) == bool(q))
        ok = None
        for size, v in reversed(rows):
            if v < target:
                break
            ok = size
        out[f"jpeg{q}" if q else "none"] = ok
    return out


def _print_floor(res: dict) -> None:
    print("| red cells | JPEG | blasts detected % | blast recall % (detected and scored >= 0.5) | at the shipped cell threshold | "
          "sensitivity % | specificity % | cells/field |")
    print("|---|---|---|---|---|---|---|---|")
    for name, v in res.items():
        size, _, q = name[3:].partition("+jpeg")
        print(f"| {size} px | {q or '-'} | {100 * v['blast_detected']:.1f} | {100 * v['blast_recall']:.1f} | "
              f"{100 * v['blast_recall_shipped']:.1f} | {100 * v['sensitivity']:.1f} | {100 * v['specificity']:.1f} | {v['cells_median']:.0f} |")
    print("floor (blast recall >= 90 % from there up):", floor_of(res), "; on detection alone:", floor_of(res, "blast_detected"))


def _print_ruler(res: dict) -> None:
    for truth in ("own", "camera"):
        print(f"\nknown size: {truth}; median / 90th percentile |error| %")
        print("\n".join(ruler_table(res, truth)))


