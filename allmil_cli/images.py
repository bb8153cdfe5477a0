"""Stage 0: find the patients and their smear fields, and decode each field once, safely.

A lab folder looks like ``DIR/<patient>/.../*.jpg``. Every readable image below a patient's folder
counts for that patient. ``per_image=True`` treats every image (anywhere below DIR) as its own
patient, named after the file (ALL-IDB1 style).

Decoding never raises anything but :class:`ImageError`, whose message names the file, says what is
wrong and what to do; the pipeline turns it into a per-image ``failed`` entry and carries on.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from allmil_cli.resample import Shrinker

try:  # optional: JPEGs decode ~30 % faster, to the same pixels (see _fast_jpeg); Pillow does it otherwise
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - a platform without its wheel
    _simplejpeg = None

#: Formats read as smear fields; WebP joins when this Pillow build has it.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"} | ({".webp"} if features.check("webp") else set()))
#: Operating-system clutter, skipped and listed as "hidden or system file".
JUNK_NAMES = frozenset({".ds_store", "thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"})

#: Decompression-bomb cap: a field above this many pixels is refused (a 2592x1944 field is 5 Mpx).
MAX_PIXELS = 80_000_000
#: At most this many pages are read from a multi-page TIFF.
MAX_PAGES = 32


class ImageError(Exception):
    """An image that cannot be used; the message is meant for the user."""


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
    _shrinker: Shrinker | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def label(self) -> str:
        return self.path.name if self.page == 0 else f"{self.path.name}#{self.page}"

    def shrinker(self) -> Shrinker:
        """This field's shared downscales (:mod:`allmil_cli.resample`): made once for the ruler and the detector."""
        if self._shrinker is None:
            self._shrinker = Shrinker(self.rgb)
        return self._shrinker

    def release(self) -> None:
        """Drop the shared downscales (their memory) once the field is measured and detected."""
        self._shrinker = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_shrinker": None}  # never shipped between processes


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def skip_reason(path: Path, root: Path) -> str | None:
    """Why a file below ``root`` is not analysed (None: it is a smear field to read)."""
    parts = path.relative_to(root).parts
    if path.name.lower() in JUNK_NAMES or any(p.startswith((".", "__MACOSX")) for p in parts):
        return "skipped: hidden or system file"
    if path.is_symlink() and not path.exists():
        return "skipped: broken link (its target is missing); re-create the link or copy the image"
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        what = f"'{suffix}'" if suffix else "no file extension"
        webp = " (this Pillow build cannot read WebP)" if suffix == ".webp" else ""
        return (f"skipped: unsupported format ({what}){webp}; export the field as JPEG, PNG or TIFF"
                + (", or add the right extension" if not suffix else ""))
    return None


def _scan(folder: Path) -> tuple[list[Path], list[dict[str, str]]]:
    """Images below ``folder`` (sorted) and the files skipped there, each with its reason."""
    images: list[Path] = []
    skipped: list[dict[str, str]] = []
    for p in sorted(folder.rglob("*"), key=lambda q: str(q)):
        if p.is_dir():
            continue
        reason = skip_reason(p, folder)
        if reason is None and p.is_file():
            images.append(p)
        elif reason is not None:
            skipped.append({"file": str(p.relative_to(folder)), "reason": reason})
    return images, skipped


def _images_below(folder: Path) -> list[Path]:
    return _scan(folder)[0]


