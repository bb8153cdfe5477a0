"""Shrunken copies of one field, shared by the red-cell ruler (:mod:`allmil_cli.stages.scale`) and the detector input
(:mod:`allmil_cli.stages.detect`).

Both shrink a multi-megapixel field 4-5x. Pillow's cheap way to do that is an integer box reduce
(``Image.reduce``) followed by a short bilinear resize (``Image.resize(..., reducing_gap=g)``). On a 2592x1944
field the numpy -> Pillow conversion costs ~8 ms and the box reduce ~8 ms, more than the bilinear step itself.
A :class:`Shrinker` converts the field once and keeps every box reduce it made, so the ruler's thumbnail and the
detector input, when they use the same box factor, pay for it once.

``Shrinker(rgb).resize(size, gap)`` returns exactly ``Image.fromarray(rgb).resize(size, BILINEAR, reducing_gap=gap)``
(``tests/test_scale.py`` checks it pixel for pixel).
"""

from __future__ import annotations

import numpy as np
from PIL import Image


class Shrinker:
    """One field (RGB uint8, H x W x 3) as a Pillow image, and the box reductions made of it so far."""

    def __init__(self, rgb: np.ndarray) -> None:
        self.rgb = rgb
        self._image: Image.Image | None = None
        self._reduced: dict[tuple[int, int], Image.Image] = {}

    @property
    def image(self) -> Image.Image:
        if self._image is None:
            self._image = Image.fromarray(np.ascontiguousarray(self.rgb))
        return self._image

    def reduced(self, fx: int, fy: int) -> Image.Image:
        """The field box-averaged over ``fx`` x ``fy`` pixel blocks (``Image.reduce``), made once."""
        if (fx, fy) == (1, 1):
            return self.image
        key = (fx, fy)
        if key not in self._reduced:
            self._reduced[key] = self.image.reduce(key)
        return self._reduced[key]

    def resize(self, size: tuple[int, int], reducing_gap: float | None) -> np.ndarray:
        """The field resized to ``size`` (w, h) by Pillow's bilinear filter with ``reducing_gap`` (None: one full
        antialiased resize), as uint8 (h, w, 3)."""
        w, h = self.rgb.shape[1], self.rgb.shape[0]
        if tuple(size) == (w, h):
            return self.rgb
        if reducing_gap is None:
            return np.asarray(self.image.resize(size, Image.BILINEAR))
        # Pillow's own rule (Image.resize): box factors int(scale / gap), at least 1, over the whole field
        fx = int(w / size[0] / reducing_gap) or 1
        fy = int(h / size[1] / reducing_gap) or 1
        if (fx, fy) == (1, 1):
            return np.asarray(self.image.resize(size, Image.BILINEAR))
        return np.asarray(self.reduced(fx, fy).resize(size, Image.BILINEAR, box=(0.0, 0.0, w / fx, h / fy)))
