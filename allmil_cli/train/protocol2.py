"""Protocol 2 (the number we quote): 5 folds by image over ALL-IDB1, each image a patient.

For fold k the embedder head + aggregator are trained on every cell whose ALL-IDB1 source field is not a
test image (ALL-IDB1 annotations, ALL-IDB2 crops mapped to training fields by ``idb2_map``) plus BCCD
train/val; test cells come from that fold's detector (``.cache/folds/detector_fold{k}.onnx``, trained
without fold k) -- or, with ``--cells gt`` (or when the fold detectors are missing), from the ground-truth
centroids (blasts + filtered normal WBCs). Fast evaluation runs the torch twin of the ONNX pair on cached
backbone features (the features of an un-augmented crop are exactly what ``embedder.onnx`` computes before
its FC layer; see export-check). Protocol 3 (``protocol3.py``) runs the exported fold models through the
product ``Pipeline`` instead.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from allmil_cli.stages.aggregate import bag_probability
from allmil_cli.stages.crops import crop_cells
from allmil_cli.stages.normalize import stain_map
from allmil_cli.stages.scale import measure_field
from allmil_cli.train.backbones import DEFAULT_AUG as SHIP_AUG
from allmil_cli.train.backbones import DEFAULT_BACKBONE
from allmil_cli.train.data import image_folds, load_rgb, read_all_idb1
from allmil_cli.train.features import feature_cache
from allmil_cli.train.augment import RECIPES
from allmil_cli.train.inventory import CACHE, PBC_TRAIN, REPO, Cell, inventory, pbc_cells
from allmil_cli.train.mil import TorchModel, TrainConfig, train

MODELS = CACHE / "models"


FOLDS_DIR = REPO / ".cache" / "folds"


K = 5


DEFAULT_AUG = 6  # views of the plain (avg-pooling) mobilenet_v2 cache used by the earlier runs/ablations


ARGS: dict = {}  # --backbone / --augment from the command line


#: cheaper training budget for the ablations that retrain 5 fold models per setting (stated in tables)
ABL = TrainConfig(stage1_steps=400, stage2_steps=600)


def fields():
    recs = read_all_idb1()
    folds = image_folds([r.name for r in recs], [r.label for r in recs], k=K, seed=0)
    return recs, folds


def detector_paths() -> list[Path] | None:
    ps = [FOLDS_DIR / f"detector_fold{k}.onnx" for k in range(K)]
    return ps if all(p.exists() for p in ps) else None


def _hash(obj) -> str:
    return hashlib.md5(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def fold_model(cells: list[Cell], fc: dict, train_mask: np.ndarray, cfg: TrainConfig, key: dict, verbose: bool = False) -> TorchModel:
    """Train (or load from .cache/cells/models) the head + aggregator on the masked cells."""
    import torch

    from allmil_cli.train.mil import make_modules

    torch.set_num_threads(1)
    cd = asdict(cfg)
    if cd.get("hard_neg_weight") == 1.0:  # added later: keep the hashes of earlier (default) models
        cd.pop("hard_neg_weight")
    h = _hash({"key": key, "cfg": cd, "n": int(train_mask.sum()), "cells": _hash([c.key for c, m in zip(cells, train_mask) if m])})
    f = MODELS / f"{h}.pt"
    feats = fc["feats"]
    if f.exists():
        head, agg = make_modules(feats.shape[2])
        st = torch.load(f)
        head.load_state_dict(st["head"])
        agg.load_state_dict(st["agg"])
        head.eval()
        agg.eval()
    else:
        labels = np.array([c.label for c in cells])
        t = time.time()
        from allmil_cli.train.mil import sample_weights

        w = sample_weights(cells, cfg)[train_mask]
        head, agg = train(feats[train_mask], labels[train_mask], fc["blank"], cfg, verbose=verbose, weights=w)
        MODELS.mkdir(parents=True, exist_ok=True)
        torch.save({"head": head.state_dict(), "agg": agg.state_dict()}, f)
        print(f"    trained {key} in {time.time() - t:.0f}s", flush=True)
    return TorchModel(head, agg, fc["blank"])


def det_features(backbone: str, fold: int, names: list[str], det_path: Path, recs_by_name: dict, stain_norm: bool = False) -> dict:
    """Detections of the fold's detector on its test images + backbone features of their crops (cached);
    ``stain_norm``: crops mapped to the reference stain first, as ``Pipeline`` does for such an embedder."""
    import onnxruntime as ort

    from allmil_cli.stages.detect import detect_cells

    st = det_path.stat()
    f = CACHE / f"det_{backbone.replace(':', '-')}{'_norm' if stain_norm else ''}_fold{fold}_{int(st.st_mtime)}_{st.st_size}.npz"
    if f.exists():
        z = np.load(f, allow_pickle=True)
        return z["data"].item()
    from allmil_cli.train.backbones import build_backbone
    from allmil_cli.train.features import backbone_features

    bb = build_backbone(backbone)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(det_path), so, providers=["CPUExecutionProvider"])
    out = {}
    for n in names:
        rgb = load_rgb(recs_by_name[n].path)
        stats = measure_field(rgb)
        rbc = stats.rbc_px
        dets = detect_cells(sess, rgb, rbc)
        xy = np.array([[d.x, d.y] for d in dets], np.float32).reshape(-1, 2)
        crops = crop_cells(rgb, xy, rbc)
        if stain_norm and stats.measured and len(crops):
            crops = stain_map(stats).apply(crops)
        feats = backbone_features(bb, crops) if len(xy) else np.zeros((0, bb.dim), np.float32)
        out[n] = {"xy": xy, "rbc": rbc, "feats": feats.astype(np.float32)}
    np.savez(f, data=np.array(out, dtype=object))
    return out


class Protocol2:
    """Trains the 5 fold models once (cached) and hands out test cells per image."""

    def __init__(self, backbone: str | None = None, n_aug: int | None = None, cfg: TrainConfig | None = None,
                 cells_source: str = "auto", protocol: int = 2, view_subset: int | None = None, verbose: bool = True,
                 recipe: str | None = None):
        backbone = backbone or ARGS.get("backbone") or DEFAULT_BACKBONE
        self.recipe = RECIPES[recipe or ARGS.get("recipe") or "v1"]
        if n_aug is None:
            n_aug = ARGS.get("augment") if ARGS.get("augment") is not None else SHIP_AUG
        if self.recipe.name != "v1":
            n_aug = self.recipe.n_aug
        self.recs, self.folds = fields()
        self.by_name = {r.name: r for r in self.recs}
        self.fold_of = {r.name: f for r, f in zip(self.recs, self.folds)}
        self.cells = inventory() + (pbc_cells(per_type=PBC_TRAIN) if self.recipe.pbc else [])
        self.fc = feature_cache(backbone, n_aug, self.cells, recipe=self.recipe if self.recipe.name != "v1" else None)
        if view_subset is not None:
            self.fc = dict(self.fc, feats=self.fc["feats"][:, : view_subset + 1])
        self.backbone, self.n_aug, self.cfg = backbone, n_aug, cfg or TrainConfig()
        dp = detector_paths()
        self.source = ("detector" if dp else "gt") if cells_source == "auto" else cells_source
        if self.source == "detector" and not dp:
            raise SystemExit("fold detectors missing in .cache/folds/; use --cells gt")
        self.det_paths = dp
        self.protocol = protocol
        self.view_subset = view_subset
        self.models: dict[int, TorchModel] = {}
        self.verbose = verbose
        self.idx_of_field: dict[str, list[int]] = {}
        for i, c in enumerate(self.cells):  # ground-truth test cells: real white cells only (no junk)
            if c.idb1_field and c.kind in ("idb1", "idb2"):
                self.idx_of_field.setdefault(c.idb1_field, []).append(i)
        self._det: dict[int, dict] = {}

    def key(self, fold: int) -> dict:
        key = {"backbone": self.backbone, "aug": self.n_aug, "views": self.view_subset, "fold": fold, "protocol": self.protocol}
        return key if self.recipe.name == "v1" else {**key, "recipe": self.recipe.name}

    def model(self, fold: int) -> TorchModel:
        if fold not in self.models:
            if self.protocol == 1:
                mask = np.array([c.kind in ("idb2", "bccd") for c in self.cells])
            else:
                test = {n for n, f in self.fold_of.items() if f == fold}
                mask = np.array([c.idb1_field not in test for c in self.cells])
            self.models[fold] = fold_model(self.cells, self.fc, mask, self.cfg, self.key(fold), self.verbose)
        return self.models[fold]

    def test_cells(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(backbone features (N,D), is_blast (N,) bool by ground truth) of one test image."""
        rec = self.by_name[name]
        if self.source == "gt":
            idx = self.idx_of_field.get(name, [])
            if self.protocol == 1:
                idx = [i for i in idx if self.cells[i].kind == "idb1"]  # ALL-IDB2 cells masked
            f = self.fc["feats"][idx, 0].astype(np.float32) if idx else np.zeros((0, self.fc["feats"].shape[2]), np.float32)
            lab = np.array([self.cells[i].label == 1 for i in idx], bool)
            return f, lab
        k = self.fold_of[name]
        if k not in self._det:
            names = [n for n, f in self.fold_of.items() if f == k]
            self._det[k] = det_features(self.backbone, k, names, self.det_paths[k], self.by_name, self.recipe.stain_norm)
        d = self._det[k][name]
        xy, rbc, f = d["xy"], d["rbc"], d["feats"]
        blast = np.zeros(len(xy), bool)
        if len(rec.blasts) and len(xy):
            dist = np.hypot(xy[:, None, 0] - rec.blasts[None, :, 0], xy[:, None, 1] - rec.blasts[None, :, 1])
            blast = dist.min(1) < 0.8 * rbc
        if self.protocol == 1 and len(xy):
            from allmil_cli.train.idb2_map import load_map

            mc = np.array([[s.x, s.y] for s in load_map().values() if s.field == name]).reshape(-1, 2)
            if len(mc):
                keep = np.hypot(xy[:, None, 0] - mc[None, :, 0], xy[:, None, 1] - mc[None, :, 1]).min(1) >= 0.8 * rbc
                f, blast = f[keep], blast[keep]
        return f, blast

    def predict(self, combine: str = "max", bag_size: int = 15, select=None, seed: int = 0, shuffles: int = 5):
        """Out-of-fold p_all per image. ``select(name, feats, is_blast, rng) -> feats`` edits the cell set."""
        names, ys, ps, ncell = [], [], [], []
        rng = np.random.default_rng(seed)
        for r in self.recs:
            k = 0 if self.protocol == 1 else self.fold_of[r.name]
            m = self.model(k)
            f, blast = self.test_cells(r.name)
            if select is not None:
                f = select(r.name, f, blast, rng)
            e = m.embed(f) if len(f) else np.zeros((0, 256), np.float32)
            ps.append(bag_probability(m.run, e, m.blank, bag_size, combine, shuffles, seed))
            names.append(r.name)
            ys.append(r.label)
            ncell.append(len(f))
        return names, np.array(ys), np.array(ps), np.array(ncell)

    def cell_oof(self):
        """Out-of-fold cell blast scores on ground-truth cells (view 0) of each test image."""
        ys, ps = [], []
        for r in self.recs:
            k = 0 if self.protocol == 1 else self.fold_of[r.name]
            m = self.model(k)
            idx = self.idx_of_field.get(r.name, [])
            if self.protocol == 1:
                idx = [i for i in idx if self.cells[i].kind == "idb1"]
            if not idx:
                continue
            e = m.embed(self.fc["feats"][idx, 0].astype(np.float32))
            ps.append(m.run(e[:, None, :]))
            ys.append([self.cells[i].label for i in idx])
        return np.concatenate(ys), np.concatenate(ps)

    def describe(self) -> str:
        src = ("cells from the fold's detector (`.cache/folds/detector_fold{k}.onnx`)" if self.source == "detector"
               else "ground-truth-centred cells (blast centroids + filtered normal WBCs; fold detectors not used)")
        return f"recipe `{self.recipe.name}`, backbone `{self.backbone}`, {self.n_aug if self.view_subset is None else self.view_subset} augmented views/cell, {src}"


def selection_path(recipe: str | None = None) -> Path:
    """Where ``evaluate combine`` keeps a recipe's operating point (thresholds, bag rule) for ``cells train``."""
    recipe = recipe or ARGS.get("recipe") or "v1"
    return CACHE / ("selection.json" if recipe == "v1" else f"selection_{recipe}.json")


def _sel() -> dict:
    f = selection_path()
    return json.loads(f.read_text()) if f.exists() else {"combine": "max", "threshold": 0.5}
