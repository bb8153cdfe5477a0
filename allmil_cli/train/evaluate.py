"""Evaluation of the embedder + aggregator: protocols 1 and 2, stress test, ablations.

``python -m allmil_cli.train.evaluate <what>`` with <what> one of
``protocol2``, ``combine``, ``protocol1``, ``stress``, ``cells``, ``backbone``, ``counts``, ``stage1``, ``length``
or ``all`` (``--cells detector|gt``, ``--backbone SPEC``, ``--augment N``; defaults: fold detectors when
present, the shipped ``mobilenet_v2:center`` with 2 augmented views). Each writes its markdown section to
``docs/classifier_results.md`` (sections kept in ``.cache/cells/results/`` and reassembled in a fixed
order). ``combine`` also writes ``.cache/cells/selection.json`` (patient/cell thresholds, bag rule) that
``python -m allmil_cli.train.cells train`` bakes into the shipped aggregator.

Protocol 2 (the number we quote): 5 folds by image over ALL-IDB1 (``image_folds(k=5, seed=0)``), each
image a patient. For fold k the embedder head + aggregator are trained on every cell whose ALL-IDB1
source field is not a test image (ALL-IDB1 annotations, ALL-IDB2 crops mapped to training fields by
``idb2_map``) plus BCCD train/val; test cells come from that fold's detector
(``.cache/folds/detector_fold{k}.onnx``, trained without fold k) -- or, with ``--cells gt`` (or when
the fold detectors are missing), from the ground-truth centroids (blasts + filtered normal WBCs).
Fast evaluation runs the torch twin of the ONNX pair on cached backbone features (the features of an
un-augmented crop are exactly what ``embedder.onnx`` computes before its FC layer; see export-check).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from allmil_cli.aggregate import bag_probability
from allmil_cli.metrics import binary_metrics, roc_auc
from allmil_cli.crops import crop_cells
from allmil_cli.scale import estimate_rbc_diameter
from allmil_cli.train.backbones import DEFAULT_AUG as SHIP_AUG
from allmil_cli.train.backbones import DEFAULT_BACKBONE
from allmil_cli.train.cells import CACHE, REPO, Cell, TrainConfig, TorchModel, feature_cache, inventory, train
from allmil_cli.train.data import image_folds, load_rgb, read_all_idb1

RESULTS = CACHE / "results"
MODELS = CACHE / "models"
DOC = REPO / "docs" / "classifier_results.md"
FOLDS_DIR = REPO / ".cache" / "folds"
K = 5
DEFAULT_AUG = 6  # views of the plain (avg-pooling) mobilenet_v2 cache used by the earlier runs/ablations
ARGS: dict = {}  # --backbone / --augment from the command line
#: cheaper training budget for the ablations that retrain 5 fold models per setting (stated in tables)
ABL = TrainConfig(stage1_steps=400, stage2_steps=600)
SECTIONS = ["summary", "protocol2", "protocol2_avg", "protocol2_gt", "combine", "combine_gt", "protocol1", "stress", "cells", "backbone", "counts", "stage1",
            "length", "export-check", "final"]


# ---------------------------------------------------------------------------------------------- metrics
def auc(y: np.ndarray, p: np.ndarray) -> float:
    return roc_auc(y, p)


def metrics(y, p, thr: float) -> dict:
    """:func:`allmil_cli.metrics.binary_metrics` at ``p >= thr``, in this module's short keys (undefined ratios -> 0)."""
    p = np.asarray(p)
    m = binary_metrics(y, (p >= thr).astype(int), p)
    short = {"acc": "accuracy", "f1": "f1", "sens": "sensitivity", "spec": "specificity", "auc": "roc_auc"}
    out = {k: (0.0 if np.isnan(m[v]) and k != "auc" else m[v]) for k, v in short.items()}
    out.update({k: m[k] for k in ("tp", "fn", "fp", "tn")})
    out["thr"] = thr
    return out


