"""Domain shifts: what another lab's stain, camera and magnification do to a field.

Two uses, one set of operations (all morphology-preserving: no shear, no warping):

* :data:`PROTOCOL3` — the fixed family of shifts of protocol 3 (cross-domain evaluation, ``protocol3.py``),
  each a deterministic function of the field (its red-cell size fixes the resolution shifts);
* :func:`random_stain` — a random draw from the same kinds of change, for training augmentation
  (``augment.py``). Its ranges are the usual stain-augmentation ranges of the literature and include the
  protocol-3 magnitudes: protocol 3 therefore measures robustness *within* the family trained for; labs
  outside it are what PBC (a real other hospital) and the QC flags are for.

Operations (uint8 RGB in, uint8 RGB out): hue rotation about the grey axis, HED stain-matrix
perturbation (Ruifrok & Johnston colour deconvolution: optical density -> haematoxylin / eosin / DAB
amounts, each scaled and shifted, then back), saturation, gamma, a per-channel colour cast (the pink /
purple swing of Romanowsky stains), Gaussian blur, and resolution (resampling so red cells are N px across,
then JPEG at a given quality).

``python -m allmil_cli.train.shifts reference`` prints the median background and red-cell colours of the
training fields (the stain-normalisation reference in ``allmil_cli/stages/normalize.py``); ``... preview`` writes
a contact sheet of every protocol-3 shift of one field.
"""

from __future__ import annotations

import argparse
import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

# Ruifrok & Johnston RGB -> stain optical-density vectors (rows: haematoxylin, eosin, DAB), normalised.
_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float64)
_HED = _HED / np.linalg.norm(_HED, axis=1, keepdims=True)
_HED_INV = np.linalg.inv(_HED)


def _f(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(rgb, np.float32) / 255.0


def _u8(a: np.ndarray) -> np.ndarray:
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def hue_rotate(rgb: np.ndarray, degrees: float) -> np.ndarray:
    """Rotate colours about the grey axis (keeps brightness)."""
    t = math.radians(degrees)
    c, s = math.cos(t), math.sin(t)
    k = 1.0 / 3.0
    sq = math.sqrt(k)
    m = np.array([[c + (1 - c) * k, k * (1 - c) - sq * s, k * (1 - c) + sq * s],
                  [k * (1 - c) + sq * s, c + k * (1 - c), k * (1 - c) - sq * s],
                  [k * (1 - c) - sq * s, k * (1 - c) + sq * s, c + k * (1 - c)]], np.float32)
    return _u8(_f(rgb) @ m.T)


def hed_perturb(rgb: np.ndarray, scale: tuple[float, float, float], shift: tuple[float, float, float]) -> np.ndarray:
    """Scale and shift the haematoxylin / eosin / residual stain amounts of each pixel."""
    od = -np.log(np.maximum(_f(rgb), 1.0 / 255.0))
    stains = od.reshape(-1, 3) @ _HED_INV.astype(np.float32)
    stains = stains * np.asarray(scale, np.float32) + np.asarray(shift, np.float32)
    out = np.exp(-(stains @ _HED.astype(np.float32)))
    return _u8(out.reshape(rgb.shape))


def saturation(rgb: np.ndarray, factor: float) -> np.ndarray:
    a = _f(rgb)
    grey = a @ np.array([0.299, 0.587, 0.114], np.float32)
    return _u8(grey[..., None] + (a - grey[..., None]) * factor)


def gamma(rgb: np.ndarray, g: float) -> np.ndarray:
    return _u8(_f(rgb) ** g)


def cast(rgb: np.ndarray, gains: tuple[float, float, float]) -> np.ndarray:
    return _u8(_f(rgb) * np.asarray(gains, np.float32))


def blur(rgb: np.ndarray, sigma: float) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).filter(ImageFilter.GaussianBlur(sigma)))


def jpeg(rgb: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=int(quality))
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def rescale(rgb: np.ndarray, factor: float) -> np.ndarray:
    h, w = rgb.shape[:2]
    size = (max(1, round(w * factor)), max(1, round(h * factor)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR, reducing_gap=2.0))


# ----------------------------------------------------------------------------------- protocol 3 (fixed)
@dataclass(frozen=True)
class Shift:
    """A named shift: ``apply(rgb, rbc_px) -> (rgb', factor)``, ``factor`` = new pixels per old pixel."""

    name: str
    kind: str  # resolution | stain | combined | none
    apply: Callable[[np.ndarray, float], tuple[np.ndarray, float]]


def _colour(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray, float], tuple[np.ndarray, float]]:
    return lambda rgb, rbc: (fn(rgb), 1.0)


def _resolution(target_rbc: float, quality: int = 70, then: Callable[[np.ndarray], np.ndarray] | None = None):
    def apply(rgb: np.ndarray, rbc: float) -> tuple[np.ndarray, float]:
        f = min(1.0, target_rbc / max(rbc, 1e-3))
        if then is not None:
            rgb = then(rgb)
        return jpeg(rescale(rgb, f), quality), f

    return apply


def _hed_strong(rgb: np.ndarray) -> np.ndarray:
    return hed_perturb(rgb, (1.3, 0.7, 1.0), (0.03, -0.03, 0.0))


