"""Cell crops: square windows centred on detected cells, scaled to the embedder's input size."""

from __future__ import annotations

import numpy as np
from PIL import Image

from allmil_cli.scale import CROP_RBC_RATIO

CROP_SIZE = 224


def crop_cells(rgb: np.ndarray, centres: np.ndarray, rbc_px: float, size: int = CROP_SIZE) -> np.ndarray:
    """Crop a square of side ``CROP_RBC_RATIO * rbc_px`` around each (x, y) centre, resized to ``size``.

    Windows that leave the field are padded by edge replication (like the ALL-IDB2 edge crops, which
    are simply smaller). Returns uint8 (N, size, size, 3).
    """
    centres = np.asarray(centres, dtype=np.float64).reshape(-1, 2)
    out = np.empty((len(centres), size, size, 3), dtype=np.uint8)
    if len(centres) == 0:
        return out
    side = max(8, int(round(CROP_RBC_RATIO * rbc_px)))
    half = side // 2
    pad = half + 1
    padded = np.pad(rgb, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    for i, (x, y) in enumerate(centres):
        x0 = int(round(x)) - half + pad
        y0 = int(round(y)) - half + pad
        x0 = min(max(x0, 0), padded.shape[1] - side)
        y0 = min(max(y0, 0), padded.shape[0] - side)
        window = padded[y0 : y0 + side, x0 : x0 + side]
        out[i] = np.asarray(Image.fromarray(window).resize((size, size), Image.BILINEAR))
    return out