def discover_patients(root: Path, per_image: bool = False) -> tuple[list[Patient], list[str]]:
    """List the patients under ``root``. Returns (patients, warnings for the user).

    Raises FileNotFoundError / NotADirectoryError when ``root`` itself is unusable.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"{root}: no such folder. Give the folder that holds one subfolder per patient.")
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a folder. Give the folder that holds one subfolder per patient.")
    notes: list[str] = []
    if per_image:
        images, skipped = _scan(root)
        patients = [Patient(name=str(p.relative_to(root).with_suffix("")), folder=p.parent, images=[p]) for p in images]
        shown = [s for s in skipped if "hidden" not in s["reason"]]
        if shown:
            notes.append(f"{root}: {len(shown)} file(s) skipped, e.g. {shown[0]['file']}: {shown[0]['reason']}.")
        return patients, notes
    loose = sorted(p for p in root.iterdir() if p.is_file() and _is_image(p))
    if loose:
        notes.append(
            f"{root}: {len(loose)} image(s) lie directly in the input folder and are ignored; "
            "put each patient's images in its own subfolder, or pass --per-image to treat each image as a patient."
        )
    patients = []
    for sub in sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name):
        images, skipped = _scan(sub)
        patients.append(Patient(name=sub.name, folder=sub, images=images, skipped=skipped))
    return patients, notes


def _to_rgb(im: Image.Image) -> np.ndarray:
    """Convert any Pillow mode to RGB uint8 (16-bit and float are rescaled by their range)."""
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        g = np.clip((a - lo) * scale, 0, 255).astype(np.uint8)
        return np.repeat(g[..., None], 3, axis=2)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(im if mode == "RGB" else im.convert("RGB"))


_BUFFERS_KEPT = False


def keep_freed_buffers() -> bool:
    """Let this process reuse the memory of a decoded field for the next one (glibc ``mallopt``; elsewhere a no-op).

    By default glibc hands every buffer above its (adaptive) mmap threshold fresh pages from the kernel and returns
    them on free: a Pillow decode of a 2592x1944 JPEG then takes ~12,000 page faults and ~40 ms more (90-120 vs
    54-60 ms measured here). A fixed 64 MiB threshold keeps such buffers on the heap, reused field after field
    (at most 128 MiB of freed memory is kept before it is trimmed). Called by every :class:`~allmil_cli.pipeline.Pipeline`
    (the CLI's, each worker process's, each Ray actor's); returns whether it took effect."""
    global _BUFFERS_KEPT
    if _BUFFERS_KEPT:
        return True
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        _BUFFERS_KEPT = bool(libc.mallopt(m_mmap_threshold, 64 << 20)) and bool(libc.mallopt(m_trim_threshold, 128 << 20))
    except (OSError, AttributeError):
        return False
    return _BUFFERS_KEPT


def _fast_jpeg(im: Image.Image, path: Path) -> np.ndarray | None:
    """A colour JPEG decoded by libjpeg-turbo straight into a numpy array (``simplejpeg``), or None (Pillow decodes it).

    The very pixels Pillow gives (the same library, accurate IDCT, smooth chroma upsampling: identical on the 1,072
    ALL-IDB1, BCCD and PBC JPEGs checked, and in ``tests/test_images.py``), ~30 % faster: no 4-byte-per-pixel
    Pillow buffer and no copy out of it. Anything it refuses (a truncated file, CMYK, grey) goes to Pillow, which
    decodes it or says what is wrong."""
    if _simplejpeg is None or im.format != "JPEG" or im.mode != "RGB":
        return None
    try:
        rgb = _simplejpeg.decode_jpeg(path.read_bytes(), colorspace="RGB", fastdct=False, fastupsample=False)
    except (ValueError, OSError):
        return None
    return rgb if rgb.shape[:2] == (im.height, im.width) else None


def load_fields(path: Path, max_pixels: int = MAX_PIXELS) -> tuple[list[Field], list[str]]:
    """Decode every usable page of an image file. Returns (fields, notes about skipped pages).

    Raises :class:`ImageError` when nothing in the file is usable.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageError(f"{path}: cannot be read ({exc.strerror or exc}); check the file's permissions.") from exc
    if size == 0:
        raise ImageError(f"{path}: the file is empty (0 bytes); re-export or re-copy it from the microscope.")
    notes: list[str] = []
    fields: list[Field] = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                n_pages = int(getattr(im, "n_frames", 1) or 1)
                for page in range(min(n_pages, MAX_PAGES)):
                    if page:
                        im.seek(page)
                    w, h = im.size
                    if w * h > max_pixels:
                        raise ImageError(
                            f"{path}: {w}x{h} pixels is over the {max_pixels:,}-pixel safety cap; "
                            "downscale the image or raise the cap with --max-pixels."
                        )
                    if min(w, h) < 32:
                        notes.append(f"{path} page {page}: {w}x{h} is too small to hold a cell; page skipped.")
                        continue
                    rotated = page == 0 and im.getexif().get(0x0112, 1) not in (1, None)
                    rgb = None if rotated else _fast_jpeg(im, path)
                    if rgb is None:
                        frame = ImageOps.exif_transpose(im) if rotated else im
                        frame.load()
                        rgb = _to_rgb(frame)
                    fields.append(Field(path=path, page=page, rgb=rgb))
                if n_pages > MAX_PAGES:
                    notes.append(f"{path}: only the first {MAX_PAGES} of {n_pages} pages were read.")
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(
            f"{path}: refused as a possible decompression bomb ({exc}); downscale it or raise --max-pixels."
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageError(
            f"{path}: not a readable image (unknown or corrupt format); replace it with a JPEG, PNG or TIFF export."
        ) from exc
    except PermissionError as exc:
        raise ImageError(f"{path}: permission denied; make the file readable (chmod +r).") from exc
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageError(f"{path}: the image is truncated or corrupt ({exc}); re-copy it from the source.") from exc
    if not fields:
        raise ImageError(f"{path}: no usable page in this file; " + (" ".join(notes) or "re-export it as RGB."))
    return fields, notes
