"""Training views of a cell: re-cuts of the inference crop under geometry, stain and resolution changes.

View 0 of every cell is the exact inference crop (``allmil_cli.stages.crops.crop_cells``). Augmented views
(morphology-preserving: no shear) are re-cut from the field: rotation 0..360 deg, horizontal flip, scale
+-15 %, translation +-6 % of the crop side, then colour jitter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

from allmil_cli.stages.crops import CROP_SIZE, crop_cells
from allmil_cli.stages.scale import CROP_RBC_RATIO
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


def _context(rgb: np.ndarray, x: float, y: float, rbc_px: float) -> tuple[np.ndarray, int, int]:
    """The window around a cell that any augmented re-cut can reach (edge-replicated outside the field, as
    ``crop_cells`` does): (window, its half side, the crop side), in field pixels."""
    side = max(8, int(round(CROP_RBC_RATIO * rbc_px)))
    half = int(math.ceil(side * 0.95))
    h, w = rgb.shape[:2]
    ys = np.clip(np.arange(int(round(y)) - half, int(round(y)) + half), 0, h - 1)
    xs = np.clip(np.arange(int(round(x)) - half, int(round(x)) + half), 0, w - 1)
    return rgb[ys[:, None], xs[None, :]], half, side


def augmented_crop(rgb: np.ndarray, x: float, y: float, rbc_px: float, rng: np.random.Generator, size: int = CROP_SIZE) -> np.ndarray:
    """One random rotation/flip/scale/translation re-cut of the ``crop_cells`` window, + colour jitter (recipe v1)."""
    ctx, half, side = _context(rgb, x, y, rbc_px)
    return colour_jitter(_affine_recut(ctx, half + (x - round(x)), half + (y - round(y)), side, rng, size), rng)


def cell_views(rgb: np.ndarray, cells: list[Cell], n_aug: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 (len(cells), 1 + n_aug, 224, 224, 3): view 0 = the exact inference crop."""
    out = np.empty((len(cells), 1 + n_aug, CROP_SIZE, CROP_SIZE, 3), np.uint8)
    for i, c in enumerate(cells):
        out[i, 0] = crop_cells(rgb, np.array([[c.x, c.y]]), c.rbc_px)[0]
        for j in range(n_aug):
            out[i, 1 + j] = augmented_crop(rgb, c.x, c.y, c.rbc_px, rng)
    return out


# ------------------------------------------------------------------------------ recipes (v2: cross-domain)
@dataclass(frozen=True)
class Recipe:
    """How the training views of a cell are made, and which cells train.

    ``stain_norm``: crops (all views, and inference) go through ``allmil_cli.stages.normalize`` with the field's
    anchor colours; ``domain_aug``: augmented views also get a random stain change (``shifts.random_stain``),
    a random lower resolution (red cells 12..60 px, as another camera or objective gives), JPEG
    re-compression and blur, applied to the field the crop is cut from; ``pbc``: PBC normal cells (another
    hospital) join the training cells.
    """

    name: str
    n_aug: int
    stain_norm: bool = False
    domain_aug: bool = False
    pbc: bool = False


RECIPES = {
    "v1": Recipe("v1", 2),  # the first release: mild colour jitter, raw crops
    "norm": Recipe("norm", 2, stain_norm=True),
    "aug": Recipe("aug", 6, domain_aug=True),
    "v2": Recipe("v2", 6, stain_norm=True, domain_aug=True),
    "v2pbc": Recipe("v2pbc", 6, stain_norm=True, domain_aug=True, pbc=True),
}
SHIPPED_RECIPE = "v2pbc"


def _domain_view(rgb: np.ndarray, cells: list[Cell], rng: np.random.Generator, thumb: np.ndarray,
                 stain_norm: bool) -> np.ndarray:
    """One augmented view of every cell of a field, all under one random stain / camera change of the field."""
    from allmil_cli.stages.normalize import stain_map
    from allmil_cli.types.field import FieldStats
    from allmil_cli.stages.scale import anchor_colours
    from allmil_cli.train.shifts import blur, jpeg

    stain = _apply_lut(_stain_lut(int(rng.integers(STAIN_POOL))))
    rbc = cells[0].rbc_px
    target = math.exp(rng.uniform(math.log(12.0), math.log(60.0))) if rng.random() < 0.7 else rbc
    f = min(1.0, target / rbc)
    quality = int(rng.integers(40, 96)) if rng.random() < 0.7 else None
    sigma = rng.uniform(0.0, 0.06) * rbc if rng.random() < 0.25 else 0.0
    smap = None
    if stain_norm:
        colours = anchor_colours(stain(np.clip(thumb, 0, 255).astype(np.uint8)).astype(np.float32))
        if colours:
            smap = stain_map(FieldStats(rbc * f, **colours))
    out = np.empty((len(cells), CROP_SIZE, CROP_SIZE, 3), np.uint8)
    for i, c in enumerate(cells):
        ctx, half, side = _context(rgb, c.x, c.y, rbc)
        ctx = stain(ctx)
        if sigma > 0.3:
            ctx = blur(ctx, sigma)
        if f < 0.98:
            n = max(8, int(round(ctx.shape[0] * f)))
            ctx = np.asarray(Image.fromarray(ctx).resize((n, n), Image.BILINEAR, reducing_gap=2.0))
        if quality is not None:
            ctx = jpeg(ctx, quality)
        s = ctx.shape[0] / (2 * half)  # context pixels per field pixel
        crop = _affine_recut(ctx, half * s + (c.x - round(c.x)) * s, half * s + (c.y - round(c.y)) * s, side * s, rng)
        out[i] = crop if smap is None else smap.apply(crop)
    return out


