"""Held-out cells of every protocol-2 fold model: the raw material of protocol 4 and of the patient rule's parameters.

``python -m allmil_cli.train.heldout`` trains (or loads, cached) the five protocol-2 fold models of the shipped recipe
and scores, with each fold's model, only cells that model never trained on:

* ``idb_blast`` / ``idb_normal``: the ground-truth white cells of the fold's held-out ALL-IDB1 fields (blast centroids,
  filtered normal white cells, ALL-IDB2 crops cut from those fields), each with its source field;
* ``pbc_<class>``: every PBC image outside ``inventory.PBC_TRAIN`` (held out by image; PBC has no donor ids, so the
  source itself was seen by the shipped recipe: leave-*image*-out, not leave-source-out);
* ``bccd_wbc``: the WBC boxes of BCCD's test split (never trained on; the fields' source was), with their field.

Each cell's features are the exact inference crop (stain-mapped as ``Pipeline`` does: view 0 of the recipe) through the
frozen backbone, then the fold's FC256 head; its score is the fold's LSTM on a length-1 series (the product's blast
score). Written to ``.cache/protocol4/heldout_<recipe>.npz``: ``fold``, ``group``, ``field``, ``score``, ``emb``
(float16, 256-d), and each fold model's blank embedding.
"""

from __future__ import annotations

import argparse
import time
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from allmil_cli.train.inventory import PBC_TRAIN, REPO, Cell, pbc_cells

OUT_DIR = REPO / ".cache" / "protocol4"
K = 5  # protocol 2's folds


def heldout_path(recipe: str = "v2pbc", variant: str | None = None, seed: int = 0) -> Path:
    """``variant`` (``embedder_ablation.VARIANTS``, e.g. ``in160``): that embedder's file; None or ``in224`` = the shipped one's.
    ``seed``: the fold models' training seed (``TrainConfig.seed``; 0 = the shipped models' seed)."""
    tag = "" if seed == 0 else f"_seed{seed}"
    if variant in (None, "in224"):
        return OUT_DIR / f"heldout_{recipe}{tag}.npz"
    return OUT_DIR / f"heldout_{recipe}_{variant}{tag}.npz"


def extra_cells() -> tuple[list[Cell], list[str], list[str]]:
    """Cells no fold model trained on outside ALL-IDB1: PBC images outside PBC_TRAIN and BCCD test-split WBCs."""
    from allmil_cli.train.data import load_rgb, read_bccd
    from allmil_cli.stages.scale import estimate_rbc_diameter

    train_keys = {c.key for c in pbc_cells(per_type=PBC_TRAIN)}
    cells, groups, fields = [], [], []
    for c in pbc_cells():
        if c.key not in train_keys:
            cells.append(c)
            groups.append("pbc_" + c.key.split("/")[1])
            fields.append(c.key)
    for rec in read_bccd():
        b = rec.boxes.get("WBC")
        if rec.split != "test" or b is None or not len(b):
            continue
        rbc = estimate_rbc_diameter(load_rgb(rec.path))
        for i, (x0, y0, x1, y1) in enumerate(b):
            cells.append(Cell(f"bccd/{rec.name}/{i}", "bccd", str(rec.path), float(x0 + x1) / 2, float(y0 + y1) / 2, rbc, 0, ""))
            groups.append("bccd_wbc")
            fields.append(f"bccd/{rec.name}")
    return cells, groups, fields