def pick_threshold(y, p) -> float:
    """Threshold maximising balanced accuracy on (out-of-fold) predictions; ties -> closest to 0.5,
    placed midway between neighbouring scores."""
    y, p = np.asarray(y), np.asarray(p, np.float64)
    s = np.unique(p)
    cands = np.concatenate([[0.0], (s[:-1] + s[1:]) / 2, [1.0]]) if len(s) > 1 else np.array([0.5])
    best, bt = -1.0, 0.5
    for t in cands:
        m = metrics(y, p, t)
        ba = (m["sens"] + m["spec"]) / 2
        if ba > best + 1e-12 or (abs(ba - best) <= 1e-12 and abs(t - 0.5) < abs(bt - 0.5)):
            best, bt = ba, float(t)
    return bt


def pick_threshold_margin(y, p, tol: float = 0.01) -> float:
    """The shipped patient threshold: among the gaps between consecutive out-of-fold scores whose
    balanced accuracy is within ``tol`` of the best, take the widest gap in logit space and return its
    logit midpoint. A max-balanced-accuracy threshold squeezed between two near-identical scores
    (e.g. 0.9990 vs 0.9995) would not survive a new hospital's shift; the widest margin does better."""
    y, p = np.asarray(y), np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    s = np.unique(p)
    if len(s) < 2:
        return 0.5
    lo, hi = s[:-1], s[1:]
    mids = (lo + hi) / 2
    ba = np.array([(lambda m: (m["sens"] + m["spec"]) / 2)(metrics(y, p, t)) for t in mids])
    ok = ba >= ba.max() - tol - 1e-12
    lg = np.log(s / (1 - s))
    width = np.where(ok, lg[1:] - lg[:-1], -np.inf)
    i = int(np.argmax(width))
    mid = (lg[i] + lg[i + 1]) / 2
    return float(1 / (1 + np.exp(-mid)))


def row(name: str, m: dict) -> str:
    return (f"| {name} | {100 * m['acc']:.2f} | {100 * m['f1']:.2f} | {100 * m['sens']:.2f} | {100 * m['spec']:.2f} | "
            f"{m['auc']:.4f} | {m['tp']} / {m['fn']} / {m['fp']} / {m['tn']} | {m['thr']:.3f} |")


HEAD = "| setting | acc % | F1 % | sens % | spec % | AUC | TP / FN / FP / TN | thr |\n|---|---|---|---|---|---|---|---|"


# ------------------------------------------------------------------------------------------------ folds
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

    from allmil_cli.train.cells import make_modules

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
        from allmil_cli.train.cells import sample_weights

        w = sample_weights(cells, cfg)[train_mask]
        head, agg = train(feats[train_mask], labels[train_mask], fc["blank"], cfg, verbose=verbose, weights=w)
        MODELS.mkdir(parents=True, exist_ok=True)
        torch.save({"head": head.state_dict(), "agg": agg.state_dict()}, f)
        print(f"    trained {key} in {time.time() - t:.0f}s", flush=True)
    return TorchModel(head, agg, fc["blank"])


def det_features(backbone: str, fold: int, names: list[str], det_path: Path, recs_by_name: dict) -> dict:
    """Detections of the fold's detector on its test images + backbone features of their crops (cached)."""
    import onnxruntime as ort

    from allmil_cli.detect import detect_cells

    st = det_path.stat()
    f = CACHE / f"det_{backbone.replace(':', '-')}_fold{fold}_{int(st.st_mtime)}_{st.st_size}.npz"
    if f.exists():
        z = np.load(f, allow_pickle=True)
        return z["data"].item()
    from allmil_cli.train.backbones import build_backbone
    from allmil_cli.train.cells import backbone_features

    bb = build_backbone(backbone)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(det_path), so, providers=["CPUExecutionProvider"])
    out = {}
    for n in names:
        rgb = load_rgb(recs_by_name[n].path)
        rbc = estimate_rbc_diameter(rgb)
        dets = detect_cells(sess, rgb, rbc)
        xy = np.array([[d.x, d.y] for d in dets], np.float32).reshape(-1, 2)
        feats = backbone_features(bb, crop_cells(rgb, xy, rbc)) if len(xy) else np.zeros((0, bb.dim), np.float32)
        out[n] = {"xy": xy, "rbc": rbc, "feats": feats.astype(np.float32)}
    np.savez(f, data=np.array(out, dtype=object))
    return out


