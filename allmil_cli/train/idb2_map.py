"""Where was each ALL-IDB2 crop cut from? Template matching of the 260 crops into the 108 ALL-IDB1 fields.

ALL-IDB2's file names do not name their source field, yet every crop is a verbatim window of an
ALL-IDB1 image. Knowing the source is needed twice: protocol 1 masks those cells out of the ALL-IDB1
test images, and protocol 2 must keep a crop out of training whenever its source field is a test image.

Method (numpy + scipy only):
1. grey-level images, box-downscaled by 4 (crop 257 px -> 64 px);
2. normalised cross-correlation (FFT, ``scipy.signal.fftconvolve`` with local-variance normalisation)
   of each crop against every field of the same label first (blast crops come from ALL fields, normal
   crops from healthy ones); if the best score is below 0.9 the other label's fields are searched too;
3. refine at full resolution: exact NCC in a +-6 px window around the coarse hit;
4. cell centre = crop centre in field coordinates (edge crops, smaller than 257 px, are assumed to be
   clipped by the field border, so the centre is moved accordingly).

The mapping (crop -> field, x, y, score) is cached as JSON at ``.cache/idb2_map.json`` (derived data,
git-ignored); ``python -m allmil_cli.train.idb2_map`` recomputes it (~3-5 min on one core).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from allmil_cli.train.data import load_rgb, read_all_idb1, read_all_idb2

CACHE = Path(__file__).resolve().parents[2] / ".cache"
MAP_FILE = CACHE / "idb2_map.json"
_DS = 4
_FULL = 257


@dataclass(frozen=True)
class CropSource:
    crop: str  # ALL-IDB2 stem, e.g. "Im001_1"
    field: str  # ALL-IDB1 stem
    x: float  # cell centre in field pixels
    y: float
    score: float  # full-resolution NCC of the match (1.0 = identical pixels)


def _grey(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)


def _down(g: np.ndarray, f: int = _DS) -> np.ndarray:
    h, w = (g.shape[0] // f) * f, (g.shape[1] // f) * f
    return g[:h, :w].reshape(h // f, f, w // f, f).mean(axis=(1, 3))


def _ncc_map(image: np.ndarray, tmpl: np.ndarray) -> np.ndarray:
    from scipy.signal import fftconvolve

    image = image.astype(np.float64)
    tmpl = tmpl.astype(np.float64)
    th, tw = tmpl.shape
    t = tmpl - tmpl.mean()
    tn = np.sqrt((t * t).sum()) + 1e-6
    corr = fftconvolve(image, t[::-1, ::-1], mode="valid")
    ii = np.pad(image, ((1, 0), (1, 0))).cumsum(0).cumsum(1)
    ii2 = np.pad(image * image, ((1, 0), (1, 0))).cumsum(0).cumsum(1)

    def win(a):
        return a[th:, tw:] - a[:-th, tw:] - a[th:, :-tw] + a[:-th, :-tw]

    n = th * tw
    s, s2 = win(ii), win(ii2)
    var = np.maximum(s2 - s * s / n, 1e-3 * n)
    return corr / (np.sqrt(var) * tn)


def _refine(field_g: np.ndarray, crop_g: np.ndarray, x0: int, y0: int, r: int = 6) -> tuple[int, int, float]:
    th, tw = crop_g.shape
    t = crop_g - crop_g.mean()
    tn = np.sqrt((t * t).sum()) + 1e-6
    best = (x0, y0, -2.0)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            x, y = x0 + dx, y0 + dy
            if x < 0 or y < 0 or x + tw > field_g.shape[1] or y + th > field_g.shape[0]:
                continue
            w = field_g[y : y + th, x : x + tw]
            w = w - w.mean()
            s = float((w * t).sum() / ((np.sqrt((w * w).sum()) + 1e-6) * tn))
            if s > best[2]:
                best = (x, y, s)
    return best


def _centre(x0: int, y0: int, w: int, h: int, W: int, H: int) -> tuple[float, float]:
    half = _FULL // 2

    def one(p0, size, full):
        if size >= _FULL - 1:
            return p0 + size / 2.0
        if p0 <= 0:
            return size - half - 1.0
        if p0 + size >= full:
            return p0 + half
        return p0 + size / 2.0

    return one(x0, w, W), one(y0, h, H)


def compute_map(verbose: bool = True) -> list[CropSource]:
    fields = read_all_idb1()
    crops = read_all_idb2()
    fg = {}
    fsmall = {}
    for f in fields:
        g = _grey(load_rgb(f.path))
        fg[f.name] = g
        fsmall[f.name] = _down(g)
    out: list[CropSource] = []
    for i, c in enumerate(crops):
        cg = _grey(load_rgb(c.path))
        cs = _down(cg)
        # Candidate order: the same-named field first (often, not always, the source), then fields of
        # the same label, then the rest; stop as soon as a near-verbatim hit (NCC >= 0.97) is found.
        same = sorted((f for f in fields if f.label == c.label), key=lambda f: f.name != c.name)
        other = [f for f in fields if f.label != c.label]
        best = ("", 0, 0, -2.0)
        for group in (same, other):
            for f in group:
                m = _ncc_map(fsmall[f.name], cs)
                k = int(np.argmax(m))
                s = float(m.flat[k])
                if s > best[3]:
                    yy, xx = divmod(k, m.shape[1])
                    best = (f.name, xx, yy, s)
                if best[3] >= 0.97:
                    break
            if best[3] >= 0.9:
                break
        name, xx, yy, _ = best
        g = fg[name]
        x, y, s = _refine(g, cg, xx * _DS, yy * _DS)
        cx, cy = _centre(x, y, cg.shape[1], cg.shape[0], g.shape[1], g.shape[0])
        out.append(CropSource(c.name, name, float(cx), float(cy), float(s)))
        if verbose:
            print(f"{i + 1}/{len(crops)} {c.name} -> {name} ({cx:.0f},{cy:.0f}) ncc={s:.4f}", flush=True)
    return out


def load_map(recompute: bool = False) -> dict[str, CropSource]:
    """crop stem -> CropSource, computed once and cached in ``.cache/idb2_map.json``."""
    if MAP_FILE.exists() and not recompute:
        rows = json.loads(MAP_FILE.read_text())
    else:
        rows = [s.__dict__ for s in compute_map()]
        MAP_FILE.parent.mkdir(parents=True, exist_ok=True)
        MAP_FILE.write_text(json.dumps(rows, indent=1))
    return {r["crop"]: CropSource(**r) for r in rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recompute", action="store_true")
    a = ap.parse_args()
    m = load_map(recompute=a.recompute)
    scores = np.array([s.score for s in m.values()])
    print(f"{len(m)} crops mapped; NCC min {scores.min():.4f} median {np.median(scores):.4f}; "
          f"{(scores < 0.95).sum()} below 0.95; {len({s.field for s in m.values()})} source fields")


if __name__ == "__main__":
    main()
