"""Training views of a cell: re-cuts of the inference crop under geometry, stain and resolution changes.

View 0 of every cell is the exact inference crop (``allmil_cli.crops.crop_cells``). Augmented views
(morphology-preserving: no shear) are re-cut from the field: rotation 0..360 deg, horizontal flip, scale
+-15 %, translation +-6 % of the crop side, then colour jitter.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image

from allmil_cli.crops import CROP_SIZE, crop_cells
from allmil_cli.scale import CROP_RBC_RATIO
from allmil_cli.train.inventory import Cell


def colour_jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    a = img.astype(np.float32) / 255.0
    a = a * rng.uniform(0.94, 1.06, 3).astype(np.float32)
    grey = a.mean(axis=2, keepdims=True)
    a = grey + (a - grey) * rng.uniform(0.85, 1.15)
    m = a.mean()
    a = m + (a - m) * rng.uniform(0.88, 1.12)
    a = a * rng.uniform(0.92, 1.08)
    a = np.clip(a, 0, 1) ** rng.uniform(0.9, 1.1)
    return (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)


def augmented_crop(rgb: np.ndarray, x: float, y: float, rbc_px: float, rng: np.random.Generator, size: int = CROP_SIZE) -> np.ndarray:
    """One random rotation/flip/scale/translation re-cut of the ``crop_cells`` window, + colour jitter."""
    side = max(8, int(round(CROP_RBC_RATIO * rbc_px)))
    half_ctx = int(math.ceil(side * 0.95))
    x0, y0 = int(round(x)) - half_ctx, int(round(y)) - half_ctx
    h, w = rgb.shape[:2]
    # context window with edge replication outside the field (as crop_cells does)
    ys = np.clip(np.arange(y0, y0 + 2 * half_ctx), 0, h - 1)
    xs = np.clip(np.arange(x0, x0 + 2 * half_ctx), 0, w - 1)
    ctx = rgb[ys[:, None], xs[None, :]]
    cx, cy = half_ctx + (x - round(x)), half_ctx + (y - round(y))  # the cell centre in the context
    theta = rng.uniform(0, 2 * math.pi)
    s = side * rng.uniform(0.85, 1.15) / size
    tx, ty = rng.uniform(-0.06, 0.06, 2) * side
    flip = -1.0 if rng.random() < 0.5 else 1.0
    c, sn = math.cos(theta), math.sin(theta)
    # output (u, v) -> source: centre + R * S * F * (u - size/2, v - size/2) + t
    a, b = c * s * flip, -sn * s
    d, e = sn * s * flip, c * s
    u0 = v0 = size / 2.0
    cc = cx + tx - a * u0 - b * v0
    ff = cy + ty - d * u0 - e * v0
    im = Image.fromarray(np.ascontiguousarray(ctx)).transform((size, size), Image.AFFINE, (a, b, cc, d, e, ff), resample=Image.BILINEAR)
    return colour_jitter(np.asarray(im), rng)


def cell_views(rgb: np.ndarray, cells: list[Cell], n_aug: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (len(cells), 1 + n_aug, 224, 224, 3): view 0 = the exact inference crop."""
    out = np.empty((len(cells), 1 + n_aug, CROP_SIZE, CROP_SIZE, 3), np.uint8)
    for i, c in enumerate(cells):
        out[i, 0] = crop_cells(rgb, np.array([[c.x, c.y]]), c.rbc_px)[0]
        for j in range(n_aug):
            out[i, 1 + j] = augmented_crop(rgb, c.x, c.y, c.rbc_px, rng)
    return out