class Protocol2:
    """Trains the 5 fold models once (cached) and hands out test cells per image."""

    def __init__(self, backbone: str | None = None, n_aug: int | None = None, cfg: TrainConfig | None = None,
                 cells_source: str = "auto", protocol: int = 2, view_subset: int | None = None, verbose: bool = True):
        backbone = backbone or ARGS.get("backbone") or DEFAULT_BACKBONE
        n_aug = n_aug if n_aug is not None else (ARGS.get("augment") if ARGS.get("augment") is not None else SHIP_AUG)
        self.recs, self.folds = fields()
        self.by_name = {r.name: r for r in self.recs}
        self.fold_of = {r.name: f for r, f in zip(self.recs, self.folds)}
        self.cells = inventory()
        self.fc = feature_cache(backbone, n_aug, self.cells)
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
        return {"backbone": self.backbone, "aug": self.n_aug, "views": self.view_subset, "fold": fold, "protocol": self.protocol}

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
            self._det[k] = det_features(self.backbone, k, names, self.det_paths[k], self.by_name)
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
        return f"backbone `{self.backbone}`, {self.n_aug if self.view_subset is None else self.view_subset} augmented views/cell, {src}"


# --------------------------------------------------------------------------------------------- sections
def save_section(name: str, text: str, data: dict | None = None) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text.strip() + "\n")
    if data is not None:
        (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=1, default=float))
    assemble()
    print(text)


def assemble() -> None:
    parts = [
        "# Cell embedder + LSTM aggregator: results\n",
        "Generated by `python -m allmil_cli.train.evaluate <what>` (sections below name their command). "
        "All numbers are test numbers: out-of-fold (protocol 2) or on images the model never trained on "
        "(protocol 1). Each ALL-IDB1 image is one patient (108: 49 ALL, 59 normal). Machine: 2-core CPU, "
        "torch 1 thread. Code: `allmil_cli/train/{cells,evaluate,backbones,idb2_map}.py`, inference "
        "`allmil_cli/{embed,aggregate}.py`.\n",
    ]
    for s in SECTIONS:
        f = RESULTS / f"{s}.md"
        if f.exists():
            parts.append(f.read_text())
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text("\n".join(parts))


def _cmd(a) -> str:
    extra = f" --cells {a.cells}" if a.cells != "auto" else ""
    extra += f" --backbone {a.backbone}" if getattr(a, "backbone", None) else ""
    extra += f" --augment {a.augment}" if getattr(a, "augment", None) is not None else ""
    return f"python -m allmil_cli.train.evaluate {a.what}{extra}"


# ---------------------------------------------------------------------------------------------- commands
def run_protocol2(a) -> None:
    P = Protocol2(cells_source=a.cells)
    names, y, p, n = P.predict(combine="max")
    thr = pick_threshold(y, p)
    thr_m = pick_threshold_margin(y, p)
    cy, cp = P.cell_oof()
    cthr = pick_threshold(cy, cp)
    m05, mt, mm = metrics(y, p, 0.5), metrics(y, p, thr), metrics(y, p, thr_m)
    miss = [f"{nm} (p={pp:.4f}, label {yy}, {nn} cells)" for nm, yy, pp, nn in zip(names, y, p, n) if (pp >= thr_m) != yy]
    miss05 = [f"{nm} (p={pp:.4f}, label {yy})" for nm, yy, pp in zip(names, y, p) if (pp >= 0.5) != yy]
    txt = f"""## Protocol 2: 5-fold by image over ALL-IDB1 (the number we quote)

Command: `{_cmd(a)}`. Setup: {P.describe()}. Each fold's models never saw a test image or any ALL-IDB2
crop cut from it (mapped by `idb2_map`). Bag rule `max`, 5 shuffles (see Combine section).

{HEAD}
{row("threshold 0.5", m05)}
{row("OOF-selected threshold, widest-margin rule (shipped; optimistic)", mm)}
{row("OOF-selected threshold (max balanced acc.; optimistic)", mt)}

Cells per image: median {np.median(n):.0f}, min {n.min()}, max {n.max()}. Out-of-fold cell-level blast AUC
(ground-truth cells, length-1 series): {auc(cy, cp):.4f}; cell threshold (max balanced acc.): {cthr:.3f}.
Paper (ALL-IDB1): acc 96.15, F1 94.24, sens 97.56, spec 90.91.

Misclassified at the shipped (widest-margin) threshold {thr_m:.3f}: {", ".join(miss) if miss else "none"}.
Misclassified at 0.5: {", ".join(miss05) if miss05 else "none"}.
"""
    save_section("protocol2", txt, {"names": names, "y": y.tolist(), "p": p.tolist(), "thr": thr, "thr_margin": thr_m,
                                    "cell_thr": cthr, "source": P.source, "m05": m05, "mt": mt, "mm": mm})


