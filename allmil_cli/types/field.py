"""A patient's files, one decoded field and what one look at its thumbnail tells: the values every stage passes on."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from allmil_cli.types.resample import Shrinker

#: Decompression-bomb cap: a field above this many pixels is refused (a 2592x1944 field is 5 Mpx).
MAX_PIXELS = 80_000_000


@dataclass
class Patient:
    """A patient and the image files that belong to it (sorted, stable order)."""

    name: str
    folder: Path
    images: list[Path] = field(default_factory=list)
    #: Files below the folder that are not analysed: ``{"file": relative path, "reason": why}``.
    skipped: list[dict[str, str]] = field(default_factory=list)


@dataclass
class Field:
    """One decoded smear field: RGB uint8 (H, W, 3). ``page`` > 0 only for multi-page TIFFs."""

    path: Path
    page: int
    rgb: np.ndarray
    #: The file's JPEG quality as libjpeg would call it (1-100, estimated from its quantisation tables); None: not a JPEG.
    jpeg_quality: int | None = None
    _shrinker: Shrinker | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def label(self) -> str:
        return self.path.name if self.page == 0 else f"{self.path.name}#{self.page}"

    def shrinker(self) -> Shrinker:
        """This field's shared downscales (:mod:`allmil_cli.types.resample`): made once for the ruler and the detector."""
        if self._shrinker is None:
            self._shrinker = Shrinker(self.rgb)
        return self._shrinker

    def release(self) -> None:
        """Drop the shared downscales (their memory) once the field is measured and detected."""
        self._shrinker = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shrinker": None}  # never shipped between processes


@dataclass(frozen=True)
class FieldStats:
    """What one look at a field's thumbnail tells: its ruler, its colours and its sharpness.

    ``rbc_px``: apparent red-cell diameter (full-resolution pixels). ``background_rgb`` / ``rbc_rgb``: median
    colour of the plasma background and of the red cells, the two things every smear holds; they anchor the
    stain normalisation (:mod:`allmil_cli.stages.normalize`) and the stain QC flag. ``sharpness``: fine-detail ratio
    (see ``_sharpness``; blur QC) at a scale where red cells are ``SHARPNESS_RBC_PX`` wide; NaN when the field
    is too small to measure it. ``measured``: False when the field had no usable
    foreground and the defaults were returned.
    """

    rbc_px: float
    background_rgb: tuple[float, float, float] = (255.0, 255.0, 255.0)
    rbc_rgb: tuple[float, float, float] = (200.0, 120.0, 130.0)
    sharpness: float = float("nan")
    measured: bool = True
    #: The field's JPEG quality (:attr:`Field.jpeg_quality`), carried with the measure for the QC flags.
    jpeg_quality: int | None = None
