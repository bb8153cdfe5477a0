"""Stage 4: reports. CSV (one row per patient), JSON (per image and per cell), metrics.

Every file is written atomically: to a temporary file in the same folder, then renamed over the
target, so a crash or Ctrl-C never leaves a half-written report. The file gets the mode a plain
``open()`` would give it (0666 less the user's umask), not the temp file's private 0600.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from allmil_cli.stages.metrics import binary_metrics
from allmil_cli.io.outputs import OutputError
from allmil_cli.types.results import PatientResult

CSV_COLUMNS = ["patient", "status", "call", "p_all", "n_images", "n_cells", "n_blast_like", "blast_fraction", "blast_pct",
               "blast_pct_lo", "blast_pct_hi", "qc", "reason"]


def current_umask() -> int:
    """The process umask (read from /proc when possible: setting it to probe is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write ``data`` to ``path`` via a temp file + rename in the same folder, with the umask's mode.

    Any ``OSError`` (read-only, permission, disk full, quota...) is raised as :class:`OutputError` naming ``path``;
    the temp file is removed first, whatever the error (Ctrl-C included)."""
    path = Path(path)
    mode = "wb" if isinstance(data, bytes) else "w"
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(path, exc) from exc
    try:
        with os.fdopen(fd, mode, **({} if mode == "wb" else {"encoding": "utf-8", "newline": ""})) as f:
            f.write(data)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError):
            raise OutputError(path, exc) from exc
        raise


def _num(x: float, digits: int = 4) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def csv_text(results: Sequence[PatientResult], labels: dict[str, int] | None = None) -> str:
    buf = io.StringIO()
    columns = CSV_COLUMNS + (["label"] if labels else [])
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for r in results:
        row = [r.patient, r.status, r.call, _num(r.p_all), r.n_images, r.n_cells, r.n_blast_like, _num(r.blast_fraction),
               _num(r.blast_pct, 1), _num(r.blast_pct_lo, 1), _num(r.blast_pct_hi, 1), ";".join(r.qc), r.reason]
        if labels:
            lab = labels.get(r.patient)
            row.append("" if lab is None else ("ALL" if lab else "normal"))
        w.writerow(row)
    return buf.getvalue()


def _clean(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):  # e.g. an image's FieldStats
        return _clean(dataclasses.asdict(x))
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else round(x, 6)
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def patient_json(r: PatientResult) -> dict[str, Any]:
    """One patient's JSON entry (hand-built: ``dataclasses.asdict`` deep-copies every cell, slowly)."""
    d: dict[str, Any] = {k: getattr(r, k) for k in CSV_COLUMNS}
    d["images"] = [vars(i).copy() for i in r.images]
    d["cells"] = [
        {"image": c.image, "x": c.x, "y": c.y, "box": list(c.box), "det_score": c.det_score,
         "merged_scores": list(c.merged_scores),
         "blast_score": c.blast_score, "blast_like": bool(c.blast_score >= r.cell_threshold) if r.cell_threshold else None,
         "removed": c.removed, "same_as": c.same_as, "merged": c.merged}
        for c in r.cells
    ]
    d["notes"] = list(r.notes)
    d["qc_details"] = dict(r.qc_details)
    d["rule"] = dict(r.rule)
    d["qc"] = list(getattr(r, "qc", None) or [])
    d["skipped"] = [dict(s) for s in getattr(r, "skipped", None) or []]
    return _clean(d)


def metrics_for(results: Sequence[PatientResult], labels: dict[str, int], threshold: float) -> dict[str, Any] | None:
    """Metrics over the ``ok`` patients that have a label.

    The headline metrics score the ``ALL`` call (ALL vs review or normal: ALL-call sensitivity and specificity);
    ``screen`` scores ALL or review vs normal (a screen misses an ALL patient only when it is called normal); ROC AUC
    ranks by p_all, ``p_all`` holds the metrics of p_all >= ``threshold`` (the LSTM alone, the paper's view)."""
    rows = [(labels[r.patient], r) for r in results if r.ok and r.patient in labels]
    if not rows:
        return None
    y = [a for a, _ in rows]
    s = [r.p_all for _, r in rows]
    m = binary_metrics(y, [int(r.call == "ALL") for _, r in rows], s)
    m["screen"] = binary_metrics(y, [int(r.call != "normal") for _, r in rows], s)
    m["p_all"] = binary_metrics(y, [int(v >= threshold) for v in s], s)
    m["threshold"] = threshold
    m["n_unlabelled"] = sum(1 for r in results if r.patient not in labels)
    m["n_not_ok"] = sum(1 for r in results if not r.ok and r.patient in labels)
    m["n_review"] = sum(1 for _, r in rows if r.call == "review")
    return m


def report_json(results: Sequence[PatientResult], meta: dict[str, Any], metrics: dict[str, Any] | None = None) -> str:
    doc = {**meta, "metrics": _clean(metrics) if metrics else None, "patients": [patient_json(r) for r in results]}
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def write_report(path: str | Path, text: str) -> None:
    """Write a report to ``path`` atomically, or to stdout when ``path`` is ``-``."""
    if str(path) == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        atomic_write(Path(path), text)