def run_combine(a) -> None:
    P = Protocol2(cells_source=a.cells)
    lines = []
    best = None
    for comb in ("max", "mean", "noisy_or", "series"):
        _, y, p, _ = P.predict(combine=comb)
        m = metrics(y, p, 0.5)
        thr = pick_threshold(y, p)
        mt = metrics(y, p, thr)
        lines.append(row(f"{comb} @0.5", m))
        lines.append(row(f"{comb} @OOF thr", mt))
        score = (m["auc"], (m["sens"] + m["spec"]) / 2)
        if best is None or score > best[0]:
            best = (score, comb, thr)
    # choose: best AUC at 0.5 (ties -> balanced acc.)
    _, comb, _ = best
    _, y, p, _ = P.predict(combine=comb)
    thr = pick_threshold_margin(y, p)
    cy, cp = P.cell_oof()
    cthr = pick_threshold(cy, cp)
    sel = {"combine": comb, "threshold": thr, "cell_threshold": cthr, "shuffles": 5, "source": P.source}
    (CACHE / "selection.json").write_text(json.dumps(sel, indent=1))
    txt = f"""## Combine rule for patients with more than 15 cells (protocol 2, out-of-fold)

Command: `{_cmd(a)}`. Setup: {P.describe()}. Patients with <= 15 cells get one bag (identical for all
rules); with more, shuffled bags of <= 15 (blank-padded) are combined by the rule; `series` feeds all
cells as one LSTM series. Chosen (best AUC, then balanced accuracy): **{comb}**; patient threshold from
its out-of-fold predictions by the widest-margin rule (`pick_threshold_margin`: among the gaps between
consecutive out-of-fold p_all whose balanced accuracy is within 1 point of the best, the widest in
logit space, at its logit midpoint): **{thr:.3f}**; cell threshold (max balanced accuracy):
**{cthr:.3f}** (out-of-fold cell scores). These go into `aggregator.onnx` metadata.

{HEAD}
{chr(10).join(lines)}
"""
    save_section("combine", txt, sel)


def run_protocol1(a) -> None:
    P = Protocol2(cells_source=a.cells, protocol=1)
    names, y, p, n = P.predict(combine="max")
    m05 = metrics(y, p, 0.5)
    txt = f"""## Protocol 1 (the paper's): train on ALL-IDB2 (+ BCCD), test on ALL-IDB1 with ALL-IDB2 cells masked

Command: `{_cmd(a)}`. Setup: {P.describe()}. One model trained on the 260 ALL-IDB2 crops (re-cut from
their fields) + BCCD train/val WBCs only; every ALL-IDB1 image is a test patient, with the cells that
ALL-IDB2 was cut from removed (detections within 0.8 red-cell diameter of a mapped crop centre; with
ground-truth cells, the mapped cells themselves). Threshold 0.5 (no ALL-IDB1 data used for choosing it).

{HEAD}
{row("protocol 1, all 108 images, threshold 0.5", m05)}
{row(f"protocol 1, the {int((n > 0).sum())} images with >= 1 cell left", metrics(y[n > 0], p[n > 0], 0.5))}

Images left with no cell get the blank-bag answer (p = {p[n == 0].max() if (n == 0).any() else float("nan"):.3f} at most: 'normal');
{int(((n == 0) & (y == 1)).sum())} of them are ALL images, so the all-image row flatters specificity.

Cells per image after masking: median {np.median(n):.0f}, {int((n == 0).sum())} images with none left.
"""
    save_section("protocol1", txt, {"y": y.tolist(), "p": p.tolist(), "m05": m05})


