"""Automatic magnification estimate: the apparent red-cell diameter of a smear field.

Every stage that needs to know "how big is a cell in this image" (the detector's input scaling and
the size of each cell crop) uses one number: the red-blood-cell diameter in pixels, ``rbc_px``.
Red cells are the most numerous and most uniform objects in a peripheral smear, so their size is a
good ruler across cameras and objectives.

Method (numpy + scipy.ndimage; ~35 ms for the thumbnail of a 2592x1944 field, ~25 ms for the ruler on it):
1. downsample so the long side is 512 px;
2. foreground = pixels redder than the background (R - G above an Otsu threshold): red cells and
   stained white cells, not the grey-blue plasma background;
3. fill holes (central pallor), open once to cut thin bridges;
4. for each connected component take the largest inscribed radius (max of the distance transform).
   Touching red cells merge into chains but a chain's inscribed radius is still one cell's radius;
5. the area-weighted median of those radii, times two, is the diameter.

Measured against the BCCD red-cell boxes this estimate is ~1.2x the box size (boxes are loose and
merged chains bias it up); everything downstream is calibrated on this estimate itself, so only its
consistency matters. Override with ``--cell-size`` / ``rbc_px=`` when an image defeats it.
"""

from __future__ import annotations

from types import ModuleType

import numpy as np
from PIL import Image

from allmil_cli.types.field import FieldStats
from allmil_cli.types.resample import Shrinker


def ndimage() -> ModuleType:
    """``scipy.ndimage``, imported on first use: its import takes ~0.3 s, which a process that never measures a field
    (the main process of a run with worker processes) does not pay at start-up."""
    from scipy import ndimage as ndi

    return ndi


#: Returned when the field has no usable foreground (blank or saturated image); ALL-IDB1-like.
DEFAULT_RBC_PX = 85.0
_THUMB_SIDE = 512


def _otsu(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, 256, (0.0, 256.0))
    p = hist / max(hist.sum(), 1)
    w = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    between = (mu[-1] * w - mu) ** 2 / (w * (1.0 - w) + 1e-12)
    return float(edges[int(np.argmax(between))])


#: Red cells are resampled to this many pixels before the sharpness measure.
SHARPNESS_RBC_PX = 16.0


#: Pillow ``reducing_gap`` of the thumbnail resize. None (the default): one full antialiased bilinear resize,
#: the ruler every model and QC threshold was calibrated on (~34 ms on a 2592x1944 field). A box reduce first is
#: cheaper (1.0: ~8 ms; 1.5: ~11 ms) but moves the ruler: on all 108 ALL-IDB1 fields rbc_px changed on 24 (1.0,
#: max 7.5 %) and 23 (1.5, max 8.2 %; 2.0 moved 8 by up to 27.7 %), 0 of 364 BCCD. Judged on protocol 3 with the
#: held-out fold models (issue 8, recipe v2pbc, shifts none / res20 / res14 / hue+20 / blur): with 1.5, 1-2 of the
#: 108 patient calls flip per shift at p 0.5 and up to 4 at the shipped threshold, single p_all moving by up to
#: 0.92, while the aggregate metrics stay put (shift none: sensitivity 100 %, specificity 91.5 % either way).
#: Kept exact: ~23 ms per field (~6 % of its CPU) does not pay for moving individual patients' calls.
THUMB_REDUCING_GAP: float | None = None


def thumbnail(rgb: np.ndarray, shrinker: Shrinker | None = None) -> tuple[np.ndarray, float]:
    """The field downscaled so its long side is 512 px (float32), and the downscale factor. ``shrinker``: the field's
    shared :class:`~allmil_cli.types.resample.Shrinker` (its Pillow copy, and any box reduce, then serve the detector too)."""
    h, w = rgb.shape[:2]
    factor = max(h, w) / _THUMB_SIDE
    if factor > 1.0:
        shrinker = shrinker if shrinker is not None else Shrinker(rgb)
        small = shrinker.resize((max(1, round(w / factor)), max(1, round(h / factor))), THUMB_REDUCING_GAP)
        return small.astype(np.float32), factor
    return rgb.astype(np.float32), 1.0


