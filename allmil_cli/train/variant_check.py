"""Does a cheaper variant of the product path change the calls? Protocol 3, exact path against the variant.

The held-out protocol-3 fields (protocol 2's folds, each field through its own fold models and the product path)
are scored by the exact path and by a variant; printed per shift: sensitivity / specificity / AUC at the fixed
patient threshold 0.5 both ways, the patient calls that flip (at 0.5 and at the shipped threshold), how far p_all
moves, and blast-cell recall / normal cells flagged (cell threshold 0.5). Variants (issue 8, throughput):

- ``int8``: the fold models' detector and embedder replaced by int8 copies (:mod:`allmil_cli.train.quantize`;
  each fold's calibrated on that fold's training fields only). Reported twice: ``embedder`` (the float detector
  finds the cells for both, so only the embeddings differ) and ``both`` (the int8 detector finds its own cells).
- ``ruler --gap G``: the red-cell ruler's thumbnail made with a Pillow ``reducing_gap`` (3x cheaper) instead of
  one full antialiased resize.

``python -m allmil_cli.train.variant_check int8 --recipe v2pbc --shifts none res14+jpeg70 hue+20``
``python -m allmil_cli.train.variant_check ruler --gap 1.5`` (about 40 s per shift and path on 2 cores).
Results go to ``.cache/protocol3/variant_<name>.json``; nothing in the repository changes.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from allmil_cli.stages import scale
from allmil_cli.train.augment import RECIPES
from allmil_cli.train.protocol3 import OUT, PATIENT_THRESHOLD, fold_pipelines, run_fields, shipped_patient_threshold, summarise
from allmil_cli.train.shifts import PROTOCOL3, Shift

DEFAULT_SHIFTS = ["none", "res20+jpeg70", "res14+jpeg70", "hue+20", "blur"]


def compare(a: dict, b: dict) -> dict[str, dict]:
    """Per shift: the metrics of tallies ``a`` (exact) and ``b`` (variant) and the calls that differ."""
    shipped = shipped_patient_threshold()
    out = {}
    for name in a:
        pa, pb, y = np.asarray(a[name]["p"]), np.asarray(b[name]["p"]), np.asarray(a[name]["y"])
        out[name] = {
            "exact": summarise(a[name]), "variant": summarise(b[name]),
            "flips_0.5": int(((pa >= PATIENT_THRESHOLD) != (pb >= PATIENT_THRESHOLD)).sum()),
            "flips_shipped": int(((pa >= shipped) != (pb >= shipped)).sum()),
            "all_patients_flipped_shipped": int((((pa >= shipped) != (pb >= shipped)) & (y == 1)).sum()),
            "max_dp": float(np.abs(pa - pb).max()), "median_dp": float(np.median(np.abs(pa - pb))),
            "fields_with_other_cells": int((np.asarray(a[name]["n_cells"]) != np.asarray(b[name]["n_cells"])).sum()),
            "n": len(y),
        }
    return out


def lines(label: str, result: dict[str, dict]) -> list[str]:
    out = []
    for name, r in result.items():
        e, v = r["exact"], r["variant"]
        out.append(f"{name:14s} {label}: sens/spec/AUC {100 * e['sensitivity']:.1f}/{100 * e['specificity']:.1f}/{e['auc']:.3f} -> "
                   f"{100 * v['sensitivity']:.1f}/{100 * v['specificity']:.1f}/{v['auc']:.3f}; blast recall "
                   f"{100 * e['blast_recall']:.1f} -> {100 * v['blast_recall']:.1f}, normals flagged {100 * e['normals_flagged']:.1f} -> "
                   f"{100 * v['normals_flagged']:.1f}; calls flipped {r['flips_0.5']}/{r['n']} at 0.5, {r['flips_shipped']}/{r['n']} "
                   f"at the shipped threshold ({r['all_patients_flipped_shipped']} of them ALL); |dp| median "
                   f"{r['median_dp']:.4f} max {r['max_dp']:.3f}; {r['fields_with_other_cells']} fields found other cells")
    return out


def int8(recipe: str, shifts: list[Shift], limit: int | None = None) -> dict[str, dict]:
    """Float fold models against their int8 copies: ``embedder`` only (same cells) and ``both`` networks."""
    fp32, q = fold_pipelines(recipe), fold_pipelines(recipe, precision="int8")
    shared = run_fields([recipe], shifts, limit, verbose=False, pipes={"fp32": fp32, "int8_embedder": q})
    own = run_fields([recipe], shifts, limit, verbose=False, pipes={"int8": q})
    return {"embedder": compare(shared["fp32"], shared["int8_embedder"]), "both": compare(shared["fp32"], own["int8"])}


def ruler(gap: float, recipe: str, shifts: list[Shift], limit: int | None = None) -> dict[str, dict]:
    """The exact ruler against a thumbnail made with ``reducing_gap=gap``."""
    runs = {}
    saved = scale.THUMB_REDUCING_GAP
    try:
        for g in (None, gap):
            scale.THUMB_REDUCING_GAP = g
            runs[g] = run_fields([recipe], shifts, limit, verbose=False)[recipe]
    finally:
        scale.THUMB_REDUCING_GAP = saved
    return {f"gap {gap}": compare(runs[None], runs[gap])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m allmil_cli.train.variant_check", description=__doc__.split("\n")[0])
    ap.add_argument("variant", choices=["int8", "ruler"])
    ap.add_argument("--gap", type=float, default=1.5, help="ruler: Pillow reducing_gap of the cheaper thumbnail (>= 1.0)")
    ap.add_argument("--recipe", default="v2pbc", choices=sorted(RECIPES))
    ap.add_argument("--shifts", nargs="+", default=DEFAULT_SHIFTS, choices=[s.name for s in PROTOCOL3])
    ap.add_argument("--limit", type=int, default=None, help="first N fields only (a quick look; not a result)")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    shifts = [s for s in PROTOCOL3 if s.name in a.shifts]
    result = int8(a.recipe, shifts, a.limit) if a.variant == "int8" else ruler(a.gap, a.recipe, shifts, a.limit)
    for label, per in result.items():
        print("\n".join(lines(label, per)))
    if not a.limit:
        OUT.mkdir(parents=True, exist_ok=True)
        name = a.variant if a.variant == "int8" else f"ruler_gap{a.gap}"
        (OUT / f"variant_{name}_{a.recipe}.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