def _sel() -> dict:
    f = CACHE / "selection.json"
    return json.loads(f.read_text()) if f.exists() else {"combine": "max", "threshold": 0.5}


def run_stress(a) -> None:
    P = Protocol2(cells_source=a.cells)
    sel = _sel()
    comb, thr = sel["combine"], sel["threshold"]
    res = {}
    for mode in ("none", "blasts", "normals"):
        def select(name, f, blast, rng, mode=mode):
            if mode == "blasts":
                return f[~blast]
            if mode == "normals":
                return f[blast]
            return f
        _, y, p, n = P.predict(combine=comb, select=select)
        res[mode] = {"recall": float(((p >= thr) & (y == 1)).sum() / (y == 1).sum()),
                     "recall05": float(((p >= 0.5) & (y == 1)).sum() / (y == 1).sum()),
                     "empty_all": int(((n == 0) & (y == 1)).sum())}
    txt = f"""## Stress test (protocol-2 models, ALL-IDB1 ALL patients)

Command: `{_cmd(a)}`. Setup: {P.describe()}. Cells are called blasts by ground truth (within 0.8
red-cell diameter of a blast centroid); 'blasts removed' keeps only the other cells, 'normals removed'
only the blast cells. Recall of the 49 ALL patients; rule `{comb}`, threshold {thr:.3f} (and 0.5).
Targets: blasts removed <= 15 %, normals removed >= unattacked. Paper: 43.90 % / 97.56 %.

| attack | recall % (thr {thr:.3f}) | recall % (thr 0.5) | ALL patients left with no cells |
|---|---|---|---|
| none removed | {100 * res['none']['recall']:.2f} | {100 * res['none']['recall05']:.2f} | {res['none']['empty_all']} |
| blasts removed | {100 * res['blasts']['recall']:.2f} | {100 * res['blasts']['recall05']:.2f} | {res['blasts']['empty_all']} |
| normals removed | {100 * res['normals']['recall']:.2f} | {100 * res['normals']['recall05']:.2f} | {res['normals']['empty_all']} |
"""
    save_section("stress", txt, res)


def run_cells(a) -> None:
    P = Protocol2(cells_source=a.cells)
    sel = _sel()
    lines = []
    for k in (1, 2, 4, 8, 15, 30):
        accs, aucs = [], []
        for seed in range(5):
            def select(name, f, blast, rng, k=k):
                return f[rng.permutation(len(f))[:k]]
            _, y, p, _ = P.predict(combine=sel["combine"], select=select, seed=seed)
            accs.append(metrics(y, p, sel["threshold"])["acc"])
            aucs.append(auc(y, p))
        lines.append(f"| {k} | {100 * np.mean(accs):.2f} +- {100 * np.std(accs):.2f} | {np.mean(aucs):.4f} |")
    txt = f"""## Ablation: accuracy vs cells per patient

Command: `{_cmd(a)}`. Setup: {P.describe()}; protocol 2 out-of-fold. k cells sampled at random per image
(all of them when the image has fewer), 5 sampling seeds (mean +- sd); rule `{sel['combine']}`, threshold {sel['threshold']:.3f}.

| cells sampled | accuracy % | AUC |
|---|---|---|
{chr(10).join(lines)}
"""
    save_section("cells", txt)


