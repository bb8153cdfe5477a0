"""The PBC images and cameras the counting measures and the detector training share: which PBC images form the
design and the report halves, and each camera's known red-cell size (the median ruler reading of its design
fields, cached in ``.cache/counting/``)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from allmil_cli.train.data import load_rgb
from allmil_cli.train.detector_labels import REPO

OUT = REPO / ".cache" / "counting"
PBC_PER_TYPE = {"lymphocyte": 60, "monocyte": 40, "neutrophil": 40, "eosinophil": 40, "basophil": 40, "ig": 40,
                "erythroblast": 40}


def camera_rbc(name: str, paths: Iterable[Path], what: str) -> float:
    """The known red-cell size of one camera: the median ruler reading over ``paths`` (design fields), cached."""
    f = OUT / f"{name}_camera_rbc.json"
    if f.exists():
        return float(json.loads(f.read_text())["rbc_px"])
    from allmil_cli.stages.scale import estimate_rbc_diameter

    v = float(np.median([estimate_rbc_diameter(load_rgb(p)) for p in paths]))
    OUT.mkdir(parents=True, exist_ok=True)
    f.write_text(json.dumps({"rbc_px": v, "fields": what}))
    return v


def pbc_paths(half: str) -> list[Path]:
    """PBC images split by sorted position within each type: even -> ``design``, odd -> ``report``; up to
    ``PBC_PER_TYPE`` each (PBC has no donor ids: a split by image)."""
    from allmil_cli.train.data import DEFAULT_DATA_ROOT

    out = []
    for kind, n in PBC_PER_TYPE.items():
        files = sorted((DEFAULT_DATA_ROOT / "PBC" / kind).glob("*.jpg"))
        files = files[0::2] if half == "design" else files[1::2]
        step = max(1, len(files) // n)
        out += files[::step][:n]
    return out


def pbc_camera_rbc() -> float:
    """The known red-cell size of every PBC image (one analyser): the median ruler reading over the design half."""
    return camera_rbc("pbc", pbc_paths("design"), "PBC design half")
