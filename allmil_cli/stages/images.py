"""Stage 0: decode each smear field once, safely (the patients and their files: :mod:`allmil_cli.io.discover`).

Decoding never raises anything but :class:`ImageError`, whose message names the file, says what is
wrong and what to do; the pipeline turns it into a per-image ``failed`` entry and carries on.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from allmil_cli.types.field import MAX_PIXELS, Field

try:  # optional: JPEGs decode ~30 % faster, to the same pixels (see _fast_jpeg); Pillow does it otherwise
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - a platform without its wheel
    _simplejpeg = None

#: At most this many pages are read from a multi-page TIFF.
MAX_PAGES = 32


class ImageError(Exception):
    """An image that cannot be used; the message is meant for the user."""


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
    (at most 128 MiB of freed memory is kept before it is trimmed). Called by every :class:`~allmil_cli.pipeline.runner.Pipeline`
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


#: libjpeg's (IJG) standard luminance quantisation table, at quality 50.
_IJG_LUMINANCE_SUM = sum((16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
                          14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
                          49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99))


def jpeg_quality(im: Image.Image) -> int | None:
    """A JPEG's quality (1-100) on libjpeg's scale, estimated from its luminance quantisation table; None when ``im``
    is not a JPEG. Exact (within 1) for files written by libjpeg and its descendants (Pillow, OpenCV, most camera
    software), which scale the IJG table; an approximation for others."""
    tables = getattr(im, "quantization", None) if im.format == "JPEG" else None
    if not tables or 0 not in tables:
        return None
    scale = 100.0 * sum(tables[0]) / _IJG_LUMINANCE_SUM  # libjpeg: 200 - 2q (q >= 50), 5000 / q (q < 50)
    q = (200.0 - scale) / 2.0 if scale <= 100.0 else 5000.0 / scale
    return int(min(100, max(1, round(q))))


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
                    fields.append(Field(path=path, page=page, rgb=rgb, jpeg_quality=jpeg_quality(im)))
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
