"""White-blood-cell detection with the shipped ONNX centre-heatmap model (numpy + onnxruntime only).

The model (``weights/detector.onnx``, built by :mod:`allmil_cli.train.detector`) takes an RGB field in
0..255 at a *canonical magnification* (red cells ``allmil.canonical_rbc_px`` pixels across) and returns a
stride-4 heatmap of white-cell centres in 0..1. :func:`detect_cells` rescales the field with the
caller's red-cell ruler (:func:`allmil_cli.stages.scale.estimate_rbc_diameter`), runs the model once over the
whole field, and decodes the heatmap peaks back to full-resolution pixel coordinates.

Never import torch here: this module is what the CLI uses at inference time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from allmil_cli.types.resample import Shrinker
from allmil_cli.stages.scale import WBC_RBC_RATIO, ndimage, open_cross

#: Peaks closer than this many red-cell diameters are one cell (the weaker one is dropped). 0.6, not 0.8:
#: on out-of-fold ALL-IDB1 0.8 merged touching blasts (recall 98.4% -> 99.6% at 0.6, same FP count;
#: docs/detector_results.md).
MIN_PEAK_DIST_RBC = 0.6
_DEFAULTS = {"stride": 4.0, "canonical_rbc_px": 20.0, "threshold": 0.3}


@dataclass(frozen=True)
class Decoding:
    """How heatmap peaks become cells (distances in red-cell diameters at the detector's scale).

    A peak closer than ``min_dist_rbc`` to a stronger kept peak is that cell. A peak up to ``merge_dist_rbc`` away
    is that cell too when the heatmap never falls below ``valley`` x its own score on the straight line between
    the two: one cell seen as two maxima on a ridge (a lobed nucleus, a large cell), not two cells with a valley
    between them. The bar rises linearly with the distance, from ``valley`` at ``min_dist_rbc`` to ``valley_far`` at
    ``merge_dist_rbc`` (None: the same). ``merge_dist_rbc = 0`` switches the valley test off."""

    min_dist_rbc: float = MIN_PEAK_DIST_RBC
    merge_dist_rbc: float = 0.0
    valley: float = 1.0
    valley_far: float | None = None
    #: A kept cell is the twin (:attr:`Detection.same_as`) of the nearest stronger kept cell when that one is closer
    #: than ``twin_dist_rbc`` and the heatmap between them never falls below ``twin_valley`` x the weaker score: one
    #: cell (two lobes of a granulocyte) or two touching cells. The patient stage counts the two once when neither is
    #: blast-like (:mod:`allmil_cli.stages.count`). ``twin_dist_rbc = 0`` switches it off.
    twin_dist_rbc: float = 0.0
    twin_valley: float = 0.0


#: The shipped decoding: one suppression radius of 0.6 red cell, as before; the valley test is off. Measured, not
#: shipped (docs/detector_results.md, section 5): the setting chosen on design fields (valley from 0.5 at 0.6 red cell
#: to 1.0 at 1.0 red cell) cut duplicates on PBC (6.0 -> 4.9 % at full size) and BCCD test (<= 1.3 % at every size),
#: but on held-out ALL-IDB1 it merged touching blasts: blast detection 100.0 -> 99.0 % at full size, 99.4 -> 98.2 %
#: after JPEG 70, while removing 4 of 9 duplicates among 15 fewer detections. On design fields every setting that
#: removed PBC duplicates also merged touching blasts (the heatmap ridge between two touching blasts and between two
#: lobes of one granulocyte overlap: ``python -m allmil_cli.train.counting design``, pair statistics).
#: Twins: 1.1 red cells, heatmap >= 0.5 x between, chosen on design fields (BCCD train+val, the PBC design half,
#: ALL-IDB1 through fold models that trained on it) among 0.8-1.2 red cells x no / 0.3 / 0.5 bars, as the shortest
#: distance within 5 % of the fewest count errors (duplicates + cells lost to a merge), and judged on held-out fields:
#: ``python -m allmil_cli.train.counting_once`` (docs/detector_results.md, section 7).
DECODING = Decoding(twin_dist_rbc=1.1, twin_valley=0.5)


@dataclass(frozen=True)
class Detection:
    x: float  # cell centre, full-resolution pixels of the input field
    y: float
    score: float  # 0..1
    #: scores of the weaker heatmap peaks taken as this same cell (see :class:`Decoding`), strongest first
    merged_scores: tuple[float, ...] = ()
    #: index (in the same field's list) of the nearest stronger detection within ``Decoding.twin_dist_rbc``: perhaps
    #: the same cell; -1: none
    same_as: int = -1


def model_meta(session) -> dict[str, float]:
    """``allmil.stride``, ``allmil.canonical_rbc_px`` and ``allmil.threshold`` from the ONNX metadata."""
    meta = session.get_modelmeta().custom_metadata_map
    out = dict(_DEFAULTS)
    for key in out:
        if f"allmil.{key}" in meta:
            out[key] = float(meta[f"allmil.{key}"])
    return out


def prepare_input(rgb: np.ndarray, rbc_px: float, canonical_rbc_px: float, multiple: int = 32,
                  shrinker: Shrinker | None = None):
    """Resize ``rgb`` so red cells are ``canonical_rbc_px`` wide and pad to a multiple of ``multiple``.

    Padding uses the field's median colour (as in training). Returns (float32 [1,3,H,W], sx, sy) where
    ``sx``/``sy`` map full-resolution coordinates to model-input coordinates. ``shrinker``: the field's shared
    downscales (:mod:`allmil_cli.types.resample`; the ruler's box reduce is reused when the factor matches).
    """
    if rgb.ndim != 3 or rgb.shape[2] < 3:
        raise ValueError("expected an RGB image (H, W, 3)")
    rgb = np.ascontiguousarray(rgb[..., :3], dtype=np.uint8)
    h, w = rgb.shape[:2]
    f = float(canonical_rbc_px) / max(float(rbc_px), 1e-3)
    nw, nh = max(1, int(round(w * f))), max(1, int(round(h * f)))
    if shrinker is None or shrinker.rgb.shape != rgb.shape:  # another field's, or a 4-channel one
        shrinker = Shrinker(rgb)
    small = shrinker.resize((nw, nh), 1.0)
    ph = -(-nh // multiple) * multiple
    pw = -(-nw // multiple) * multiple
    fill = np.median(small[::4, ::4].reshape(-1, 3), axis=0).astype(np.float32)
    x = np.empty((1, 3, ph, pw), dtype=np.float32)
    x[0] = fill[:, None, None]
    x[0, :, :nh, :nw] = small.transpose(2, 0, 1)
    return x, nw / w, nh / h


def decode_heatmap(heat: np.ndarray, threshold: float, min_dist: float, merge_dist: float = 0.0, valley: float = 1.0,
                  return_merged: bool = False, valley_far: float | None = None):
    """Peaks of a 2-D heatmap: (K, 3) rows of (x, y, score) in heatmap cells, strongest first.

    A peak is a cell >= threshold that equals the max of its 3x3 neighbourhood (CenterNet's max-pool
    NMS); its position is refined to the score-weighted centroid of that 3x3 neighbourhood, and
    ``x, y`` are cell *centres* (cell j covers [j, j+1), so its centre is j + 0.5). Greedy, strongest first: a
    peak closer than ``min_dist`` cells to a kept peak is merged into the nearest such; one closer than
    ``merge_dist`` is merged into the nearest kept peak it reaches without the heatmap dipping below ``valley`` x its
    own score (rising linearly to ``valley_far`` x at ``merge_dist``; :class:`Decoding`). ``return_merged``: also the scores merged into each kept peak (a list of lists).
    """
    heat = np.asarray(heat, dtype=np.float32)
    h, w = heat.shape
    padded = np.pad(heat, 1, mode="constant", constant_values=-np.inf)
    mx = np.full_like(heat, -np.inf)
    for dy in range(3):
        for dx in range(3):
            np.maximum(mx, padded[dy : dy + h, dx : dx + w], out=mx)
    ys, xs = np.nonzero((heat >= mx) & (heat >= threshold))
    if len(ys) == 0:
        empty = np.zeros((0, 3), dtype=np.float32)
        return (empty, []) if return_merged else empty
    scores = heat[ys, xs]
    order = np.argsort(-scores, kind="stable")
    ys, xs, scores = ys[order], xs[order], scores[order]
    # a flat top gives several equal cells next to each other: one maximum (the first), not several peaks
    first = [i for i in range(len(ys)) if not any(abs(int(ys[i]) - int(ys[j])) <= 1 and abs(int(xs[i]) - int(xs[j])) <= 1
                                                  for j in range(i))]
    ys, xs, scores = ys[first], xs[first], scores[first]
    # 3x3 weighted centroid (non-negative weights; -inf border -> 0)
    zpad = np.pad(heat, 1, mode="constant", constant_values=0.0)
    offs = np.arange(-1, 2)
    win = np.stack([zpad[ys + 1 + dy, xs + 1 + dx] for dy in offs for dx in offs], axis=1)
    win = np.clip(win, 0.0, None)
    tot = np.maximum(win.sum(axis=1), 1e-12)
    ddx = np.tile(offs, 3).astype(np.float32)
    ddy = np.repeat(offs, 3).astype(np.float32)
    fx = xs + 0.5 + (win * ddx).sum(axis=1) / tot
    fy = ys + 0.5 + (win * ddy).sum(axis=1) / tot
    far = valley if valley_far is None else float(valley_far)

    def _bar(d: float) -> float:
        span = float(merge_dist) - float(min_dist)
        return valley if span <= 0 else valley + (far - valley) * min(max((d - float(min_dist)) / span, 0.0), 1.0)

    keep: list[int] = []
    merged: list[list[float]] = []
    md2 = float(min_dist) ** 2
    reach2 = max(float(merge_dist), float(min_dist)) ** 2
    for i in range(len(fx)):
        into = -1
        if keep:
            k = np.asarray(keep)
            d2 = (fx[k] - fx[i]) ** 2 + (fy[k] - fy[i]) ** 2
            near = np.nonzero(d2 < reach2)[0]
            for n in near[np.argsort(d2[near], kind="stable")]:
                j = int(k[n])
                if d2[n] < md2 or _ridge(heat, fx[j], fy[j], fx[i], fy[i]) >= _bar(float(np.sqrt(d2[n]))) * scores[i]:
                    into = int(n)
                    break
        if into < 0:
            keep.append(i)
            merged.append([])
        else:
            merged[into].append(float(scores[i]))
    kk = np.asarray(keep, dtype=np.int64)
    peaks = np.stack([fx[kk], fy[kk], scores[kk]], axis=1).astype(np.float32)
    return (peaks, merged) if return_merged else peaks


def _ridge(heat: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> float:
    """Lowest heatmap value (bilinear) on the segment between two peaks (cell-centre coordinates)."""
    n = max(2, int(np.ceil(2.0 * np.hypot(x1 - x0, y1 - y0)))) + 1
    t = np.linspace(0.0, 1.0, n)
    px = np.clip(x0 + (x1 - x0) * t - 0.5, 0.0, heat.shape[1] - 1.0)
    py = np.clip(y0 + (y1 - y0) * t - 0.5, 0.0, heat.shape[0] - 1.0)
    ix, iy = np.minimum(px.astype(np.int64), heat.shape[1] - 2), np.minimum(py.astype(np.int64), heat.shape[0] - 2)
    if heat.shape[0] < 2 or heat.shape[1] < 2:
        return float(heat[np.clip(py.round().astype(int), 0, heat.shape[0] - 1), np.clip(px.round().astype(int), 0, heat.shape[1] - 1)].min())
    ax, ay = px - ix, py - iy
    v = (heat[iy, ix] * (1 - ax) * (1 - ay) + heat[iy, ix + 1] * ax * (1 - ay)
         + heat[iy + 1, ix] * (1 - ax) * ay + heat[iy + 1, ix + 1] * ax * ay)
    return float(v.min())


def detect_cells(
    session: "onnxruntime.InferenceSession",  # noqa: F821
    rgb: np.ndarray,
    rbc_px: float,
    threshold: float | None = None,
    shrinker: Shrinker | None = None,
) -> list[Detection]:
    """White cells in an RGB uint8 field whose red cells are ``rbc_px`` pixels across.

    ``threshold`` defaults to the model's ``allmil.threshold`` metadata; ``shrinker``: see :func:`prepare_input`.
    """
    meta = model_meta(session)
    x, sx, sy = prepare_input(rgb, rbc_px, meta["canonical_rbc_px"], shrinker=shrinker)
    name = session.get_inputs()[0].name
    heat = session.run(None, {name: x})[0][0, 0]
    h, w = rgb.shape[:2]
    return heatmap_detections(heat, meta, threshold, w, h, sx, sy)


def heatmap_detections(heat: np.ndarray, meta: dict[str, float], threshold: float | None, w: int, h: int,
                       sx: float, sy: float, decoding: Decoding | None = None) -> list[Detection]:
    """The detector's heatmap (``[H/stride, W/stride]``) -> cells in full-resolution pixels of a ``w`` x ``h`` field
    (``sx``, ``sy``: model-input pixels per field pixel, from :func:`prepare_input`; ``decoding``: :data:`DECODING`
    unless given). Every peak above the threshold is accounted for: kept, or merged into a kept cell
    (``Detection.merged_scores``)."""
    dec = DECODING if decoding is None else decoding
    thr = meta["threshold"] if threshold is None else float(threshold)
    stride, canon = meta["stride"], meta["canonical_rbc_px"]
    cells = canon / stride  # heatmap cells per red-cell diameter
    peaks, merged = decode_heatmap(heat, thr, dec.min_dist_rbc * cells, dec.merge_dist_rbc * cells, dec.valley,
                                   return_merged=True, valley_far=dec.valley_far)
    inside = [i for i, (px, py, _) in enumerate(peaks) if px * stride / sx < w and py * stride / sy < h]  # not padding
    twins = twin_of(peaks[inside], dec.twin_dist_rbc * cells, heat, dec.twin_valley)
    return [Detection(x=min(max(float(peaks[i, 0]) * stride / sx, 0.0), w - 1.0),
                      y=min(max(float(peaks[i, 1]) * stride / sy, 0.0), h - 1.0), score=float(peaks[i, 2]),
                      merged_scores=tuple(merged[i]), same_as=t) for i, t in zip(inside, twins)]


def twin_of(peaks: np.ndarray, dist: float, heat: np.ndarray | None = None, valley: float = 0.0) -> list[int]:
    """For each peak (rows of x, y, score in heatmap cells, strongest first): the index of the nearest stronger peak
    when it is closer than ``dist`` cells and the ``heat`` between the two never falls below ``valley`` x the weaker
    score (no test without ``heat`` or with ``valley`` 0); else -1."""
    out = [-1] * len(peaks)
    if dist <= 0 or len(peaks) < 2:
        return out
    xy = np.asarray(peaks[:, :2], np.float64)
    for i in range(1, len(xy)):
        d = np.hypot(xy[:i, 0] - xy[i, 0], xy[:i, 1] - xy[i, 1])
        j = int(np.argmin(d))
        if d[j] < dist and (heat is None or valley <= 0
                            or _ridge(heat, xy[j, 0], xy[j, 1], xy[i, 0], xy[i, 1]) >= valley * float(peaks[i, 2])):
            out[i] = j
    return out


#: Box = stain extent x these factors (w, h): the median BCCD train+val WBC-box / stain-extent ratios,
#: fitted by ``python -m allmil_cli.train.detector bccd`` (BCCD test AP50 0.950 with these boxes, 0.385
#: with the fixed 1.6 x rbc box: the red-cell ruler barely predicts white-cell size).
BOX_SCALE_WH = (1.174, 1.112)


def stain_extent(rgb: np.ndarray, x: float, y: float, rbc_px: float, t: float = 30.0) -> tuple[float, float]:
    """(w, h) of the nucleus-stain blobs (``B - G > t``, opened) reaching within 0.5 rbc of (x, y),
    searched in a +-1.3 rbc window; the fixed ``WBC_RBC_RATIO * rbc_px`` when nothing is stained."""
    r = int(1.3 * rbc_px)
    x0, y0 = max(int(x) - r, 0), max(int(y) - r, 0)
    win = rgb[y0 : int(y) + r, x0 : int(x) + r]
    fallback = (WBC_RBC_RATIO * rbc_px, WBC_RBC_RATIO * rbc_px)
    if win.size == 0:
        return fallback
    lab, n = ndimage().label(open_cross(win[..., 2].astype(np.int16) - win[..., 1] > t))
    if n == 0:
        return fallback
    # The blobs with a pixel within 0.5 rbc of (x, y): looked up in the square around that disk only; their extent is
    # the union of their bounding boxes (find_objects). The same numbers as taking every labelled pixel (tested), 1.3
    # instead of 1.8 ms per cell.
    reach = 0.5 * rbc_px
    sy0, sx0 = max(int(np.floor(y - y0 - reach)), 0), max(int(np.floor(x - x0 - reach)), 0)
    sub = lab[sy0 : int(np.ceil(y - y0 + reach)) + 1, sx0 : int(np.ceil(x - x0 + reach)) + 1]
    yy, xx = np.nonzero(sub)
    near = set(sub[yy, xx][np.hypot(xx + sx0 + x0 - x, yy + sy0 + y0 - y) < reach].tolist())
    if not near:
        return fallback
    boxes = [s for i, s in enumerate(ndimage().find_objects(lab), start=1) if i in near]
    return (float(max(s[1].stop for s in boxes) - min(s[1].start for s in boxes)),
            float(max(s[0].stop for s in boxes) - min(s[0].start for s in boxes)))


def cell_box(rgb: np.ndarray, x: float, y: float, rbc_px: float) -> tuple[float, float, float, float]:
    """Bounding box (x0, y0, x1, y1) of the white cell centred at (x, y), clipped to the field."""
    sw, sh = stain_extent(rgb, x, y, rbc_px)
    hw, hh = BOX_SCALE_WH[0] * sw / 2.0, BOX_SCALE_WH[1] * sh / 2.0
    h, w = rgb.shape[:2]
    return (max(0.0, x - hw), max(0.0, y - hh), min(float(w), x + hw), min(float(h), y + hh))