def run_backbone(a) -> None:
    lines = []
    for bb in ("mobilenet_v2", "efficientnet_lite0", "mobilenet_v2:center", "efficientnet_lite0:center"):
        try:
            if bb == "mobilenet_v2" and (CACHE / f"feats_{bb}_a{DEFAULT_AUG}.npz").exists():  # 6-view avg cache, 2 views used
                P = Protocol2(backbone=bb, n_aug=DEFAULT_AUG, view_subset=2, cells_source=a.cells, cfg=ABL)
            else:
                P = Protocol2(backbone=bb, n_aug=2, cells_source=a.cells, cfg=ABL)
        except FileNotFoundError as e:
            lines.append(f"| {bb} | unavailable: {e} | | | | | | |")
            continue
        _, y, p, _ = P.predict()
        lines.append(row(f"{bb} @0.5", metrics(y, p, 0.5)))
        cy, cp = P.cell_oof()
        _, y2, p2, _ = P.predict(select=lambda n, f, b, r: f[~b])
        rec = float(((p2 >= 0.5) & (y2 == 1)).sum() / (y2 == 1).sum())
        lines.append(f"| {bb}: cell-level AUC (OOF) {auc(cy, cp):.4f}; stress 'blasts removed' recall @0.5 {100 * rec:.2f} % | | | | | | | |")
        src = P.describe().split(", ", 2)[-1]
    txt = f"""## Ablation: backbone (offline ImageNet weights available here)

Command: `{_cmd(a)}`. Protocol 2, {src}; 2 augmented views/cell for both (a cheaper cache than the
shipped 6), ablation training budget (stage 1 {ABL.stage1_steps} / stage 2 {ABL.stage2_steps} steps). AlexNet / ResNet50 / VGG16 / Inception-v3 / ViT-B/16 are supported (`--backbone`,
`--backbone-weights FILE`) but have no weights on this machine. `:center` = centre pooling (global average
concatenated with the average of the central 3x3 of the 7x7 map; see `backbones.py`); the others use
global average pooling.

{HEAD}
{chr(10).join(lines)}
"""
    save_section("backbone", txt)


