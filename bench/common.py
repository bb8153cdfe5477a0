"""What the benchmark scripts share: where the checkout and the data are, the image sets, decoding a field,
peak-memory readings, the per-phase timing record, Markdown tables, and the machine and package versions.

Importing it puts the checkout first on ``sys.path``, so ``allmil_cli`` is this tree's, installed or not.
"""

from __future__ import annotations

import importlib.metadata
import platform
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_DATA = REPO.parent / "shared" / "data"
SETS = {"all-idb1": ("ALL-IDB1", "ALL-IDB1/im"), "bccd": ("BCCD", "BCCD/JPEGImages")}


def mib(kib: float) -> float:
    return kib / 1024.0


def _status_kib(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) of this process; False where not supported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> float:
    """Peak RSS since the last :func:`reset_peak_rss` (VmHWM), else ru_maxrss of the whole process."""
    hwm = _status_kib("VmHWM")
    return mib(hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def rss_mib() -> float:
    now = _status_kib("VmRSS")
    return mib(now) if now is not None else float("nan")


@dataclass
class Phase:
    """Wall-clock and memory of one phase (one engine on one image set)."""

    name: str
    per_field_s: list[float] = field(default_factory=list)
    total_s: float = 0.0
    cells: int = 0
    stages: dict[str, float] = field(default_factory=dict)
    rss_start_mib: float = float("nan")
    rss_peak_mib: float = float("nan")
    per_path_s: dict[Path, float] = field(default_factory=dict)

    @property
    def n(self) -> int:
        return len(self.per_field_s)

    def ms(self, q: float | None = None) -> float:
        if not self.per_field_s:
            return float("nan")
        a = np.asarray(self.per_field_s) * 1e3
        return float(a.mean() if q is None else np.percentile(a, q))

    def fields_per_s(self) -> float:
        return self.n / self.total_s if self.total_s > 0 else float("nan")

    def cells_per_s(self) -> float:
        return self.cells / self.total_s if self.total_s > 0 else float("nan")


@contextmanager
def measured(phase: Phase) -> Iterator[Phase]:
    reset_peak_rss()
    phase.rss_start_mib = rss_mib()
    t = time.perf_counter()
    yield phase
    phase.total_s = time.perf_counter() - t
    phase.rss_peak_mib = peak_rss_mib()


def append_row(results: Path, section: str, header: str, row: str) -> None:
    """Append ``row`` right under the last row of ``section``'s table in ``results`` (made, with ``header``, if absent),
    before any text or subsection that follows the table."""
    text = results.read_text() if results.exists() else "# allmil benchmark results\n"
    if section not in text:
        results.write_text(text.rstrip("\n") + "\n\n" + section + "\n\n" + header + row + "\n")
        return
    head, tail = text.split(section, 1)
    lines = tail.split("\n")
    last = next(i for i, line in enumerate(lines) if line.startswith("|"))  # the section's table header
    while last + 1 < len(lines) and lines[last + 1].startswith("|"):
        last += 1
    lines.insert(last + 1, row)
    results.write_text(head + section + "\n".join(lines))


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return "n/a" if v != v else (f"{v:.3g}" if abs(v) < 10 else f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.1f}")
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def version_of(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def list_images(data: Path, key: str, limit: int | None) -> list[Path]:
    folder = data / SETS[key][1]
    paths = sorted(p for p in folder.glob("*.jpg"))
    if not paths:
        raise SystemExit(f"{folder}: no .jpg images; pass --data DIR holding ALL-IDB1/im and BCCD/JPEGImages.")
    return paths[:limit] if limit else paths


def first_fields(data: Path, n: int | None, size: str = "2592x1944") -> list[Path]:
    """The first ``n`` ALL-IDB1 fields of ``size`` (``WxH``; ``"any"``: every size), sorted by name, each read once so
    nobody pays the first disk read (issue 8's protocol: the first 24 of 2592x1944)."""
    paths = sorted((data / "ALL-IDB1" / "im").glob("*.jpg"))
    if size != "any":
        w, h = (int(v) for v in size.lower().split("x"))
        paths = [p for p in paths if field_size(p) == (w, h)]
    paths = paths[:n] if n else paths
    if not paths:
        raise SystemExit(f"{data}/ALL-IDB1/im: no {size} images; pass --data DIR holding ALL-IDB1/im.")
    for p in paths:
        p.read_bytes()
    return paths


def field_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file."""
    with Image.open(path) as im:
        return im.size


# ---- decoding a field -------------------------------------------------------------------------
def decode_full(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def decode_fast(path: Path) -> np.ndarray:
    """What allmil decodes a colour JPEG with when ``simplejpeg`` is installed (``allmil_cli.stages.images._fast_jpeg``):
    libjpeg-turbo straight into numpy, the same pixels as :func:`decode_full`. ImportError without simplejpeg."""
    import simplejpeg

    return simplejpeg.decode_jpeg(path.read_bytes(), colorspace="RGB", fastdct=False, fastupsample=False)


def decode_draft(path: Path, scale: int = 4) -> np.ndarray:
    """JPEG DCT-domain reduced decode (1/scale per side). NOT used by allmil today: reference only."""
    with Image.open(path) as im:
        im.draft("RGB", (max(1, im.width // scale), max(1, im.height // scale)))
        return np.asarray(im.convert("RGB"))


def gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - best effort, for the record only
        return "GPU"
