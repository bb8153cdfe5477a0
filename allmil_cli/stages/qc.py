"""Quality control: is a field, or a patient, inside what the models were validated on?

A lab must be told when the input lies outside the tested range rather than get a confident call. Each
usable field is checked from its :class:`allmil_cli.types.field.FieldStats` (measured once, on the ruler's
thumbnail); a patient carries every flag any of its fields raised, plus its own:

| flag | raised when | evidence in the JSON (``qc_details``) |
|---|---|---|
| ``magnification`` | red cells narrower than ``RBC_PX_RANGE[0]`` or wider than ``RBC_PX_RANGE[1]`` pixels (outside the magnifications tested: ALL-IDB1 shrunk to 13 px red cells ... BCCD's up to 252 px) | ``rbc_px`` per field |
| ``resolution`` | red cells narrower than ``MIN_RBC_PX`` pixels: too small to judge (held-out blast detection falls below 90 % there, docs/ruler.md) | ``rbc_px`` per field |
| ``compression`` | a JPEG whose red cells are narrower than the floor of its quality (``JPEG_FLOORS``; e.g. 24 px at quality 80 or lower): compression and low resolution together (held-out blast recall falls below 90 % there, docs/ruler.md) | ``jpeg_quality`` and ``rbc_px`` per field |
| ``ruler`` | no red cells could be measured (blank, saturated or non-smear image): a default size was used | the field names |
| ``stain`` | the stain normalisation had to clamp its density gain (``normalize.MAX_GAIN``): colours far outside the training range, or no background / red-cell colours found | ``stain_gain`` per field |
| ``blur`` | fine-detail ratio (``FieldStats.sharpness``) below ``MIN_SHARPNESS`` | ``sharpness`` per field |
| ``few_cells`` | fewer white cells than the adequacy rule asks for a normal call (``--min-cells-normal``) | ``n_cells`` |

Thresholds come from measurements (``docs/cross_domain_results.md``, QC section): the sharpness of clean
ALL-IDB1 / BCCD / PBC fields is >= 1.80 (also after resampling to 14-20 px red cells and JPEG 70); fields
blurred with sigma = 0.06 red-cell diameters score 1.35-1.80 (median 1.49). ``MIN_SHARPNESS`` = 1.70.

A flagged patient is never silently called ``normal``: the pipeline turns such a call into
``review`` and says why (an ``ALL`` call stands: ruling in needs less evidence than ruling out).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from allmil_cli.stages.normalize import MAX_GAIN, REFERENCE_BACKGROUND, REFERENCE_RBC, stain_map
from allmil_cli.types.field import FieldStats

RBC_PX_RANGE = (12.0, 260.0)
#: Red cells narrower than this (ruler reading, px) are too small to judge: below it, held-out blast recall (ALL-IDB1
#: blasts detected and scored blast-like by their fold's models, recipe v2pbc) falls under 90 % (12 px: 89.4 %; from
#: 13 px up >= 91 %; ``python -m allmil_cli.train.counting floor``, docs/ruler.md). Blast *detection* alone stays >= 95 %
#: down to 8 px: what fails first is the blast score of a cell a few pixels wide.
MIN_RBC_PX = 13.0
#: A JPEG's floor: ``(quality, px)`` rows, the first row at or above the field's JPEG quality
#: (:func:`allmil_cli.stages.images.jpeg_quality`) applies. Red cells narrower than ``px`` in such a JPEG are too small
#: to judge: held-out blast recall falls under 90 % below it (docs/ruler.md, *The floor under JPEG*;
#: ``python -m allmil_cli.train.counting floor --sizes ... --qualities ...``). Above the last row: ``MIN_RBC_PX`` alone.
JPEG_FLOORS: tuple[tuple[int, float], ...] = ((80, 24.0), (85, 18.0), (90, 14.0))
MIN_SHARPNESS = 1.70
FLAGS = ("magnification", "resolution", "compression", "ruler", "stain", "blur", "few_cells")


def jpeg_floor(quality: int | None) -> float:
    """The smallest red cells (px) a field of this JPEG quality (None: not a JPEG) is judged at."""
    if quality is not None:
        for max_quality, floor in JPEG_FLOORS:
            if quality <= max_quality:
                return floor
    return MIN_RBC_PX


@dataclass
class QCResult:
    flags: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        """The report.csv ``qc`` cell: empty when clean, else ``;``-separated flags."""
        return ";".join(self.flags)


def field_flags(stats: FieldStats, reference: tuple[Sequence[float], Sequence[float]] | None = None) -> tuple[list[str], dict[str, Any]]:
    """The QC flags of one field and the numbers behind them."""
    bg, rbc = reference if reference is not None else (REFERENCE_BACKGROUND, REFERENCE_RBC)
    flags: list[str] = []
    info: dict[str, Any] = {"rbc_px": round(stats.rbc_px, 1), "sharpness": None if math.isnan(stats.sharpness) else round(stats.sharpness, 3)}
    if not stats.measured:
        flags.append("ruler")
    if not (RBC_PX_RANGE[0] <= stats.rbc_px <= RBC_PX_RANGE[1]):
        flags.append("magnification")
    if stats.rbc_px < MIN_RBC_PX:
        flags.append("resolution")
    if stats.jpeg_quality is not None:
        info["jpeg_quality"] = stats.jpeg_quality
        if MIN_RBC_PX <= stats.rbc_px < jpeg_floor(stats.jpeg_quality):
            flags.append("compression")
    if stats.measured:
        smap = stain_map(stats, bg, rbc)
        info["stain_gain"] = round(smap.gain, 3) if math.isfinite(smap.gain) else None
        if smap.clamped:
            flags.append("stain")
    else:
        flags.append("stain")
    if not math.isnan(stats.sharpness) and stats.sharpness < MIN_SHARPNESS:
        flags.append("blur")
    return flags, info


def patient_qc(fields: Sequence[tuple[str, FieldStats]], n_cells: int, min_cells_normal: int,
               reference: tuple[Sequence[float], Sequence[float]] | None = None) -> QCResult:
    """Flags of a patient: every flag raised by one of its fields (``(name, stats)`` pairs), and ``few_cells``."""
    out = QCResult()
    per_field: dict[str, Any] = {}
    raised: set[str] = set()
    for name, stats in fields:
        flags, info = field_flags(stats, reference)
        info["flags"] = flags
        per_field[name] = info
        raised.update(flags)
    if min_cells_normal and n_cells < min_cells_normal:
        raised.add("few_cells")
    out.flags = [f for f in FLAGS if f in raised]
    out.details = {"fields": per_field, "n_cells": n_cells, "limits": {
        "rbc_px": list(RBC_PX_RANGE), "min_rbc_px": MIN_RBC_PX,
        "jpeg_floors": [list(row) for row in JPEG_FLOORS], "min_sharpness": MIN_SHARPNESS, "max_stain_gain": MAX_GAIN, "min_cells_normal": min_cells_normal}}
    for flag in out.flags:
        if flag == "few_cells":
            continue
        out.details.setdefault("flagged_fields", {})[flag] = [n for n, i in per_field.items() if flag in i["flags"]]
    return out


def describe(qc: QCResult) -> str:
    """One sentence for the report's reason column."""
    parts = []
    ff = qc.details.get("flagged_fields", {})
    for flag in qc.flags:
        n = len(ff.get(flag, []))
        where = f" in {n} field(s)" if n else ""
        parts.append({
            "magnification": f"magnification outside the tested range{where} (red cells {RBC_PX_RANGE[0]:.0f}-{RBC_PX_RANGE[1]:.0f} px; set --cell-size if the ruler is wrong)",
            "resolution": f"red cells too small to judge{where} (narrower than {MIN_RBC_PX:.0f} px: blasts are missed; "
                          "image the smear at a higher magnification)",
            "compression": f"JPEG compression at low resolution{where} ("
                           + ", ".join(f"quality {q} or lower needs red cells of {px:.0f} px" for q, px in JPEG_FLOORS)
                           + ": blasts are missed; save the fields as TIFF, PNG or high-quality JPEG, or image at a higher "
                           "magnification)",
            "ruler": f"no red cells measurable{where} (default size used)",
            "stain": f"stain colours outside the validated range{where}",
            "blur": f"blurred{where}",
            "few_cells": f"only {qc.details.get('n_cells')} white cell(s)",
        }[flag])
    return "QC: " + "; ".join(parts) + "." if parts else ""
