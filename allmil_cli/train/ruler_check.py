"""Does a cheaper red-cell ruler change the calls? Protocol 3 with the exact thumbnail and with a box-reduced one.

The ruler (:mod:`allmil_cli.scale`) measures red cells on a 512-px thumbnail made by one full antialiased
resize (``THUMB_REDUCING_GAP = None``). A Pillow ``reducing_gap`` makes the thumbnail 3x cheaper but moves the
ruler on some fields, and with it the detector input, the crops and the calls. This runs the held-out protocol-3
fields (protocol 2's folds, each through its fold models and the product path) twice, exact and with
``--gap``, and prints per shift: sensitivity / specificity / AUC at the fixed patient threshold 0.5 both ways,
the patient calls that flip (at 0.5 and at the shipped threshold), and how far p_all moves.

``python -m allmil_cli.train.ruler_check --gap 1.5 --recipe v2pbc --shifts none res14+jpeg70 blur`` (about
40 s per shift and gap on 2 cores). Nothing is written: the numbers are for the record (issue 8).
"""

from __future__ import annotations

import argparse

import numpy as np

from allmil_cli import scale
from allmil_cli.train.augment import RECIPES
from allmil_cli.train.protocol3 import PATIENT_THRESHOLD, run_fields, shipped_patient_threshold, summarise
from allmil_cli.train.shifts import PROTOCOL3


def compare(gap: float, recipe: str, shift_names: list[str]) -> dict[str, dict]:
    """Per shift: the metrics with the exact ruler and with ``gap``, and the calls that differ."""
    shifts = [s for s in PROTOCOL3 if s.name in shift_names]
    runs = {}
    saved = scale.THUMB_REDUCING_GAP
    try:
        for g in (None, gap):
            scale.THUMB_REDUCING_GAP = g
            runs[g] = run_fields([recipe], shifts=shifts, verbose=False)[recipe]
    finally:
        scale.THUMB_REDUCING_GAP = saved
    shipped = shipped_patient_threshold()
    out = {}
    for s in shifts:
        a, b = runs[None][s.name], runs[gap][s.name]
        pa, pb, y = np.asarray(a["p"]), np.asarray(b["p"]), np.asarray(a["y"])
        out[s.name] = {
            "exact": summarise(a), "reduced": summarise(b),
            "flips_0.5": int(((pa >= PATIENT_THRESHOLD) != (pb >= PATIENT_THRESHOLD)).sum()),
            "flips_shipped": int(((pa >= shipped) != (pb >= shipped)).sum()),
            "all_patients_flipped_shipped": int((((pa >= shipped) != (pb >= shipped)) & (y == 1)).sum()),
            "max_dp": float(np.abs(pa - pb).max()), "fields_with_other_cells": int((np.asarray(a["n_cells"]) != np.asarray(b["n_cells"])).sum()),
            "n": len(y),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m allmil_cli.train.ruler_check", description=__doc__.split("\n")[0])
    ap.add_argument("--gap", type=float, default=1.5, help="Pillow reducing_gap of the cheaper thumbnail (>= 1.0)")
    ap.add_argument("--recipe", default="v2pbc", choices=sorted(RECIPES))
    ap.add_argument("--shifts", nargs="+", default=["none", "res20+jpeg70", "res14+jpeg70", "hue+20", "blur"],
                    choices=[s.name for s in PROTOCOL3])
    a = ap.parse_args(argv)
    for name, r in compare(a.gap, a.recipe, a.shifts).items():
        e, g = r["exact"], r["reduced"]
        print(f"{name:22s} sens/spec/AUC exact {100 * e['sensitivity']:.1f}/{100 * e['specificity']:.1f}/{e['auc']:.3f}, "
              f"gap {a.gap}: {100 * g['sensitivity']:.1f}/{100 * g['specificity']:.1f}/{g['auc']:.3f}; calls flipped "
              f"{r['flips_0.5']}/{r['n']} at 0.5, {r['flips_shipped']}/{r['n']} at the shipped threshold "
              f"({r['all_patients_flipped_shipped']} of them ALL patients); max |dp| {r['max_dp']:.3f}; "
              f"{r['fields_with_other_cells']} fields found other cells")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
