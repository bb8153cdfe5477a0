"""Embedder ablation by cost and quality: input size (224 / 160 / 128 px of the same 3-red-cell window) and trunk.

Every variant is trained with the shipped recipe (``v2pbc``: the same cells, the same augmented views, the same
stain normalisation) on protocol 2's folds; only the embedder's input changes:

* ``in224``: today's embedder (frozen ImageNet MobileNetV2, centre pooling): the baseline, whose held-out scores are
  ``.cache/protocol4/heldout_v2pbc.npz``;
* ``in160`` / ``in128``: every (stain-mapped) 224 view resized to 160 / 128 px (``features.resize_views``) before the
  same trunk; the centre pooling takes the central 3x3 of the 5x5 map (160) and the central 2x2 of the 4x4 map (128);
* ``lite0``: frozen ImageNet EfficientNet-Lite0 at 224 (centre pooling, 7x7 map).

Commands (each heavy: run them under ``flock /tmp/allmil-heavy.lock``)::

    python -m allmil_cli.train.embedder_ablation features in160 in128   # one pass over the fields for both sizes
    python -m allmil_cli.train.heldout --variant in160                 # 5 fold models + held-out scores
    python -m allmil_cli.train.protocol4 --variant in160 --legacy-reps 0   # (and without --variant: the baseline)
    python bench/bench_embedder.py                                     # ms/crop of each variant's ONNX, alternated
    python -m allmil_cli.train.embedder_ablation summary               # the table of docs/embedder_ablation.md

The fold models of a variant are cached under ``.cache/cells/models`` with the input size in their key, so they never
collide with the shipped recipe's. Nothing here ships a model.
"""

from __future__ import annotations

import argparse
import json
import time
import zlib
from pathlib import Path

import numpy as np

from allmil_cli.stages.crops import CROP_SIZE
from allmil_cli.train.inventory import CACHE, PBC_TRAIN, REPO, inventory, pbc_cells
from allmil_cli.train.variants import BASELINE, VARIANTS, VariantProtocol2, protocol2_for, variant  # noqa: F401 (re-exported)

OUT = REPO / ".cache" / "protocol4"
CELLS_PER_FIELD = 12.4  # ALL-IDB1 2592x1944 fields (bench_budget.py)