#: Random stain changes are drawn from a fixed, seeded pool of this many lookup tables (building one costs
#: ~0.2 s, so each is built on first use; indexing a crop ~2 ms): every view still gets one of many stains.
STAIN_POOL = 96
_POOL: dict[int, np.ndarray] = {}


def _stain_lut(i: int) -> np.ndarray:
    """Draw ``i`` of the pool: ``shifts.random_stain`` as a 64-level 3-D lookup table (262,144 x 3, flattened)."""
    if i not in _POOL:
        from allmil_cli.train.shifts import random_stain

        grid = np.stack(np.meshgrid(*[np.arange(64, dtype=np.uint8) * 4 + 2] * 3, indexing="ij"), -1).reshape(-1, 1, 3)
        _POOL[i] = random_stain(np.random.default_rng([20261127, i]))(grid).reshape(-1, 3)
    return _POOL[i]


def _apply_lut(lut: np.ndarray):
    def apply(a: np.ndarray) -> np.ndarray:
        q = (a >> 2).astype(np.int32)
        return np.take(lut, (q[..., 0] << 12) | (q[..., 1] << 6) | q[..., 2], axis=0)

    return apply


def _affine_recut(ctx: np.ndarray, cx: float, cy: float, side: float, rng: np.random.Generator,
                  size: int = CROP_SIZE) -> np.ndarray:
    """Rotation / flip / scale +-15 % / translation +-6 % re-cut of a ``side``-pixel window centred at (cx, cy):
    output pixel (u, v) samples ``centre + R * S * F * (u - size/2, v - size/2) + t`` (no shear)."""
    theta = rng.uniform(0, 2 * math.pi)
    s = side * rng.uniform(0.85, 1.15) / size
    tx, ty = rng.uniform(-0.06, 0.06, 2) * side
    flip = -1.0 if rng.random() < 0.5 else 1.0
    c, sn = math.cos(theta), math.sin(theta)
    a, b = c * s * flip, -sn * s
    d, e = sn * s * flip, c * s
    u0 = v0 = size / 2.0
    im = Image.fromarray(np.ascontiguousarray(ctx)).transform(
        (size, size), Image.AFFINE, (a, b, cx + tx - a * u0 - b * v0, d, e, cy + ty - d * u0 - e * v0), resample=Image.BILINEAR)
    return np.asarray(im)


def recipe_views(rgb: np.ndarray, cells: list[Cell], recipe: Recipe, rng: np.random.Generator) -> np.ndarray:
    """uint8 (len(cells), 1 + n_aug, 224, 224, 3) for a recipe; view 0 = the exact inference crop (normalised
    with the field's own anchor colours when the recipe normalises, as ``Pipeline`` does)."""
    if not recipe.domain_aug and not recipe.stain_norm:
        return cell_views(rgb, cells, recipe.n_aug, rng)
    from allmil_cli.stages.normalize import stain_map
    from allmil_cli.stages.scale import measure_field, thumbnail

    out = np.empty((len(cells), 1 + recipe.n_aug, CROP_SIZE, CROP_SIZE, 3), np.uint8)
    stats = measure_field(rgb, cells[0].rbc_px)
    smap = stain_map(stats) if recipe.stain_norm and stats.measured else None
    for i, c in enumerate(cells):
        crop = crop_cells(rgb, np.array([[c.x, c.y]]), c.rbc_px)[0]
        out[i, 0] = crop if smap is None else smap.apply(crop)
    if recipe.domain_aug:
        thumb, _ = thumbnail(rgb)
        for j in range(recipe.n_aug):
            out[:, 1 + j] = _domain_view(rgb, cells, rng, thumb, recipe.stain_norm)
    else:
        for i, c in enumerate(cells):
            for j in range(recipe.n_aug):
                crop = augmented_crop(rgb, c.x, c.y, c.rbc_px, rng)
                out[i, 1 + j] = crop if smap is None else smap.apply(crop)
    return out
