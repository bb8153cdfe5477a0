"""Cell crops: square windows centred on detected cells, scaled to the embedder's input size."""

from __future__ import annotations

import numpy as np
from PIL import Image

from allmil_cli.stages.scale import CROP_RBC_RATIO

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
    h, w = rgb.shape[:2]
    for i, (x, y) in enumerate(centres):
        x0 = int(round(min(max(x, 0.0), w - 1.0))) - half  # centres are clamped into the field
        y0 = int(round(min(max(y, 0.0), h - 1.0))) - half
        cx0, cy0 = max(x0, 0), max(y0, 0)
        cx1, cy1 = min(x0 + side, w), min(y0 + side, h)
        window = rgb[cy0:cy1, cx0:cx1]
        pads = ((cy0 - y0, y0 + side - cy1), (cx0 - x0, x0 + side - cx1), (0, 0))
        if any(a or b for a, b in pads[:2]):
            window = np.pad(window, pads, mode="edge")
        out[i] = np.asarray(Image.fromarray(np.ascontiguousarray(window)).resize((size, size), Image.BILINEAR))
    return out