def run_counts(a) -> None:
    """LSTM vs a perceptron on (blast-like, normal-like) counts, same fold embedders."""
    import torch

    P = Protocol2(cells_source=a.cells)
    sel = _sel()
    _, y, p, _ = P.predict(combine=sel["combine"])
    lines = [row("LSTM aggregator (ours) @0.5", metrics(y, p, 0.5)),
             row("LSTM aggregator (ours) @OOF thr (optimistic)", metrics(y, p, sel["threshold"]))]
    cthr = sel.get("cell_threshold", 0.5)
    labels = np.array([c.label for c in P.cells])
    py = []
    pp = []
    for k in range(K):
        m = P.model(k)
        test = {n for n, f in P.fold_of.items() if f == k}
        tr = np.array([c.idb1_field not in test for c in P.cells])
        e = m.embed(P.fc["feats"][tr, 0].astype(np.float32))
        s = m.run(e[:, None, :])
        lab = labels[tr]
        # perceptron (logistic unit) on [n_blast_like, n_normal_like], trained on generated bags of
        # training cells (1..15 cells, ALL iff >= 1 true blast), with the cells' in-sample scores
        rng = np.random.default_rng(k)
        X, Y = [], []
        bl, nl = np.nonzero(lab == 1)[0], np.nonzero(lab == 0)[0]
        for _ in range(4000):
            n = rng.integers(1, 16)
            yy = rng.random() < 0.5
            nb = rng.integers(1, n + 1) if yy else 0
            idx = np.concatenate([rng.choice(bl, nb), rng.choice(nl, n - nb)]).astype(int)
            nbl = (s[idx] >= cthr).sum()
            X.append([nbl, n - nbl])
            Y.append(int(yy))
        X = torch.tensor(np.array(X, np.float32))
        Y = torch.tensor(np.array(Y, np.float32))
        lin = torch.nn.Linear(2, 1)
        opt = torch.optim.Adam(lin.parameters(), lr=0.05)
        for _ in range(500):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(lin(X)[:, 0], Y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        for r in P.recs:
            if P.fold_of[r.name] != k:
                continue
            f, _ = P.test_cells(r.name)
            sc = m.run(m.embed(f)[:, None, :]) if len(f) else np.zeros(0)
            nb = (sc >= cthr).sum()
            with torch.no_grad():
                pp.append(float(torch.sigmoid(lin(torch.tensor([[nb, len(sc) - nb]], dtype=torch.float32)))[0, 0]))
            py.append(r.label)
    py, pp = np.array(py), np.array(pp)
    lines.append(row("perceptron on counts @0.5", metrics(py, pp, 0.5)))
    lines.append(row("perceptron on counts @OOF thr (optimistic)", metrics(py, pp, pick_threshold(py, pp))))
    txt = f"""## Ablation: LSTM vs a perceptron on per-patient blast / normal counts

Command: `{_cmd(a)}`. Setup: {P.describe()}; protocol 2. Both use the same fold embedders and cell
scores (length-1 series, cell threshold {cthr:.3f}); the perceptron is a logistic unit on
(n_blast_like, n_normal_like), trained per fold on 4000 generated bags of training cells.

{HEAD}
{chr(10).join(lines)}
"""
    save_section("counts", txt)


def run_stage1(a) -> None:
    lines = []
    for s1 in (True, False):
        cfg = ABL if s1 else replace(ABL, stage1=False, aux_weight=0.0)
        P = Protocol2(cells_source=a.cells, cfg=cfg)
        _, y, p, _ = P.predict()
        name = "with stage 1 (+ length-1 aux loss in stage 2) @0.5" if s1 else "without stage 1 (no length-1 aux loss) @0.5"
        lines.append(row(name, metrics(y, p, 0.5)))
    txt = f"""## Ablation: with vs without stage-1 (single-cell) pre-training

Command: `{_cmd(a)}`. Setup: {P.describe()}; protocol 2, rule `max`. Ablation training budget
(both rows): stage 1 {ABL.stage1_steps} steps, stage 2 {ABL.stage2_steps} steps (shipped: 1000 / 1500). Without stage 1,
stage 2 runs alone from scratch at the stage-1 learning rate.

{HEAD}
{chr(10).join(lines)}
"""
    save_section("stage1", txt)


def run_length(a) -> None:
    lines = []
    for L in (1, 4, 8, 15, 32):
        cfg = replace(ABL, bag_size=L)
        P = Protocol2(cells_source=a.cells, cfg=cfg)
        _, y, p, _ = P.predict(bag_size=L)
        lines.append(row(f"series length {L} @0.5", metrics(y, p, 0.5)))
    txt = f"""## Ablation: training series (bag) length

Command: `{_cmd(a)}`. Setup: {P.describe()}; protocol 2. Stage 2 trained on bags of L slots (1..L real
cells, blank padding); at test the patient's cells go into bags of L, combined by `max`. Ablation training
budget: stage 1 {ABL.stage1_steps} steps, stage 2 {ABL.stage2_steps} steps (shipped: 1000 / 1500).

{HEAD}
{chr(10).join(lines)}
"""
    save_section("length", txt)


def main() -> None:
    ap = argparse.ArgumentParser(description="embedder + aggregator evaluation")
    ap.add_argument("what", choices=["protocol2", "combine", "protocol1", "stress", "cells", "backbone", "counts", "stage1",
                                     "length", "all", "assemble"])
    ap.add_argument("--cells", choices=["auto", "detector", "gt"], default="auto",
                    help="test cells: fold detectors (auto when present) or ground-truth centroids")
    ap.add_argument("--backbone", default=None, help=f"backbone spec (default {DEFAULT_BACKBONE})")
    ap.add_argument("--augment", type=int, default=None, help=f"augmented views per cell (default {SHIP_AUG})")
    a = ap.parse_args()
    ARGS.update(backbone=a.backbone, augment=a.augment)
    import torch

    torch.set_num_threads(1)
    todo = {"protocol2": run_protocol2, "combine": run_combine, "protocol1": run_protocol1, "stress": run_stress,
            "cells": run_cells, "backbone": run_backbone, "counts": run_counts, "stage1": run_stage1, "length": run_length}
    if a.what == "assemble":
        assemble()
    elif a.what == "all":
        for w in ("protocol2", "combine", "protocol1", "stress", "cells", "counts", "stage1", "length", "backbone"):
            a.what = w
            todo[w](a)
    else:
        todo[a.what](a)


if __name__ == "__main__":
    main()