def _sharpness(thumb: np.ndarray, thumb_rbc_px: float) -> float:
    """Fine-detail ratio of the grey thumbnail resampled so red cells are ``SHARPNESS_RBC_PX`` wide (left as is
    when smaller): mean |Laplacian| over mean |Laplacian| after a 1-px Gaussian blur. In focus, red-cell rims
    and chromatin carry fine detail the blur removes (ratio ~1.8-3.3 on ALL-IDB1, BCCD and PBC fields); an
    already blurred field loses little more (ratio -> 1). Independent of stain, brightness and cell density."""
    g = (thumb[..., 0] + thumb[..., 1] + thumb[..., 2]) / np.float32(3.0)  # thumb.mean(axis=2), 8x faster
    f = SHARPNESS_RBC_PX / max(thumb_rbc_px, 1e-3)
    if f < 1.0:
        h, w = g.shape
        g = np.asarray(Image.fromarray(g).resize((max(1, round(w * f)), max(1, round(h * f))), Image.BILINEAR), np.float32)
    if min(g.shape) < 16:
        return float("nan")

    def lap(x: np.ndarray) -> float:
        return float(np.abs(x[1:-1, 1:-1] * 4.0 - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]).mean())

    smooth = lap(ndimage().gaussian_filter(g, 1.0))
    return lap(g) / smooth if smooth > 1e-3 else float("nan")


def anchor_colours(thumb: np.ndarray) -> dict:
    """Median colour of red cells and of the background: nuclear stain (blue-purple) is set aside first,
    then the reddest pixels (Otsu on R - G) are red cells and the rest background."""
    px = thumb[::2, ::2].reshape(-1, 3)
    r, g, b = px[:, 0], px[:, 1], px[:, 2]
    rest = px[~((b > r) & (b - g > 30.0))]
    if len(rest) < 64:
        return {}
    redness = np.clip((rest[:, 0] - rest[:, 1]) * 2.0 + 128.0, 0.0, 255.0)
    if float(redness.max() - redness.min()) < 8.0:
        return {}
    red = redness > _otsu(redness)
    if red.sum() < 16 or (~red).sum() < 16:
        return {}
    return {"rbc_rgb": tuple(float(v) for v in np.median(rest[red], axis=0)),
            "background_rgb": tuple(float(v) for v in np.median(rest[~red], axis=0))}


def measure_field(rgb: np.ndarray, rbc_px: float | None = None, shrinker: Shrinker | None = None) -> FieldStats:
    """Ruler, anchor colours and sharpness of an RGB uint8 field (``rbc_px`` given: the ruler is not estimated;
    ``shrinker``: the field's shared downscales, see :func:`thumbnail`). Red cells narrower than ``FINE_THUMB_PX`` on
    the thumbnail are measured again on a finer one (:func:`finer_estimate`)."""
    shrinker = shrinker if shrinker is not None or max(rgb.shape[:2]) <= _THUMB_SIDE else Shrinker(rgb)
    a, factor = thumbnail(rgb, shrinker)
    size = None
    if rbc_px is None:
        size = finer_estimate(rgb, _estimate(a, factor), factor, shrinker)
    return measure_thumbnail(a, factor, rbc_px=rbc_px, estimate=size)


def measure_thumbnail(a: np.ndarray, factor: float, rbc_px: float | None = None, estimate: float | None = None) -> FieldStats:
    """:func:`measure_field` on a ready thumbnail (float32 RGB, long side 512; ``factor``: field px per thumbnail px),
    e.g. one resized on a GPU (:mod:`allmil_cli.executors.gpu`; no finer second look there). ``estimate``: the ruler's reading
    when already taken."""
    size = float(rbc_px) if rbc_px is not None else (estimate if estimate is not None else _estimate(a, factor))
    measured = size is not None
    size = DEFAULT_RBC_PX if size is None else size
    colours = anchor_colours(a)
    return FieldStats(size, sharpness=_sharpness(a, size / factor), measured=measured and bool(colours), **colours)