# ------------------------------------------------------------------------------------------- features, one pass
def build_features(names: list[str], recipe: str = "v2pbc", max_minutes: float | None = None) -> bool:
    """The feature caches of several variants in one pass over the fields: each field's views (exactly those of
    ``features.feature_cache``: same cells, same seeded generator) are made once and go through every variant's
    trunk at its input size. Training cells (the recipe's views) and the held-out extra cells (view 0 only).

    Resumable: progress is saved every few minutes (``<cache>.partial.npz``; every field's views depend only on its
    own seeded generator, so a resumed pass gives the same bytes); ``max_minutes`` stops after that long (the
    partial file kept) so the cold pass can run in slices on a shared machine. True when every cache is done."""
    from dataclasses import replace

    from allmil_cli.train.augment import RECIPES, recipe_views
    from allmil_cli.train.backbones import build_backbone, feature_dim
    from allmil_cli.train.data import load_rgb
    from allmil_cli.train.features import backbone_features, blank_crop, cache_file, resize_views
    from allmil_cli.train.heldout import extra_cells

    start = time.time()
    rec = RECIPES[recipe]
    train = inventory() + (pbc_cells(per_type=PBC_TRAIN) if rec.pbc else [])
    extra = extra_cells()[0]
    for cells, r, tag in ((train, rec, ""), (extra, replace(rec, n_aug=0), "_heldout")):
        keys = [c.key for c in cells]
        todo = []
        for name in names:
            backbone, size = variant(name)
            f = cache_file(backbone, r.n_aug, tag, r, size)
            if f.exists() and list(np.load(f, allow_pickle=False)["keys"]) == keys:
                print(f"{f.name}: cached", flush=True)
                continue
            todo.append((name, backbone, size, f))
        if not todo:
            continue
        nets = {(b, s): build_backbone(b) for _, b, s, _ in todo}
        feats = {(b, s): np.zeros((len(cells), 1 + r.n_aug, feature_dim(b)), np.float16) for _, b, s, _ in todo}
        ready = np.ones(len(cells), bool)
        for _, b, s, f in todo:
            part = f.with_suffix(".partial.npz")
            z = np.load(part, allow_pickle=False) if part.exists() else None
            if z is not None and list(z["keys"]) == keys:
                feats[(b, s)][:] = z["feats"]
                ready &= z["done"]
            else:
                ready[:] = False

        def save_partial() -> None:
            CACHE.mkdir(parents=True, exist_ok=True)
            for _, b, s, f in todo:
                np.savez(f.with_suffix(".partial.npz"), keys=np.array(keys), feats=feats[(b, s)], done=ready)

        order: dict[str, list[int]] = {}
        for i, c in enumerate(cells):
            if not ready[i]:
                order.setdefault(c.path, []).append(i)
        t0, done, saved = time.time(), int(ready.sum()), time.time()
        for path, idx in order.items():
            if max_minutes is not None and time.time() - start > 60 * max_minutes:
                save_partial()
                print(f"stopped after {max_minutes} min at {done}/{len(cells)} cells{tag}; run again to go on", flush=True)
                return False
            rgb = load_rgb(Path(path))
            rng = np.random.default_rng(zlib.crc32(path.encode()))
            views = recipe_views(rgb, [cells[i] for i in idx], r, rng).reshape(-1, CROP_SIZE, CROP_SIZE, 3)
            for (b, s), net in nets.items():
                fv = backbone_features(net, resize_views(views, s))
                feats[(b, s)][idx] = fv.reshape(len(idx), 1 + r.n_aug, -1).astype(np.float16)
            ready[idx] = True
            done += len(idx)
            if time.time() - saved > 300:
                save_partial()
                saved = time.time()
            if done // 200 != (done - len(idx)) // 200:
                print(f"  features {'+'.join(n for n, *_ in todo)}{tag}: {done}/{len(cells)} cells, {time.time() - t0:.0f}s", flush=True)
        CACHE.mkdir(parents=True, exist_ok=True)
        for name, b, s, f in todo:
            blank = backbone_features(nets[(b, s)], resize_views(blank_crop(), s))[0].astype(np.float32)
            np.savez(f, keys=np.array(keys), feats=feats[(b, s)], blank=blank)
            f.with_suffix(".partial.npz").unlink(missing_ok=True)
            print(f"wrote {f} ({time.time() - t0:.0f}s)", flush=True)
    return True


# ------------------------------------------------------------------------------------------------ quality table
def roc_auc_score(y: np.ndarray, s: np.ndarray) -> float:
    """ROC AUC (Mann-Whitney U, ties counted half)."""
    from scipy.stats import rankdata

    y = np.asarray(y, bool)
    r = rankdata(s)
    n1, n0 = int(y.sum()), int((~y).sum())
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def cell_metrics(recipe: str = "v2pbc", name: str | None = None) -> dict:
    """Protocol-2 held-out cell metrics of a variant: ROC AUC (ALL-IDB blasts vs every held-out normal white cell of
    healthy context: ALL-IDB normal cells of healthy fields, PBC, BCCD; and vs ALL-IDB normal cells only), and, at each
    fold's cell threshold fitted by ``rule.fit_rule`` on the other folds' held-out cells, the pooled blast recall
    and flag rate of every normal class (judged on the held-out fold only)."""
    from allmil_cli.train.heldout import K, load, split
    from allmil_cli.train.rule import fit_rule

    d = load(recipe, None if name in (None, BASELINE) else name)
    g = d["group"].astype(str)
    s = d["score"].astype(np.float64)
    oof = np.zeros(len(g), bool)
    flags = np.zeros(len(g), bool)
    thresholds = []
    for k in range(K):
        test, fit_mask = split(d, k)
        fit = fit_rule(s[fit_mask], g[fit_mask])
        thresholds.append(fit.cell_threshold)
        flags[test] = s[test] >= fit.cell_threshold
        oof |= test
    blast = oof & (g == "idb_blast")
    normal = oof & (g != "idb_blast") & (g != "idb_normal_in_all")
    idb = oof & (g == "idb_normal")
    rates = {c: float(flags[oof & (g == c)].mean()) for c in sorted(set(g[oof].tolist())) if c != "idb_blast"}
    counts = {c: int((oof & (g == c)).sum()) for c in rates}
    benign = {c: v for c, v in rates.items() if c != "idb_normal_in_all"}
    worst = max(benign, key=benign.get)
    return {
        "auc_all_normals": float(roc_auc_score(np.r_[np.ones(blast.sum()), np.zeros(normal.sum())], np.r_[s[blast], s[normal]])),
        "auc_idb": float(roc_auc_score(np.r_[np.ones(blast.sum()), np.zeros(idb.sum())], np.r_[s[blast], s[idb]])),
        "blast_recall": float(flags[blast].mean()), "n_blast": int(blast.sum()), "thresholds": thresholds,
        "rates": rates, "counts": counts, "worst_class": worst, "worst_rate": benign[worst],
    }


