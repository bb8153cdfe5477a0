"""Each white cell counted once, at any magnification: duplicate detections, blast detection and the red-cell
ruler on fields shrunk or enlarged to known red-cell sizes.

``python -m allmil_cli.train.counting dups``: every field is resized so its red cells are 12, 14, 20, 30, 50 and
85 px across, or left at full size (with and without JPEG quality 70, :mod:`allmil_cli.train.shifts`), then goes
through the product path: ruler (:func:`allmil_cli.stages.scale.measure_field` on the resized field) -> detector -> heatmap
peaks, decoded twice from the same heatmap: the shipped decoding (``radius``: one suppression radius of 0.6 red-cell
diameter) and the valley rule (``current``: ``counting_fields.VALLEY_RULE``, measured, not shipped). With ``--given``
also with the ruler before this change (``before``) and with the known size given (``given``, as ``--cell-size``).
Fields (:mod:`allmil_cli.train.counting_fields`):

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
decoding constants were compared (with pair statistics: distance and heatmap valley of every pair of peaks). ``...
ruler``: the ruler's error per red-cell size, 6 to 260 px; ``... floor``: held-out blast recall per red-cell size, the
``resolution`` QC floor (:mod:`allmil_cli.train.counting_ruler`, docs/ruler.md). Results go to ``.cache/counting/``;
``... table FILE`` prints a saved result's tables.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from allmil_cli.stages.detect import (
    DECODING,
    Decoding,
    heatmap_detections,
    model_meta,
    prepare_input,
)
from allmil_cli.stages.scale import measure_field
from allmil_cli.train.counting_fields import (
    DUP_RBC,
    FOLD_DIR,
    FULL,
    MATCH_RBC,
    QUALITIES,
    RADIUS_ONLY,
    SIZES,
    VALLEY_RULE,
    Case,
    _session,
    bccd_cases,
    idb1_cases,
    load_rgb,
    pbc_cases,
    redness_reading,
    resize_to,
)
from allmil_cli.train.pbc_split import OUT


# ------------------------------------------------------------------------------------------- counting
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
        threshold: float | None = None, pairs: list | None = None) -> dict:
    """Counts per (source, size, JPEG quality, ruler, decoding), summed over ``cases``.

    ``ruler``: ``auto`` (the product's: measured on the resized field) and, with ``given_ruler``, ``given`` (the
    known size passed as ``--cell-size`` would)."""
    decodings = decodings or {"radius": DECODING, "current": VALLEY_RULE}
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
                    rulers["before"] = redness_reading(img)[0]  # the ruler before this change
                h, w = img.shape[:2]
                for rname, rbc_px in rulers.items():
                    x, sx, sy = prepare_input(img, rbc_px, meta["canonical_rbc_px"])
                    heat = sess.run(None, {sess.get_inputs()[0].name: x})[0][0, 0]
                    if pairs is not None and rname == "auto":
                        pairs.extend(_pairs(heat, meta, threshold, w, h, sx, sy, case.cells * f, size,
                                            f"{case.source}|{size:g}|{q or 0}"))
                    for dname, dec in decodings.items():
                        dets = heatmap_detections(heat, meta, threshold, w, h, sx, sy, decoding=dec)
                        det = np.asarray([(d.x, d.y, d.score) for d in dets], np.float64).reshape(-1, 3)
                        c = count(det, case.cells * f, case.blasts * f, case.rbc * f)
                        c["merged"] = int(sum(len(d.merged_scores) for d in dets))
                        _add(tally, _key(case.source, size, q, rname, dname), c)
                    if rname == "auto":
                        t = tally.setdefault(_key(case.source, size, q, "auto", "ruler"), {"ratios": []})
                        t["ratios"].append(rbc_px / (case.rbc * f))
        if verbose and (i + 1) % 10 == 0:
            print(f"  {case.source}: {i + 1}/{len(cases)} fields, {time.time() - t0:.0f}s", flush=True)
    return tally


def _pairs(heat, meta, threshold, w, h, sx, sy, cells: np.ndarray, rbc: float, tag: str) -> list[tuple]:
    """Every pair of heatmap peaks (radius-only decoding) within 1.2 red cells of each other: (tag, distance in red cells
    at the detector's scale, lowest heatmap on the line between / the weaker score, label) where label is ``dup`` (both
    nearest to the same ground-truth cell), ``two`` (nearest to two different cells, each within 0.8) or ``other``."""
    from allmil_cli.stages.detect import _ridge, decode_heatmap

    thr = meta["threshold"] if threshold is None else float(threshold)
    per_rbc = meta["canonical_rbc_px"] / meta["stride"]
    pk = decode_heatmap(heat, thr, RADIUS_ONLY.min_dist_rbc * per_rbc)
    out = []
    if len(pk) < 2:
        return out
    xy = np.stack([pk[:, 0] * meta["stride"] / sx, pk[:, 1] * meta["stride"] / sy], 1)
    for i in range(1, len(pk)):
        for j in range(i):
            d = float(np.hypot(pk[i, 0] - pk[j, 0], pk[i, 1] - pk[j, 1])) / per_rbc
            if d > 1.2:
                continue
            ratio = _ridge(heat, pk[j, 0], pk[j, 1], pk[i, 0], pk[i, 1]) / float(pk[i, 2])
            label = "other"
            if len(cells):
                dd = np.hypot(xy[[i, j], None, 0] - cells[None, :, 0], xy[[i, j], None, 1] - cells[None, :, 1])
                a, b = dd.argmin(1)
                if a == b and dd[0, a] <= DUP_RBC * rbc and dd[1, b] <= DUP_RBC * rbc:
                    label = "dup"
                elif a != b and dd[0, a] <= MATCH_RBC * rbc and dd[1, b] <= MATCH_RBC * rbc:
                    label = "two"
            out.append((tag, round(d, 3), round(ratio, 3), label))
    return out


def summary(t: dict) -> dict[str, float]:
    det = max(t["det"], 1)
    return {"det": t["det"], "dup_pct": 100.0 * t["dup"] / det, "near_pct": 100.0 * t["near"] / det,
            "blast_pct": 100.0 * t["blasts_found"] / t["blasts"] if t["blasts"] else float("nan"),
            "cell_pct": 100.0 * t["cells_found"] / max(t["cells"], 1), "fp_per_field": t["unmatched"] / max(t["fields"], 1),
            "merged": t.get("merged", 0)}


# ------------------------------------------------------------------------------------------- tables
def _fmt(x: float, nd: int = 1) -> str:
    return "-" if x != x else f"{x:.{nd}f}"


def dup_table(tally: dict, source: str, ruler: str = "auto", sizes=(FULL,) + SIZES, before_ruler: str | None = None) -> list[str]:
    """Before (``before_ruler`` or ``ruler``, radius-only decoding) -> after (``ruler``, current decoding)."""
    lines = ["| red cells (px) | JPEG | detections (before / after) | duplicates % before -> after | near a stronger detection % "
             "before -> after | blasts detected % before -> after | WBCs detected % before -> after | ruler reads (median x known) |",
             "|---|---|---|---|---|---|---|---|"]
    for size in sizes:
        for q in QUALITIES:
            a = tally.get(_key(source, size, q, before_ruler or ruler, "radius"))
            b = tally.get(_key(source, size, q, ruler, "current"))
            if not a or not b:
                continue
            sa, sb = summary(a), summary(b)
            r = tally.get(_key(source, size, q, "auto", "ruler"), {}).get("ratios", [])
            lines.append(f"| {'full size' if size == FULL else f'{size:g}'} | {q or '-'} | {sa['det']} / {sb['det']} | {_fmt(sa['dup_pct'])} -> **{_fmt(sb['dup_pct'])}** | "
                         f"{_fmt(sa['near_pct'])} -> {_fmt(sb['near_pct'])} | {_fmt(sa['blast_pct'])} -> **{_fmt(sb['blast_pct'])}** | "
                         f"{_fmt(sa['cell_pct'])} -> {_fmt(sb['cell_pct'])} | {_fmt(float(np.median(r)), 2) if r else '-'} |")
    return lines


def three_way_table(tally: dict, source: str, sizes=(FULL,) + SIZES) -> list[str]:
    """Before (ruler and decoding before this change) -> now (the ruler now, the shipped radius decoding) | the valley
    rule (measured, not shipped: the ``current`` decoding of a run made while it was set): duplicates %, blasts (BCCD
    and PBC: white cells) detected %, detections."""
    what = "blasts" if source == "ALL-IDB1" else "WBCs"
    lines = [f"| red cells (px) | JPEG | duplicates % before -> now (valley rule) | {what} detected % before -> now (valley rule) | "
             "detections before -> now (valley rule) |", "|---|---|---|---|---|"]
    for size in sizes:
        for q in QUALITIES:
            t = [tally.get(_key(source, size, q, r, d)) for r, d in (("before", "radius"), ("auto", "radius"), ("auto", "current"))]
            if not all(t):
                continue
            m = [summary(x) for x in t]
            det = "blast_pct" if source == "ALL-IDB1" else "cell_pct"
            lines.append(f"| {'full size' if size == FULL else f'{size:g}'} | {q or '-'} | {_fmt(m[0]['dup_pct'])} -> **{_fmt(m[1]['dup_pct'])}** "
                         f"({_fmt(m[2]['dup_pct'])}) | {_fmt(m[0][det])} -> **{_fmt(m[1][det])}** ({_fmt(m[2][det])}) | "
                         f"{m[0]['det']} -> {m[1]['det']} ({m[2]['det']}) |")
    return lines


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
    p.add_argument("--given", action="store_true", help="also run with the known red-cell size given (--cell-size) "
                   "and with the ruler before this change")
    p.add_argument("--out", default="dups.json")
    p.add_argument("--folds", type=Path, default=None,
                   help="ALL-IDB1: the fold detectors of this folder (default .cache/folds), e.g. .cache/folds_shift")
    p.add_argument("--detector", type=Path, default=None,
                   help="BCCD and PBC: this detector instead of the shipped one (e.g. a fold model, to compare recipes)")
    p = sub.add_parser("design", help="the same counts on design fields, for a sweep of decoding settings")
    p.add_argument("--limit", type=int, default=None)
    p = sub.add_parser("ruler", help="ruler error per red-cell size, 6-260 px")
    p.add_argument("--design", action="store_true", help="design fields (BCCD train+val, PBC design half)")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--out", default=None)
    p = sub.add_parser("floor", help="held-out blast recall per red-cell size (fold models: detector + embedder)")
    p.add_argument("--recipe", default="v2pbc")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--sizes", type=float, nargs="+", default=None, help="red-cell sizes (px); default: 8-30")
    p.add_argument("--qualities", type=int, nargs="+", default=None, help="JPEG qualities, 0 for none; default: 0 70")
    p.add_argument("--out", default=None)
    p = sub.add_parser("table", help="print the tables of a saved result")
    p.add_argument("file")
    a = ap.parse_args(argv)
    if a.cmd == "dups":
        cases: list[Case] = []
        for s in a.sources:
            c = {"idb1": idb1_cases, "bccd": bccd_cases, "pbc": pbc_cases}[s]()
            cases += c[: a.limit] if a.limit else c
        cases = [replace(c, detector=_detector_for(c, a.folds, a.detector)) for c in cases]
        tally = run(cases, sizes=(FULL,) + SIZES, given_ruler=a.given, decodings={"radius": DECODING, "current": VALLEY_RULE})
        f = _save(a.out, {"tally": tally, "decoding": {"radius": DECODING.__dict__, "current": VALLEY_RULE.__dict__}, "limit": a.limit})
        _print_dups(tally, a.given)
        print(f"-> {f}")
    elif a.cmd == "design":
        _design(a.limit)
    elif a.cmd == "ruler":
        from allmil_cli.train.counting_ruler import _print_ruler, ruler_sets, run_ruler

        sets = ruler_sets(a.design)
        if a.limit:
            sets = {k: v[: a.limit] for k, v in sets.items()}
        res = run_ruler(sets)
        f = _save(a.out or ("ruler_design.json" if a.design else "ruler.json"), res)
        _print_ruler(res)
        print(f"-> {f}")
    elif a.cmd == "floor":
        import torch

        from allmil_cli.train.counting_ruler import _print_floor, run_floor

        torch.set_num_threads(1)
        from allmil_cli.train.counting_ruler import FLOOR_SIZES

        qualities = tuple(q or None for q in a.qualities) if a.qualities else QUALITIES
        res = run_floor(a.recipe, sizes=tuple(a.sizes or FLOOR_SIZES), limit=a.limit, qualities=qualities)
        name = a.out or ("floor.json" if not a.limit else "floor_limit.json")
        f = _save(name, {"recipe": a.recipe, "by_shift": res})
        _print_floor(res)
        print(f"-> {f}")
    elif a.cmd == "table":
        obj = json.loads(Path(a.file).read_text())
        if "tally" in obj:
            _print_dups(obj["tally"], True)
            for src in ("ALL-IDB1", "BCCD", "PBC"):
                print(f"\n{src}\n" + "\n".join(three_way_table(obj["tally"], src)))
        else:
            from allmil_cli.train.counting_ruler import _print_ruler

            _print_ruler(obj)
    return 0


def _detector_for(case: Case, folds: Path | None, detector: Path | None) -> Path:
    """``dups --folds``: ALL-IDB1 fields take the fold model of that folder; ``--detector``: BCCD and PBC take it."""
    if case.source == "ALL-IDB1":
        return folds / case.detector.name if folds else case.detector
    return detector or case.detector


def _print_dups(tally: dict, given: bool) -> None:
    for src in ("ALL-IDB1", "BCCD", "PBC"):
        if not any(k.startswith(src + "|") for k in tally):
            continue
        if given:
            print(f"\n{src}: before = ruler and decoding before this change; after = both now")
            print("\n".join(dup_table(tally, src, "auto", before_ruler="before")))
            print(f"\n{src}: the ruler now, decoding before -> now")
            print("\n".join(dup_table(tally, src, "auto")))
            print(f"\n{src}: the known size given (--cell-size), decoding before -> now")
            print("\n".join(dup_table(tally, src, "given")))
        else:
            print(f"\n{src}, the ruler now, decoding before -> now")
            print("\n".join(dup_table(tally, src, "auto")))


def design_sweep() -> dict[str, Decoding]:
    """The decoding settings compared on the design fields."""
    out = {"radius": RADIUS_ONLY, "radius0.7": Decoding(0.7, 0.0, 1.0), "radius0.8": Decoding(0.8, 0.0, 1.0)}
    for v in (0.5, 0.6, 0.7, 0.8):
        out[f"valley{v}@1.0"] = Decoding(0.6, 1.0, v)
    for near, far, reach in ((0.3, 0.9, 1.0), (0.4, 0.9, 1.0), (0.5, 0.9, 1.0), (0.4, 1.0, 1.0), (0.5, 1.0, 1.0),
                             (0.3, 0.8, 0.9), (0.4, 0.8, 0.9), (0.5, 0.8, 0.9), (0.4, 0.9, 1.1), (0.5, 0.9, 1.1)):
        out[f"valley{near}-{far}@{reach}"] = Decoding(0.6, reach, near, far)
    out["current"] = DECODING
    return out


def _design(limit: int | None) -> None:
    cases = bccd_cases("trainval")[::2] + pbc_cases("design")
    if all((FOLD_DIR / f"detector_fold{k}.onnx").exists() for k in range(5)):
        cases += idb1_cases("train")
    if limit:
        cases = cases[:limit]
    sweep = design_sweep()
    pairs: list = []
    tally = run(cases, decodings=sweep, pairs=pairs)
    _save("design.json", {"tally": tally, "sweep": {k: v.__dict__ for k, v in sweep.items()}, "pairs": pairs})
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
