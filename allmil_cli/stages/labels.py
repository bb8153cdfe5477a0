"""Optional ground truth: a ``patient,label`` CSV (label ALL/normal, 1/0, yes/no)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

_POSITIVE = {"all", "1", "yes", "true", "positive", "leukemia", "leukaemia"}
_NEGATIVE = {"normal", "0", "no", "false", "negative", "healthy"}


class LabelsError(Exception):
    """The labels file cannot be used; the message names the file and line."""


def read_labels(path: Path, strict: bool = False) -> dict[str, int]:
    """Map patient name -> 1 (ALL) / 0 (normal). A header row ``patient,label`` is optional.

    ``strict`` (``allmil calibrate``): a patient listed twice is an error instead of the last line winning."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise LabelsError(f"{path}: cannot read the labels file ({exc.strerror or exc}).") from exc
    labels: dict[str, int] = {}
    first_line: dict[str, int] = {}
    for lineno, row in enumerate(csv.reader(text.splitlines()), start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) < 2:
            raise LabelsError(f"{path}, line {lineno}: expected 'patient,label', got {','.join(row)!r}.")
        name, value = row[0].strip(), row[1].strip().lower()
        if lineno == 1 and name.lower() == "patient":
            continue
        if strict and name in first_line:
            raise LabelsError(f"{path}, line {lineno}: {name!r} is listed twice (first on line {first_line[name]}); "
                              "keep one line per patient.")
        first_line.setdefault(name, lineno)
        if value in _POSITIVE:
            labels[name] = 1
        elif value in _NEGATIVE:
            labels[name] = 0
        else:
            raise LabelsError(f"{path}, line {lineno}: label {row[1]!r} for {name!r}; use ALL or normal (or 1/0).")
    return labels


def labels_from_names(names: list[str]) -> dict[str, int]:
    """ALL-IDB naming (``ImXXX_1`` = ALL, ``ImXXX_0`` = healthy) for names that follow it."""
    out = {}
    for n in names:
        stem = Path(n).name
        if len(stem) > 2 and stem[-2] == "_" and stem[-1] in "01":
            out[n] = int(stem[-1])
    return out


def read_points(path: Path) -> np.ndarray:
    """Centroids from an ALL-IDB ``.xyc`` file: one ``x y`` per line (tab, space or comma separated).

    Returns float64 (N, 2); an empty or missing file gives (0, 2).
    """
    pts: list[tuple[float, float]] = []
    path = Path(path)
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            parts = line.replace(",", " ").split()
            if len(parts) >= 2:
                pts.append((float(parts[0]), float(parts[1])))
    return np.asarray(pts, dtype=np.float64).reshape(-1, 2)