def build(recipe: str = "v2pbc", variant: str | None = None, seed: int = 0) -> Path:
    """Score every held-out cell with its fold model(s); see the module docstring. ``variant``: an embedder of
    ``embedder_ablation.VARIANTS`` (its own features and fold models) instead of the shipped one."""
    from allmil_cli.train.augment import RECIPES
    from allmil_cli.train.features import feature_cache
    from allmil_cli.train.protocol2 import K, Protocol2

    t0 = time.time()
    if variant in (None, "in224"):
        from allmil_cli.train.mil import TrainConfig

        P, size = Protocol2(cells_source="gt", recipe=recipe, cfg=TrainConfig(seed=seed)), 224
    else:
        from allmil_cli.train.variants import VariantProtocol2

        P = VariantProtocol2(variant, recipe)
        size = P.input_size
    extra, extra_groups, extra_fields = extra_cells()
    rec0 = replace(RECIPES[recipe], n_aug=0)  # view 0 only: the exact inference crop
    fx = feature_cache(P.backbone, 0, extra, recipe=rec0, tag="_heldout", input_size=size)["feats"][:, 0].astype(np.float32)
    print(f"held-out extra cells: {len(extra)} ({time.time() - t0:.0f}s)", flush=True)
    fold_l, group_l, field_l, score_l, emb_l, blanks = [], [], [], [], [], []
    for k in range(K):
        m = P.model(k)
        blanks.append(m.blank)
        idx = [i for name, f in P.fold_of.items() if f == k for i in P.idx_of_field.get(name, [])]
        feats = np.concatenate([P.fc["feats"][idx, 0].astype(np.float32), fx])
        groups = [("idb_blast" if P.cells[i].label == 1 else "idb_normal") for i in idx] + extra_groups
        fields = [P.cells[i].idb1_field for i in idx] + extra_fields
        emb = m.embed(feats)
        score = np.concatenate([m.run(emb[i : i + 2048, None, :]) for i in range(0, len(emb), 2048)])
        fold_l.append(np.full(len(emb), k, np.int8))
        group_l += groups
        field_l += fields
        score_l.append(score.astype(np.float32))
        emb_l.append(emb.astype(np.float16))
        print(f"fold {k}: {len(idx)} ALL-IDB cells + {len(extra)} extra scored ({time.time() - t0:.0f}s)", flush=True)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    out = heldout_path(recipe, variant, seed)
    np.savez_compressed(out, fold=np.concatenate(fold_l), group=np.array(group_l), field=np.array(field_l),
                        score=np.concatenate(score_l), emb=np.concatenate(emb_l), blank=np.stack(blanks).astype(np.float32))
    print(f"wrote {out} in {time.time() - t0:.0f}s", flush=True)
    return out


def parts(data: dict[str, np.ndarray]) -> np.ndarray:
    """The fold each cell is a test cell of: ALL-IDB cells their own fold; other cells by a hash of their field."""
    part = np.array([zlib.crc32(f.encode()) % K for f in data["field"]], np.int8)
    idb = np.char.startswith(data["group"].astype(str), "idb_")
    return np.where(idb, data["fold"], part)


def split(data: dict[str, np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """(test mask, fit mask) over the rows of ``data`` (one row per cell and scoring fold) for fold ``k``."""
    p = parts(data)
    scored_by_own = data["fold"] == p  # every cell counted once, scored by the model of the fold it is a test cell of
    return scored_by_own & (p == k), scored_by_own & (p != k)


def load(recipe: str = "v2pbc", variant: str | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """The held-out cells; ``idb_normal`` split by context: ``idb_normal`` (healthy fields: what normal blood shows)
    and ``idb_normal_in_all`` (normal cells of ALL fields, whose crops often hold part of a neighbouring blast)."""
    f = heldout_path(recipe, variant, seed)
    if not f.exists():
        v = f" --variant {variant}" if variant not in (None, "in224") else ""
        raise SystemExit(f"{f} missing: run `python -m allmil_cli.train.heldout --recipe {recipe}{v}` first (~25 min cold)")
    z = np.load(f, allow_pickle=False)
    d = {k: z[k] for k in z.files}
    group = d["group"].astype(str)
    in_all = (group == "idb_normal") & np.char.endswith(d["field"].astype(str), "_1")
    d["group"] = np.where(in_all, "idb_normal_in_all", group)
    return d


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m allmil_cli.train.heldout", description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", default="v2pbc")
    ap.add_argument("--variant", default=None, help="an embedder of embedder_ablation.VARIANTS (in160, in128, lite0); "
                    "writes heldout_<recipe>_<variant>.npz")
    ap.add_argument("--seed", type=int, default=0, help="training seed of the fold models (0: the shipped recipe's; others "
                    "give heldout_<recipe>_seed<N>.npz, for the spread over seeds in protocol 4)")
    a = ap.parse_args(argv)
    if a.seed and a.variant not in (None, "in224"):
        ap.error("--seed applies to the shipped embedder only")
    build(a.recipe, a.variant, a.seed)


if __name__ == "__main__":
    main()
