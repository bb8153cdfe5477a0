"""White-blood-cell detector: training, ONNX export and evaluation (CenterNet-style centre heatmap).

The detector is trained in three stages, one module each (data flows one way, labels -> model -> eval):

* :mod:`allmil_cli.train.detector_labels`: white-cell labels (BCCD boxes; ALL-IDB1 blasts and the
  nucleus-stain rule that tells normal white cells from platelets), ignore masks, the training cache
  ``.cache/detector_v2/``;
* :mod:`allmil_cli.train.detector_model`: the network (MobileNetV2 trunk + stride-4 centre heatmap),
  training crops, targets, focal loss, training, ONNX export, the shipped model (``weights/detector.onnx``);
* :mod:`allmil_cli.train.detector_eval`: held-out ALL-IDB1 recall (5-fold models in ``.cache/folds/``),
  threshold choice, BCCD test AP50, the full reproduction.

This module is the command line and keeps the names other modules import from it
(``from allmil_cli.train.detector import idb1_labels``).

CLI: ``python -m allmil_cli.train.detector {all,kfold,final,bccd,summary,reeval,labels} --help``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from allmil_cli.train.detector_eval import (
    FOLD_DIR,
    _hits,
    _iou,
    _voc_ap,
    choose_threshold,
    eval_idb1,
    evaluate,
    kfold,
    pbc_design_samples,
    reeval_folds,
    reproduce,
    stain_box_size,
    summarize_folds,
)
from allmil_cli.train.detector_labels import (
    CACHE_DIR,
    CACHE_RBC_PX,
    DROP_AREA,
    KEEP_AREA,
    KEEP_DISC,
    MATCH_RBC,
    REPO,
    STAIN_THRESHOLD,
    Sample,
    _blob_area_at,
    _ignore_mask,
    _rescale,
    _stain_blobs,
    _stain_mask,
    build_cache,
    idb1_labels,
    label_counts,
    load_samples,
)
from allmil_cli.train.detector_model import (
    CANONICAL_RBC_PX,
    CROP,
    DEFAULT_THRESHOLD,
    SCALE_AUG,
    SIGMA_WBC,
    STRIDE,
    WEIGHTS,
    _colour_jitter,
    _sample_crop,
    _session,
    _targets,
    build_model,
    export_onnx,
    final,
    focal_loss,
    ort_vs_torch,
    set_threshold,
    train,
)

#: re-exported for importers of this module (allmil_cli.train.cells, allmil_cli.train.magnification, tests)
__all__ = [
    "CACHE_DIR", "CACHE_RBC_PX", "CANONICAL_RBC_PX", "CROP", "DEFAULT_THRESHOLD", "DROP_AREA", "FOLD_DIR",
    "KEEP_AREA", "KEEP_DISC", "MATCH_RBC", "REPO", "SCALE_AUG", "SIGMA_WBC", "STAIN_THRESHOLD", "STRIDE",
    "WEIGHTS", "Sample", "_blob_area_at", "_colour_jitter", "_hits", "_ignore_mask", "_iou", "_rescale",
    "_sample_crop", "_session", "_stain_blobs", "_stain_mask", "_targets", "_voc_ap", "build_cache",
    "build_model", "choose_threshold", "eval_idb1", "evaluate", "export_onnx", "final", "focal_loss",
    "idb1_labels", "kfold", "label_counts", "load_samples", "main", "ort_vs_torch", "reeval_folds",
    "reproduce", "set_threshold", "stain_box_size", "summarize_folds", "train",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m allmil_cli.train.detector", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("all", "kfold", "final"):
        p = sub.add_parser(name, help={"all": "cache + 5 folds + final + BCCD AP50 (the full reproduction)",
                                       "kfold": "5-fold ALL-IDB1 models -> .cache/folds/", "final": "shipped model"}[name])
        p.add_argument("--iters", type=int, default=250)
        p.add_argument("--batch", type=int, default=12)
        if name in ("kfold", "final"):
            p.add_argument("--shifts", action="store_true",
                           help="train with protocol 3's shift family (resolution, JPEG, blur, stain) on 60 %% of crops")
            p.add_argument("--pbc", action="store_true",
                           help="add the PBC design half (one centred white cell per image) for 15 %% of the crops")
        if name == "kfold":
            p.add_argument("--folds", type=int, nargs="*", default=None)
            p.add_argument("--out-dir", type=Path, default=FOLD_DIR, help="default: .cache/folds")
            p.add_argument("--seed", type=int, default=0, help="added to each fold's seed (the fold number)")
        if name == "final":
            p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
        if name == "all":
            p.add_argument("--threshold", type=float, default=None, help="default: chosen on the k-fold results")
    p = sub.add_parser("bccd", help="BCCD test AP50 of an ONNX model")
    p.add_argument("--onnx", type=Path, default=WEIGHTS)
    p = sub.add_parser("summary", help="pooled k-fold numbers from .cache/folds/*.json")
    sub.add_parser("reeval", help="re-evaluate the existing fold models (no training) -> .cache/folds/*.json")
    sub.add_parser("labels", help="build the cache and print the ALL-IDB1 label counts")
    a = ap.parse_args(argv)
    if a.cmd == "labels":
        print(json.dumps(label_counts()))
    elif a.cmd == "kfold":
        kfold(iters=a.iters, batch=a.batch, folds=a.folds, shifts=a.shifts, out_dir=a.out_dir, pbc=a.pbc,
              seed=a.seed)
        print(json.dumps(summarize_folds(fold_dir=a.out_dir), indent=1))
    elif a.cmd == "final":
        final(iters=a.iters, batch=a.batch, threshold=a.threshold, shifts=a.shifts,
              extra=pbc_design_samples() if a.pbc else None)
        print(json.dumps(evaluate(WEIGHTS), indent=1))
    elif a.cmd == "bccd":
        print(json.dumps(evaluate(a.onnx), indent=1))
    elif a.cmd == "reeval":
        print(json.dumps(reeval_folds(), indent=1))
    elif a.cmd == "summary":
        print(json.dumps(summarize_folds(), indent=1))
    elif a.cmd == "all":
        reproduce(iters=a.iters, batch=a.batch, threshold=a.threshold)
    return 0


if __name__ == "__main__":
    sys.exit(main())
