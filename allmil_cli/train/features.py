"""Frozen-backbone features of every training view, computed once and cached (the backbone never trains)."""

from __future__ import annotations

import time
import zlib
from pathlib import Path

import numpy as np

from allmil_cli.stages.crops import CROP_SIZE
from allmil_cli.train.augment import Recipe, cell_views, recipe_views
from allmil_cli.train.data import load_rgb
from allmil_cli.train.inventory import CACHE, Cell


def to_tensor(crops: np.ndarray):
    import torch

    return torch.from_numpy(np.ascontiguousarray(crops.transpose(0, 3, 1, 2))).float()


def backbone_features(backbone, crops: np.ndarray, batch: int = 32) -> np.ndarray:
    import torch

    outs = []
    with torch.no_grad():
        for i in range(0, len(crops), batch):
            outs.append(backbone(to_tensor(crops[i : i + batch])).numpy())
    return np.concatenate(outs) if outs else np.zeros((0, backbone.dim), np.float32)


def blank_crop() -> np.ndarray:
    """The padding 'blank image': an all-zero (black) crop, far from any stained smear."""
    return np.zeros((1, CROP_SIZE, CROP_SIZE, 3), np.uint8)


def resize_views(views: np.ndarray, size: int) -> np.ndarray:
    """uint8 (..., 224, 224, 3) views -> (..., size, size, 3): the same window at a lower input resolution (Pillow
    bilinear with its antialiasing, as ``crop_cells`` resizes); ``size`` == CROP_SIZE returns ``views`` unchanged."""
    if size == CROP_SIZE:
        return views
    from PIL import Image

    flat = views.reshape(-1, CROP_SIZE, CROP_SIZE, 3)
    out = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(v)).resize((size, size), Image.BILINEAR)) for v in flat]) \
        if len(flat) else np.zeros((0, size, size, 3), np.uint8)
    return out.reshape(*views.shape[:-3], size, size, 3)


def cache_file(backbone_name: str, n_aug: int, tag: str = "", recipe: Recipe | None = None, input_size: int = CROP_SIZE) -> Path:
    """The cache file of :func:`feature_cache` (224 input: the names as ever; another input size adds ``_in<S>``)."""
    if recipe is not None:
        n_aug = recipe.n_aug
        # one cache per way of making views (recipes that differ only in their cells share it)
        tag = tag + ("" if recipe.name == "v1" else f"_norm{int(recipe.stain_norm)}_dom{int(recipe.domain_aug)}")
    if input_size != CROP_SIZE:
        tag += f"_in{input_size}"
    return CACHE / f"feats_{backbone_name.replace(':', '-')}_a{n_aug}{tag}.npz"


def feature_cache(backbone_name: str, n_aug: int, cells: list[Cell], weights_file: str | None = None, tag: str = "", verbose: bool = True,
                  recipe: Recipe | None = None, input_size: int = CROP_SIZE):
    """Backbone features of every cell view: dict(keys, feats float16 (N, 1+A, D), blank float32 (D,)).

    ``recipe`` (``augment.RECIPES``) sets the views (and ``n_aug``); None or ``v1`` = the first release's views.
    ``input_size``: the embedder's input side; every 224 view (stain-mapped as the recipe says) is resized to it
    before the backbone (:func:`resize_views`; the embedder ablation, ``embedder_ablation.py``)."""
    f = cache_file(backbone_name, n_aug, tag, recipe, input_size)
    if recipe is not None:
        n_aug = recipe.n_aug
    keys = [c.key for c in cells]
    have: dict[str, np.ndarray] = {}
    if f.exists():  # incremental: reuse every cached cell, compute only new ones
        z = np.load(f, allow_pickle=False)
        zk = list(z["keys"])
        if zk == keys:
            return {"keys": keys, "feats": z["feats"], "blank": z["blank"]}
        zf = z["feats"]
        have = {k: zf[i] for i, k in enumerate(zk)}
        if all(k in have for k in keys):
            return {"keys": keys, "feats": np.stack([have[k] for k in keys]), "blank": z["blank"]}
    from allmil_cli.train.backbones import build_backbone, feature_dim

    dim = feature_dim(backbone_name)
    feats = np.zeros((len(cells), 1 + n_aug, dim), np.float16)
    order: dict[str, list[int]] = {}
    for i, c in enumerate(cells):
        if c.key in have:
            feats[i] = have[c.key]
        else:
            order.setdefault(c.path, []).append(i)
    bb = build_backbone(backbone_name, weights_file)
    t0 = time.time()
    done = 0
    for path, idx in order.items():
        rgb = load_rgb(Path(path))
        rng = np.random.default_rng(zlib.crc32(path.encode()))
        group = [cells[i] for i in idx]
        views = recipe_views(rgb, group, recipe, rng) if recipe is not None else cell_views(rgb, group, n_aug, rng)
        fv = backbone_features(bb, resize_views(views.reshape(-1, CROP_SIZE, CROP_SIZE, 3), input_size))
        feats[idx] = fv.reshape(len(idx), 1 + n_aug, -1).astype(np.float16)
        done += len(idx)
        if verbose and (done == len(idx) or done // 200 != (done - len(idx)) // 200):
            print(f"  features {backbone_name}: {done}/{sum(map(len, order.values()))} new cells, {time.time() - t0:.0f}s", flush=True)
    blank = backbone_features(bb, resize_views(blank_crop(), input_size))[0].astype(np.float32)
    CACHE.mkdir(parents=True, exist_ok=True)
    # keep the cached cells this call did not ask for (recipes that differ in their cells share the file)
    kept = [k for k in have if k not in set(keys)]
    all_keys = keys + kept
    all_feats = np.concatenate([feats, np.stack([have[k] for k in kept])]) if kept else feats
    np.savez(f, keys=np.array(all_keys), feats=all_feats, blank=blank)
    return {"keys": keys, "feats": feats, "blank": blank}
