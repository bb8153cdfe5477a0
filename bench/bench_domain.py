"""Cost of the cross-lab steps, measured side by side in one run on the same decoded fields.

* ``ruler only``: ``scale.estimate_rbc_diameter`` (what v1 measured per field);
* ``measure``: ``scale.measure_field`` (ruler + anchor colours + sharpness, one thumbnail);
* ``stain map``: building the field's lookup table (``normalize.stain_map``) and applying it to the field's crops;
* ``qc``: ``qc.patient_qc`` for the field;
* ``analyse``: the rest of one field's work with the shipped models (detector, crops, embedder), for scale.

``python bench/bench_domain.py [--fields 24]`` appends a table to ``bench/RESULTS.md``. Needs ../shared/data.
"""

from __future__ import annotations

import argparse
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from PIL import Image

from allmil_cli.stages.crops import crop_cells
from allmil_cli.types.field import Field
from allmil_cli.stages.models import load_models
from allmil_cli.stages.normalize import stain_map
from allmil_cli.pipeline.runner import Pipeline
from allmil_cli.stages.qc import patient_qc
from allmil_cli.stages.scale import estimate_rbc_diameter, measure_field

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "ALL-IDB1" / "im"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fields", type=int, default=24)
    a = ap.parse_args()
    paths = sorted(DATA.glob("*.jpg"))[: a.fields]
    rgbs = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    pipe = Pipeline(load_models(device="cpu", threads=1))
    t = {k: 0.0 for k in ("ruler only", "measure", "stain map", "qc", "analyse")}
    n_cells = 0
    for p, rgb in zip(paths, rgbs):
        s = time.perf_counter()
        estimate_rbc_diameter(rgb)
        t["ruler only"] += time.perf_counter() - s
        s = time.perf_counter()
        stats = measure_field(rgb)
        t["measure"] += time.perf_counter() - s
        s = time.perf_counter()
        cells, _ = pipe.locate_cells(Field(path=p, page=0, rgb=rgb), stats)
        crops = crop_cells(rgb, np.asarray([(c.x, c.y) for c in cells]).reshape(-1, 2), stats.rbc_px)
        pipe.embedder.embed(crops)
        t["analyse"] += time.perf_counter() - s
        n_cells += len(cells)
        s = time.perf_counter()
        stain_map(stats).apply(crops)
        t["stain map"] += time.perf_counter() - s
        s = time.perf_counter()
        patient_qc([(p.name, stats)], len(cells), 4)
        t["qc"] += time.perf_counter() - s
    n = len(paths)
    base = t["ruler only"] + t["analyse"]
    new = t["measure"] + t["analyse"] + t["stain map"] + t["qc"]
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    rows = [f"\n### Cross-lab steps ({stamp} UTC, {platform.processor() or platform.machine()}, 1 thread, {n} ALL-IDB1 fields, "
            f"{n_cells} cells; `python bench/bench_domain.py --fields {n}`)\n",
            "| step | ms/field |", "|---|---|"]
    rows += [f"| {k} | {1000 * v / n:.1f} |" for k, v in t.items()]
    rows.append(f"| **per-field work, v1 (ruler + analyse) vs now (measure + analyse + stain map + qc)** | "
                f"{1000 * base / n:.1f} vs {1000 * new / n:.1f} (+{100 * (new / base - 1):.1f} %) |")
    text = "\n".join(rows) + "\n"
    with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
