"""Shipped cell models: embedder (frozen ImageNet CNN + FC256) and LSTM aggregator, trained on all data.

``python -m allmil_cli.train.cells train`` trains on every training cell (``inventory.py``; the recipe's
augmentation in ``augment.py``, cached backbone features in ``features.py``, two-stage training in
``mil.py``) and exports ``weights/embedder.onnx`` + ``weights/aggregator.onnx`` (``export.py``); ``--tiny``
is the CI smoke version. The patient threshold, cell threshold and combine rule come from protocol-2
out-of-fold predictions (``.cache/cells/selection.json``, written by ``python -m allmil_cli.train.evaluate
combine``, run automatically when missing); the patient threshold ships as a logit shift in the aggregator
metadata (``allmil.logit_shift``, applied by ``aggregate.Aggregator``), so the reported ``p_all`` is
thresholded at 0.5 (``allmil.threshold``); the raw value is kept in ``allmil.threshold_raw``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from allmil_cli.stages.crops import crop_cells
from allmil_cli.train.data import load_rgb
from allmil_cli.train.export import _logit, check_onnx, export_onnx
from allmil_cli.train.features import feature_cache
from allmil_cli.stages.normalize import meta_for
from allmil_cli.train.augment import RECIPES, SHIPPED_RECIPE
from allmil_cli.train.inventory import PBC_TRAIN, WEIGHTS, inventory, pbc_cells, tiny_inventory
from allmil_cli.train.mil import TrainConfig, sample_weights, train
from allmil_cli.train.protocol2 import ARGS, selection_path


def train_final(backbone: str = "mobilenet_v2:center", recipe: str = SHIPPED_RECIPE, tiny: bool = False,
                weights_file: str | None = None, threshold: float | None = None, cell_threshold: float | None = None,
                combine: str | None = None, out_dir: Path = WEIGHTS) -> dict:
    """Shipped models: all cells of the recipe (ALL-IDB1 + ALL-IDB2 + BCCD train/val [+ PBC]), then ONNX export + check."""
    import torch

    torch.set_num_threads(1)
    t_start = time.time()
    rec = RECIPES[recipe]
    cfg = TrainConfig()
    tag = ""
    if tiny:  # CI smoke: a handful of cells, 1 augmented view, a few steps
        rec, tag = replace(rec, n_aug=1), "_tiny"
        cells = tiny_inventory()
        cfg = TrainConfig(stage1_steps=5, stage2_steps=5, batch1=8, batch2=4)
    else:
        cells = inventory() + (pbc_cells(per_type=PBC_TRAIN) if rec.pbc else [])
    n_aug = rec.n_aug
    fc = feature_cache(backbone, n_aug, cells, weights_file, tag=tag, recipe=None if rec.name == "v1" else rec)
    labels = np.array([c.label for c in cells])
    head, agg = train(fc["feats"], labels, fc["blank"], cfg, weights=sample_weights(cells, cfg))
    ARGS.update(backbone=backbone, augment=n_aug, recipe=recipe)
    if not tiny and threshold is None and not selection_path().exists():
        # patient threshold / combine rule from protocol-2 out-of-fold predictions (5 fold models)
        from allmil_cli.train import evaluate as ev

        ev.run_combine(argparse.Namespace(what="combine", cells="auto", backbone=backbone, augment=None, recipe=recipe))
    sel = json.loads(selection_path().read_text()) if selection_path().exists() and not tiny else {}
    thr = threshold if threshold is not None else sel.get("threshold", 0.5)
    cthr = cell_threshold if cell_threshold is not None else sel.get("cell_threshold", 0.5)
    comb = combine or sel.get("combine", "max")
    # Operating point: a patient-level calibration applied by ``aggregate.Aggregator`` (logit shift by
    # -logit(thr) per bag), so the reported p_all crosses 0.5 exactly where the raw model crosses the
    # OOF-selected threshold and the product's indeterminate band around 0.5 stays meaningful. The graph
    # and the per-cell scores stay raw; the cell threshold applies to raw cell scores.
    shift = _logit(thr)
    thr_raw = thr
    emb, aggp = export_onnx(backbone, head, agg, out_dir, 0.5, cthr, comb, weights_file,
                            extra_meta={"allmil.shuffles": sel.get("shuffles", 5), "allmil.logit_shift": repr(shift),
                                        "allmil.threshold_raw": repr(thr_raw), "allmil.recipe": rec.name},
                            embedder_meta={**(meta_for() if rec.stain_norm else {}), "allmil.recipe": rec.name})
    # ONNX vs torch on real crops
    rgb_cells = cells[:: max(1, len(cells) // 16)][:16]
    crops = np.concatenate([crop_cells(load_rgb(Path(c.path)), np.array([[c.x, c.y]]), c.rbc_px) for c in rgb_cells])
    chk = check_onnx(emb, aggp, backbone, head, agg, crops, weights_file)
    chk.update({"threshold": 0.5, "threshold_raw": thr_raw, "cell_threshold": cthr, "combine": comb, "n_cells": len(cells),
                "embedder_mb": emb.stat().st_size / 1e6, "aggregator_mb": aggp.stat().st_size / 1e6})
    chk["seconds"] = time.time() - t_start
    print(json.dumps(chk, indent=1))
    if not tiny and out_dir.resolve() == WEIGHTS.resolve():
        from collections import Counter

        from allmil_cli.train.results import save_section

        cnt = Counter((c.kind, c.label) for c in cells)
        txt = f"""## Shipped models (`weights/embedder.onnx`, `weights/aggregator.onnx`)