#: Low end of the ruler (``docs/ruler.md``). Below ~40 px the redness (R - G) of red cells is carried by the JPEG
#: chroma alone, stored at half resolution and quantised hardest: at 10-20 px red cells and JPEG quality 70 the
#: redness mask of a pale field melts into one blob (or vanishes) and the ruler read up to 22x the size (ALL-IDB1);
#: on a field crowded with blasts, Otsu's redness threshold can fall between the purple nuclei and the red cells, and
#: the ruler then measures the white cells. Luminance keeps full resolution and, nuclear stain left out, shows the red
#: cells alone. So when a field may hold small cells (no larger than the thumbnail, or a redness reading below
#: ``LOWRES_RBC_PX``, above ``SUSPECT_SIDE`` x the field's short side, or absent) the red cells are measured on
#: luminance too (``_luma_mask``, in ruler units: x ``LUMA_RULER_SCALE``). Where that reads below ``LOWRES_RBC_PX``
#: and the redness reads more than ``REDNESS_MAX`` x it (or nothing), the luminance reading is the ruler. The
#: full-resolution readings the models are calibrated on are untouched: the same on all 108 ALL-IDB1 and 364 BCCD
#: fields and on 599 of 600 PBC images (the exception, a 366 px image whose red cells' wide pallor opens their rims,
#: now reads 32 instead of 72 px: docs/ruler.md). Constants chosen on BCCD train+val and the PBC design half.
LOWRES_RBC_PX = 40.0
SUSPECT_SIDE = 0.2
REDNESS_MAX = 1.25
#: The luminance reading is first taken on every step-th pixel of the thumbnail (red cells of ``COARSE_MARGIN`` x
#: ``LOWRES_RBC_PX`` field px still ``COARSE_CELL_PX`` wide there; ~1/25 of the cost on a BCCD or PBC field); a field
#: whose red cells read at least ``COARSE_MARGIN`` x ``LOWRES_RBC_PX`` there is left to the redness reading.
COARSE_MARGIN = 1.25
COARSE_CELL_PX = 8.0
#: Luminance reading -> ruler units: design fields (BCCD train+val, PBC design half) resized to 10-20 px red cells
#: (their camera's median ruler reading at full resolution x the factor), no JPEG; the median known size / luminance
#: reading was 1.18 on BCCD and 0.99 on PBC; 1.08 is their geometric mean.
LUMA_RULER_SCALE = 1.08
#: A thumbnail whose red cells read narrower than this is too coarse to measure them (a wide field at a low
#: magnification: 20 px red cells on a 2592 px field are 4 px on the 512 px thumbnail); the field is measured again on
#: a thumbnail where they are ``FINE_THUMB_TARGET`` px (long side at most ``FINE_THUMB_MAX``). Full-resolution ALL-IDB1
#: fields read >= 13.4 px on their thumbnail: never re-measured.
FINE_THUMB_PX = 12.0
FINE_THUMB_TARGET = 20.0
FINE_THUMB_MAX = 2048


def finer_estimate(rgb: np.ndarray, first: float | None, factor: float, shrinker: Shrinker | None = None) -> float | None:
    """The ruler's reading ``first`` (on the thumbnail, ``factor`` field px per thumbnail px), or, when the red cells
    came out narrower than ``FINE_THUMB_PX`` thumbnail pixels (or not at all) on a downscaled thumbnail, the reading on
    finer ones: each at most half the previous factor (cells that small merge, so the reading itself can be too
    large), down to the field itself or a long side of ``FINE_THUMB_MAX``."""
    h, w = rgb.shape[:2]
    floor = max(1.0, max(h, w) / FINE_THUMB_MAX)
    reading = first
    while factor > floor and (reading is None or reading / factor < FINE_THUMB_PX):
        fine = max(floor, min(factor / 2.0, reading / FINE_THUMB_TARGET if reading is not None else factor / 2.0))
        shrinker = shrinker if shrinker is not None else Shrinker(rgb)
        small = shrinker.resize((max(1, round(w / fine)), max(1, round(h / fine))), THUMB_REDUCING_GAP)
        second = _estimate(small.astype(np.float32), fine)
        factor = fine
        reading = second if second is not None else reading
    return reading


def _estimate(a: np.ndarray, factor: float) -> float | None:
    redness = np.clip((a[..., 0] - a[..., 1]) * 2.0 + 128.0, 0.0, 255.0)
    if float(redness.max() - redness.min()) < 8.0:
        return None
    red_mask = redness > _otsu(redness)
    red = _ruler(fill_holes(open_cross(red_mask)), factor)
    short = min(a.shape[:2]) * factor
    if factor > 1.0 and red is not None and LOWRES_RBC_PX <= red <= SUSPECT_SIDE * short:
        return red  # the usual field: one look
    step = int(COARSE_MARGIN * LOWRES_RBC_PX / factor / COARSE_CELL_PX)
    if step > 1 and min(a.shape[:2]) // step >= 32:  # a cheap first look at every step-th pixel
        coarse_mask = _luma_mask(a[::step, ::step])
        coarse = _ruler(fill_holes(open_cross(coarse_mask)), step * factor, RMIN_LOWRES) if coarse_mask is not None else None
        if coarse is not None and coarse >= COARSE_MARGIN * LOWRES_RBC_PX:
            return red  # clearly large red cells
    luma = _luma_mask(a)
    if luma is None:
        return red
    small = _ruler(fill_holes(open_cross(luma)), factor, RMIN_LOWRES)
    if small is None or small >= LOWRES_RBC_PX:
        return red
    small *= LUMA_RULER_SCALE
    return small if red is None or red > REDNESS_MAX * small else red


