"""Counting twin detections once: two detections closer than a white cell, neither blast-like, are one cell.

The detector's decoding keeps two heatmap maxima 0.6 red cell apart or more: two lobes of a granulocyte give two, and
so do two touching blasts (``docs/detector_results.md``, section 5; no heatmap rule tells them apart without merging
touching blasts). The blast count does not need them told apart where neither cell is blast-like: merging such a pair
never removes a blast-like cell, so the numerator of the blast percentage cannot fall, and the denominator loses the
duplicate. :mod:`allmil_cli.stages.count` does this in the patient stage; this module measures it.

``python -m allmil_cli.train.counting_once collect --set design|heldout``: every field resized to each red-cell size
(as :mod:`allmil_cli.train.counting`, with and without JPEG 70) goes through the product path: ruler, detector (every
detection's nearest stronger neighbour within 1.3 red cells, its distance and the lowest heatmap between them),
crops, embedder, cell scores. Ground truth as in :mod:`allmil_cli.train.counting`. Sets:

* ``design`` (where the rule's constants are chosen): BCCD train+val (every 2nd), the PBC design half, and ALL-IDB1
  fields each seen by the next fold's models, which trained on it;
* ``heldout`` (where they are judged): BCCD test and the PBC report half with the shipped models, ALL-IDB1 fields
  each with the models of the protocol-2 fold that never saw it (recipe ``v2pbc``: ``protocol3.fold_pipelines``).

``... table FILE [--dist D --valley V] [--sweep]``: duplicates, white cells and blasts found, blast-like cells, as
detected and after counting once (the shipped twins, or a rule applied to the recorded neighbours), per size;
``--sweep``: count errors per setting (the design comparison). Results in ``.cache/counting/once_*.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from allmil_cli.stages.count import count_once
from allmil_cli.stages.crops import crop_cells
from allmil_cli.stages.detect import Decoding, _ridge, heatmap_detections, model_meta, prepare_input
from allmil_cli.stages.scale import measure_field
from allmil_cli.train.counting_fields import (
    DUP_RBC,
    FULL,
    MATCH_RBC,
    QUALITIES,
    SIZES,
    Case,
    bccd_cases,
    idb1_cases,
    load_rgb,
    pbc_cases,
    resize_to,
)
from allmil_cli.train.pbc_split import OUT

MAX_TWIN_RBC = 1.3


def _pipelines() -> tuple[object, list[object]]:
    from allmil_cli.pipeline import Pipeline
    from allmil_cli.stages.models import load_models
    from allmil_cli.train.inventory import WEIGHTS
    from allmil_cli.train.protocol3 import fold_pipelines

    return Pipeline(load_models(WEIGHTS, device="cpu", threads=1)), fold_pipelines("v2pbc")


def cases_for(which: str) -> list[Case]:
    if which == "design":
        return bccd_cases("trainval")[::2] + pbc_cases("design") + idb1_cases("train")
    return bccd_cases("test") + pbc_cases("report") + idb1_cases("heldout")


def field_records(pl, img: np.ndarray, case: Case, f: float) -> dict:
    """One resized field through the product path: per detection (score, blast score, nearest stronger neighbour,
    its distance in red cells at the detector's scale, lowest heatmap between / own score, owning ground-truth cell
    within DUP_RBC, ground-truth cells within MATCH_RBC)."""
    sess = pl.models.detector
    meta = model_meta(sess)
    stats = measure_field(img)
    x, sx, sy = prepare_input(img, stats.rbc_px, meta["canonical_rbc_px"])
    heat = sess.run(None, {sess.get_inputs()[0].name: x})[0][0, 0]
    h, w = img.shape[:2]
    dets = heatmap_detections(heat, meta, None, w, h, sx, sy, decoding=Decoding(twin_dist_rbc=MAX_TWIN_RBC))
    product = [d.same_as for d in heatmap_detections(heat, meta, None, w, h, sx, sy)]  # the shipped decoding's twins
    xy = np.asarray([(d.x, d.y) for d in dets], np.float64).reshape(-1, 2)
    if len(dets):
        crops = pl.embedder.normalise(crop_cells(img, xy, stats.rbc_px), stats)
        blast = pl.aggregator.cell_scores(pl.embedder.embed(crops))
    else:
        blast = np.zeros(0)
    cells, blasts, rbc = case.cells * f, case.blasts * f, case.rbc * f
    st = meta["stride"]
    rows = []
    for i, d in enumerate(dets):
        j = d.same_as
        dist = ridge = -1.0
        if j >= 0:
            dist = float(np.hypot(d.x - dets[j].x, d.y - dets[j].y)) / stats.rbc_px
            ridge = _ridge(heat, dets[j].x * sx / st, dets[j].y * sy / st, d.x * sx / st, d.y * sy / st) / max(d.score, 1e-6)
        own, near = -1, []
        if len(cells):
            dd = np.hypot(cells[:, 0] - d.x, cells[:, 1] - d.y)
            if dd.min() <= DUP_RBC * rbc:
                own = int(dd.argmin())
            near = [int(k) for k in np.nonzero(dd <= MATCH_RBC * rbc)[0]]
        rows.append([round(d.score, 4), round(float(blast[i]), 5), j, round(dist, 3), round(float(ridge), 3), own, near,
                     product[i]])
    return {"dets": rows, "n_cells": len(cells), "n_blasts": len(blasts), "rbc_px": stats.rbc_px}


def collect(which: str, limit: int | None = None, verbose: bool = True) -> dict:
    shipped, folds = _pipelines()
    cases = cases_for(which)
    if limit:
        cases = [c for src in ("BCCD", "PBC", "ALL-IDB1") for c in [c for c in cases if c.source == src][:limit]]
    out: dict[str, list] = {}
    t0 = time.time()
    for i, case in enumerate(cases):
        pl = folds[int(case.detector.stem[-1])] if case.source == "ALL-IDB1" else shipped
        rgb = load_rgb(case.path)
        for size in (FULL,) + SIZES:
            for q in QUALITIES:
                img, f = resize_to(rgb, case.rbc, size, q)
                rec = field_records(pl, img, case, f)
                rec["name"] = case.name
                out.setdefault(f"{case.source}|{size:g}|{q or 0}", []).append(rec)
        if verbose and (i + 1) % 20 == 0:
            print(f"  {which}: {i + 1}/{len(cases)} fields, {time.time() - t0:.0f}s", flush=True)
    return out


# ------------------------------------------------------------------------------------------- the rule, offline
def merged_mask(dets: list, dist: float | None, valley: float | None, threshold: float) -> np.ndarray:
    """Which detections are counted with their stronger twin (:func:`allmil_cli.stages.count.count_once`): ``dist``
    None: the twins of the shipped decoding, as recorded; else the rule on the recorded nearest stronger neighbour
    (closer than ``dist`` red cells, heatmap never below ``valley`` x own score between them when ``valley`` is set)."""
    if dist is None:
        if dets and len(dets[0]) < 8:
            raise SystemExit("these records predate the shipped twins: collect them again, or pass --dist and --valley")
        twins = [d[7] for d in dets]
    else:
        twins = [j if j >= 0 and d < dist and (valley is None or r >= valley) else -1 for _, _, j, d, r, *_ in dets]
    return count_once(["field"] * len(dets), twins, np.asarray([d[1] for d in dets]) >= threshold)


def tally(recs: list[dict], dist: float | None, valley: float | None, threshold: float, blasts_by_field: list | None = None) -> dict:
    t = {"det": 0, "dup": 0, "cells": 0, "found": 0, "blast_like": 0, "blasts": 0, "blasts_found": 0, "merged": 0,
         "merged_lost": 0}
    for rec in recs:
        dets = rec["dets"]
        drop = np.zeros(len(dets), bool) if dist == 0 else merged_mask(dets, dist, valley, threshold)
        kept = [d for d, x in zip(dets, drop) if not x]
        t["det"] += len(kept)
        t["merged"] += int(drop.sum())
        owners = [d[5] for d in kept if d[5] >= 0]
        t["dup"] += len(owners) - len(set(owners))
        found = {k for d in kept for k in d[6]}
        t["cells"] += rec["n_cells"]
        t["found"] += len(found)
        # blasts come first among the ground-truth cells (counting_fields: blasts, then normals)
        t["blasts"] += rec["n_blasts"]
        t["blasts_found"] += len({k for k in found if k < rec["n_blasts"]})
        t["blast_like"] += sum(1 for d in kept if d[1] >= threshold)
        # a merged detection whose cell no kept detection finds: a real cell lost to the merge
        all_found = {k for d in dets for k in d[6]}
        t["merged_lost"] += len(all_found - found)
    return t


def _pct(a: int, b: int) -> str:
    return "-" if not b else f"{100.0 * a / b:.1f}"


def table(data: dict, dist: float | None, valley: float | None, threshold: float) -> list[str]:
    """Per source and size: as detected -> counted once (``dist`` None: the shipped decoding's twins, as recorded)."""
    from allmil_cli.stages.detect import DECODING

    rule = (f"the shipped twins: closer than {DECODING.twin_dist_rbc:g} red cell, heatmap >= {DECODING.twin_valley:g} x between"
            if dist is None else f"twins closer than {dist:g} red cell{'' if valley is None else f', heatmap >= {valley:g} x between'}")
    lines = []
    for src in ("ALL-IDB1", "BCCD", "PBC"):
        what = "blasts" if src == "ALL-IDB1" else "white cells"
        lines += ["", f"{src}: detections, duplicates % and {what} found %, as detected -> counted once "
                  f"({rule}, neither blast-like at {threshold:g}); cells lost to a merge; blast-like cells",
                  f"| red cells (px) | JPEG | detections | duplicates % | {what} found % | cells lost | blast-like |",
                  "|---|---|---|---|---|---|---|"]
        for size in (FULL,) + SIZES:
            for q in QUALITIES:
                recs = data.get(f"{src}|{size:g}|{q or 0}")
                if not recs:
                    continue
                a, b = tally(recs, 0, None, threshold), tally(recs, dist, valley, threshold)
                fa, fb = (("blasts_found", "blasts") if src == "ALL-IDB1" else ("found", "cells"))
                lines.append(f"| {'full size' if size == FULL else f'{size:g}'} | {q or '-'} | {a['det']} -> {b['det']} | "
                             f"{_pct(a['dup'], a['det'])} -> **{_pct(b['dup'], b['det'])}** | {_pct(a[fa], a[fb])} -> "
                             f"**{_pct(b[fa], b[fb])}** | {b['merged_lost']} | {a['blast_like']} -> {b['blast_like']} |")
    return lines


def sweep(data: dict, threshold: float) -> list[str]:
    """Design: per setting, duplicates and cells lost summed over every size and JPEG setting, per source."""
    lines = ["| twin distance (red cells) | valley | " + " | ".join(f"{s}: duplicates / merged / cells lost" for s in
                                                                    ("ALL-IDB1", "BCCD", "PBC"))
             + " | count errors (duplicates + cells lost) |", "|---|---|---|---|---|---|"]
    settings = [(0, None)] + [(d, v) for d in (0.8, 0.9, 1.0, 1.1, 1.2) for v in (None, 0.3, 0.5)]
    for dist, valley in settings:
        row, errors = [], 0
        for src in ("ALL-IDB1", "BCCD", "PBC"):
            recs = [r for k, v in data.items() if k.startswith(src + "|") for r in v]
            t = tally(recs, dist, valley, threshold)
            row.append(f"{t['dup']} / {t['merged']} / {t['merged_lost']} (of {t['det']})")
            errors += t["dup"] + t["merged_lost"]
        lines.append(f"| {dist if dist else 'off'} | {valley if valley is not None else '-'} | " + " | ".join(row) + f" | {errors} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m allmil_cli.train.counting_once", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("collect")
    p.add_argument("--set", choices=["design", "heldout"], required=True)
    p.add_argument("--limit", type=int, default=None, help="first N fields per source (a quick look; not a result)")
    p = sub.add_parser("table")
    p.add_argument("file", type=Path)
    p.add_argument("--dist", type=float, default=None, help="twin distance (red cells) of the rule to apply to the "
                   "recorded neighbours; default: the twins the shipped decoding found, as recorded")
    p.add_argument("--valley", type=float, default=None)
    p.add_argument("--threshold", type=float, default=None, help="blast-like cell threshold (default: the shipped one)")
    p.add_argument("--sweep", action="store_true", help="the design sweep of settings")
    a = ap.parse_args(argv)
    if a.cmd == "collect":
        import torch

        torch.set_num_threads(1)
        data = collect(a.set, a.limit)
        OUT.mkdir(parents=True, exist_ok=True)
        f = OUT / f"once_{a.set}{'_limit' if a.limit else ''}.json"
        f.write_text(json.dumps(data))
        print(f"-> {f}")
        return 0
    from allmil_cli.train.protocol3 import shipped_cell_threshold

    data = json.loads(a.file.read_text())
    thr = a.threshold if a.threshold is not None else shipped_cell_threshold()
    if a.sweep:
        print("\n".join(sweep(data, thr)))
    print("\n".join(table(data, a.dist, a.valley, thr)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