def summary(recipe: str = "v2pbc") -> str:
    cost_f = OUT / "embedder_cost.json"
    cost = json.loads(cost_f.read_text()) if cost_f.exists() else {}
    rows = ["| variant | input | M mult-adds | ms/crop (1 thread) | ms/field (12.4 cells) | cell AUC (all normals / ALL-IDB normals) "
            "| blast recall at the fitted threshold | worst normal class flag rate | protocol-4 targets met | missed (measured) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    out = {}
    for name, (backbone, size) in VARIANTS.items():
        c = cost.get("variants", {}).get(name)
        cs = (f"{c['mmac']:.0f} | {c['ms_crop']:.2f} | {c['ms_crop'] * CELLS_PER_FIELD:.0f}" if c else "- | - | -")
        try:
            m = cell_metrics(recipe, name)
        except SystemExit:
            rows.append(f"| {name} | {backbone} {size} | {cs} | not run | | | | |")
            continue
        from allmil_cli.train.protocol4 import run, targets

        # protocol 4 on the variant's held-out file (rule fitted per fold on the other folds; the old-rule rows skipped)
        t = [list(x) for x in targets(run(legacy_reps=0, recipe=recipe, variant=None if name == BASELINE else name))]
        met = f"{sum(ok for _, ok, _ in t)}/{len(t)}" if t else "not run"
        missed = "; ".join(f"{n}: {txt}" for n, ok, txt in t if not ok) if t else ""
        rows.append(f"| {name} | {backbone} {size} | {cs} | {m['auc_all_normals']:.4f} / {m['auc_idb']:.4f} | "
                    f"{100 * m['blast_recall']:.1f} % (n={m['n_blast']}) | {m['worst_class']} {100 * m['worst_rate']:.1f} % | {met} | {missed} |")
        out[name] = {"cells": m, "targets": t, "cost": c}
    (OUT / "embedder_ablation.json").write_text(json.dumps(out, indent=1))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m allmil_cli.train.embedder_ablation", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("features", help="feature caches of the variants (one pass over the fields)")
    f.add_argument("variants", nargs="+", choices=sorted(VARIANTS))
    f.add_argument("--recipe", default="v2pbc")
    f.add_argument("--max-minutes", type=float, default=None, help="stop after this long, progress kept (run again to go on)")
    s = sub.add_parser("summary", help="the table (needs the held-out files, targets and embedder_cost.json)")
    s.add_argument("--recipe", default="v2pbc")
    a = ap.parse_args(argv)
    if a.cmd == "features":
        raise SystemExit(0 if build_features(a.variants, a.recipe, a.max_minutes) else 3)
    else:
        print(summary(a.recipe))


if __name__ == "__main__":
    main()