Command: `python -m allmil_cli.train.cells train --recipe {rec.name}` (backbone `{backbone}`, {n_aug} augmented views/cell;
{chk['seconds'] / 60:.1f} min on this CPU including the feature cache if warm; a cold feature cache adds
~10-15 min; `--tiny` is the CI smoke run). Trained on all data: {len(cells)} cells =
{', '.join(f'{k[0]} label {k[1]}: {v}' for k, v in sorted(cnt.items()))}
(`junk` = platelets / ambiguous stain blobs from ALL-IDB1 `other/`, as non-blasts).
Metadata: threshold 0.5 on the calibrated p_all, cell_threshold {cthr:.4f} (raw cell scores), combine `{comb}`,
5 shuffles, bag size 15, logit_shift {shift:.4f} (= logit({thr_raw:.4f}), the out-of-fold operating point):
`aggregate.Aggregator` shifts each bag's ALL-vs-normal logit by it, so the reported p_all crosses 0.5 where
the raw model crosses {thr_raw:.4f}. The graph itself and the per-cell blast scores are raw.
Sizes: embedder {chk['embedder_mb']:.1f} MB, aggregator {chk['aggregator_mb']:.1f} MB.

ONNX (onnxruntime) vs torch on {chk['n_crops']} real crops: features max abs diff {chk['features_max_abs_diff']:.2e},
p_all max abs diff {chk['p_all_max_abs_diff']:.2e}, patient vector {chk['patient_vector_max_abs_diff']:.2e}.
"""
        save_section("final", txt, chk)
    return chk


def main() -> None:
    ap = argparse.ArgumentParser(description="cell embedder + LSTM aggregator")
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="train the shipped models on all data and export weights/*.onnx")
    t.add_argument("--backbone", default=None, help="name[:pooling], e.g. mobilenet_v2:center (default), resnet50:avg")
    t.add_argument("--backbone-weights", default=None)
    t.add_argument("--recipe", default=SHIPPED_RECIPE, choices=sorted(RECIPES), help="training recipe (train/augment.py RECIPES)")
    t.add_argument("--tiny", action="store_true", help="CI smoke run: 12 cells, 1 view, 5 steps")
    t.add_argument("--out", default=str(WEIGHTS))
    t.add_argument("--threshold", type=float, default=None)
    sub.add_parser("inventory", help="list the training cells")
    a = ap.parse_args()
    if a.cmd == "inventory":
        cells = inventory(refresh=True)
        from collections import Counter

        print(Counter((c.kind, c.label) for c in cells))
        return
    from allmil_cli.train.backbones import DEFAULT_BACKBONE

    train_final(a.backbone or DEFAULT_BACKBONE, a.recipe, a.tiny, a.backbone_weights, a.threshold, out_dir=Path(a.out))


if __name__ == "__main__":
    main()
