"""The paper's stress test: does the patient call depend on the blasts?

For every patient the expensive part (decode, detect, embed) runs once; the call is then repeated
with blast cells removed, with normal cells removed, and with nothing removed. Cells are classed as
blasts by ground-truth centroids when ``Options.truth_dir`` is set (ALL-IDB1 ``xyc/``), else by the
model's own per-cell blast score.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence

from allmil_cli.types.field import Field
from allmil_cli.types.field import Patient
from allmil_cli.stages.metrics import binary_metrics
from allmil_cli.stages.models import Models
from allmil_cli.types.results import Cell, Options, PatientResult
from allmil_cli.pipeline.runner import Pipeline


def run_stress_test(
    models: Models,
    patients: Sequence[Patient],
    labels: dict[str, int],
    conditions: Sequence[str],
    options: Options,
    on_done: Callable[[PatientResult], None] | None = None,
    on_field: Callable[[Patient, Field, list[Cell], float], None] | None = None,
) -> list[dict]:
    """One row per condition: recall over labelled ALL patients (+ specificity, counts).

    ``on_done`` gets every patient's result under every condition (patients in order, conditions in the
    order given); ``on_field`` is :attr:`Pipeline.on_field` (the review page's thumbnails).
    """
    pipeline = Pipeline(models, options, on_field=on_field)
    by_condition: dict[str, list[PatientResult]] = {c: [] for c in conditions}
    labelled = [p for p in patients if p.name in labels]
    pipeline.prefetch(labelled)
    try:
        for patient in labelled:
            evidence = pipeline.collect(patient)
            for cond in conditions:
                result = pipeline.decide(patient, evidence, remove=cond)
                by_condition[cond].append(result)
                if on_done:
                    on_done(result)
    finally:
        pipeline.close()
    rows = []
    for cond, results in by_condition.items():
        # Recall of the ALL call (the patient rule, allmil_cli.stages.decision). A patient left with no cell cannot be called
        # ALL: it counts as a negative call. ``recall_screen``: called ALL or review (not normal).
        y = [labels[r.patient] for r in results]
        pred = [int(r.ok and r.call == "ALL") for r in results]
        m = binary_metrics(y, pred)
        screen = binary_metrics(y, [int(r.call != "normal") for r in results])
        rows.append(
            {
                "removed": cond,
                "recall": m["sensitivity"],
                "recall_screen": screen["sensitivity"],
                "specificity": m["specificity"],
                "tp": m["tp"],
                "n_all": m["tp"] + m["fn"],
                "n_normal": m["tn"] + m["fp"],
                "cells_kept": sum(r.n_cells for r in results),
                "insufficient": sum(1 for r in results if not r.ok),
                "by": "ground truth" if options.truth_dir else "model blast score",
            }
        )
    return rows


def rows_csv(rows: Sequence[dict]) -> str:
    """:func:`run_stress_test`'s rows as CSV text, one row per condition."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def calls_by_patient(results: Sequence[PatientResult], conditions: Sequence[str]) -> tuple[list[PatientResult], dict[str, dict[str, str]]]:
    """From ``on_done``'s results (patients in order, conditions in order): each patient's result under the first
    condition, and per patient its call (or status, when not ok) under every condition."""
    first = list(results[:: len(conditions)])
    calls = {r.patient: {c: (x.call if x.ok else x.status) for c, x in zip(conditions, results[i * len(conditions):])}
             for i, r in enumerate(first)}
    return first, calls