def _luma_mask(a: np.ndarray) -> np.ndarray | None:
    """Red cells on luminance: green absorption (255 - G) above its Otsu threshold, nuclear stain (blue-purple, as in
    :func:`anchor_colours`) left out of both the threshold and the mask (dark nuclei would pull Otsu's threshold
    between nuclei and the rest, in a field full of blasts)."""
    g = 255.0 - a[..., 1]
    purple = (a[..., 2] > a[..., 0]) & (a[..., 2] - a[..., 1] > 30.0)
    rest = g[~purple]
    if rest.size < 64 or float(rest.max() - rest.min()) < 8.0:
        return None
    return (g > _otsu(rest)) & ~purple


def open_cross(mask: np.ndarray) -> np.ndarray:
    """``ndi.binary_opening(mask, iterations=1)`` (3x3 cross, outside = False), with array shifts: ~10x faster."""
    m = np.pad(mask, 1)
    eroded = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
    e = np.pad(eroded, 1)
    return e[1:-1, 1:-1] | e[:-2, 1:-1] | e[2:, 1:-1] | e[1:-1, :-2] | e[1:-1, 2:]


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``ndi.binary_fill_holes(mask)``: background regions (4-connected) that do not reach the border become
    foreground. Labelled once instead of dilated from the border pixel by pixel: ~5x faster, same result."""
    lab, n = ndimage().label(~mask)
    if n == 0:
        return mask
    border = np.zeros(n + 1, dtype=bool)
    for edge in (lab[0], lab[-1], lab[:, 0], lab[:, -1]):
        border[edge] = True
    border[0] = True  # label 0 is the foreground itself
    return mask | ~border[lab]


#: Smallest component (inscribed radius, thumbnail px) the ruler counts: red-cell fragments and specks below it are
#: left out. 2 instead of 3 on the luminance mask, which only measures small cells (6-8 px red cells have radius 3-4
#: and lose a pixel to the opening).
RMIN = 3.0
RMIN_LOWRES = 2.0


def _ruler(mask: np.ndarray, factor: float, rmin: float = RMIN) -> float | None:
    labels, n = ndimage().label(mask)
    if n == 0:
        return None
    dist = ndimage().distance_transform_edt(mask)
    radius = np.zeros(n + 1, dtype=np.float64)
    np.maximum.at(radius, labels[mask], dist[mask])  # per-component max (ndi.maximum sorts: 30x slower)
    area = np.bincount(labels.ravel(), minlength=n + 1).astype(np.float64)
    radius, area = radius[1:], area[1:]
    keep = radius >= rmin
    if keep.sum() < 2:
        return None
    radius, area = radius[keep], area[keep]
    order = np.argsort(radius)
    cum = np.cumsum(area[order])
    median_radius = radius[order][int(np.searchsorted(cum, cum[-1] / 2.0))]
    return float(2.0 * median_radius * factor)


def estimate_rbc_diameter(rgb: np.ndarray) -> float:
    """Apparent red-cell diameter of an RGB uint8 field, in that field's pixels (DEFAULT_RBC_PX when unmeasurable)."""
    shrinker = Shrinker(rgb) if max(rgb.shape[:2]) > _THUMB_SIDE else None
    a, factor = thumbnail(rgb, shrinker)
    size = finer_estimate(rgb, _estimate(a, factor), factor, shrinker)
    return DEFAULT_RBC_PX if size is None else size


#: A white cell's diameter is about this many red-cell diameters (box drawn around each detection).
WBC_RBC_RATIO = 1.6
#: Side of the square cell crop fed to the embedder, in red-cell diameters. On ALL-IDB1 (rbc ~85 px)
#: this gives ~255 px, the framing of the ALL-IDB2 crops (257 px) the embedder is trained on.
CROP_RBC_RATIO = 3.0