def _pink_purple(rgb: np.ndarray) -> np.ndarray:
    return cast(rgb, (1.06, 0.88, 1.10))


PROTOCOL3: list[Shift] = [
    Shift("none", "none", lambda rgb, rbc: (rgb, 1.0)),
    Shift("res20+jpeg70", "resolution", _resolution(20.0)),
    Shift("res14+jpeg70", "resolution", _resolution(14.0)),
    Shift("hue+20", "stain", _colour(lambda a: hue_rotate(a, 20.0))),
    Shift("hue-20", "stain", _colour(lambda a: hue_rotate(a, -20.0))),
    Shift("hed", "stain", _colour(_hed_strong)),
    Shift("saturation0.5", "stain", _colour(lambda a: saturation(a, 0.5))),
    Shift("gamma1.5", "stain", _colour(lambda a: gamma(a, 1.5))),
    Shift("pink-purple", "stain", _colour(_pink_purple)),
    Shift("blur", "stain", lambda rgb, rbc: (blur(rgb, 0.06 * rbc), 1.0)),
    Shift("hed+res20", "combined", _resolution(20.0, then=_hed_strong)),
    Shift("pink-purple+hue+res14", "combined", _resolution(14.0, then=lambda a: hue_rotate(_pink_purple(a), 15.0))),
]
STAIN_SHIFTS = [s for s in PROTOCOL3 if s.kind in ("none", "stain")]


# ---------------------------------------------------------------------------------- augmentation (random)
def random_stain(rng: np.random.Generator, p: float = 0.85) -> Callable[[np.ndarray], np.ndarray]:
    """A random pointwise stain change (composition of the operations above), identity with prob. 1 - p."""
    if rng.random() >= p:
        return lambda a: a
    ops: list[Callable[[np.ndarray], np.ndarray]] = []
    if rng.random() < 0.6:
        sc = tuple(rng.uniform(0.65, 1.35, 3))
        sh = tuple(rng.uniform(-0.05, 0.05, 3))
        ops.append(lambda a, sc=sc, sh=sh: hed_perturb(a, sc, sh))
    if rng.random() < 0.5:
        d = rng.uniform(-25.0, 25.0)
        ops.append(lambda a, d=d: hue_rotate(a, d))
    if rng.random() < 0.5:
        s = rng.uniform(0.45, 1.5)
        ops.append(lambda a, s=s: saturation(a, s))
    if rng.random() < 0.5:
        g = math.exp(rng.uniform(math.log(0.6), math.log(1.7)))
        ops.append(lambda a, g=g: gamma(a, g))
    if rng.random() < 0.5:
        gains = tuple(rng.uniform(0.85, 1.12, 3))
        ops.append(lambda a, gains=gains: cast(a, gains))
    order = rng.permutation(len(ops))

    def apply(a: np.ndarray) -> np.ndarray:
        for i in order:
            a = ops[i](a)
        return a

    return apply


# ------------------------------------------------------------------------------------------------ CLI
def _reference() -> None:
    from allmil_cli.stages.scale import measure_field
    from allmil_cli.train.data import load_rgb, read_all_idb1, read_bccd

    recs = [r.path for r in read_all_idb1()] + [r.path for r in read_bccd() if r.split != "test"][::3]
    bg, od = [], []
    for p in recs:
        s = measure_field(load_rgb(p))
        if s.measured:
            b = np.asarray(s.background_rgb)
            bg.append(b)
            od.append(-np.log((np.asarray(s.rbc_rgb) + 1.0) / (b + 1.0)))
    bgm, od = np.median(bg, 0), np.asarray(od)
    norms = np.linalg.norm(od, axis=1)
    direction = np.median(od / norms[:, None], 0)
    target = np.median(norms) * direction / np.linalg.norm(direction)
    rbc = (bgm + 1.0) * np.exp(-target) - 1.0
    print(f"{len(bg)} fields; REFERENCE_BACKGROUND = {tuple(bgm.round(1))}, REFERENCE_RBC = {tuple(rbc.round(1))}")


def _preview(path: str, out: str) -> None:
    from allmil_cli.stages.scale import estimate_rbc_diameter

    rgb = np.asarray(Image.open(path).convert("RGB"))
    rbc = estimate_rbc_diameter(rgb)
    tiles = []
    for s in PROTOCOL3:
        a, _ = s.apply(rgb, rbc)
        tiles.append(Image.fromarray(a).resize((320, 240)))
    sheet = Image.new("RGB", (320 * 4, 240 * math.ceil(len(tiles) / 4)), "white")
    for i, t in enumerate(tiles):
        sheet.paste(t, (320 * (i % 4), 240 * (i // 4)))
    sheet.save(out)
    print(out, [s.name for s in PROTOCOL3])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m allmil_cli.train.shifts", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("reference", help="median background / red-cell colours of the training fields")
    p = sub.add_parser("preview", help="contact sheet of the protocol-3 shifts of one field")
    p.add_argument("image")
    p.add_argument("--out", default="shifts.png")
    a = ap.parse_args(argv)
    if a.cmd == "reference":
        _reference()
    else:
        _preview(a.image, a.out)


if __name__ == "__main__":
    main()
