"""``allmil stress-test``: the paper's stress test (recall after removing blast or normal cells) as a table, a CSV
and a review page. Parse, call the library (:mod:`allmil_cli.pipeline.stress`), print; registered on the app in ``cli/app.py``."""

from __future__ import annotations

from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from allmil_cli.cli.calibrate import SiteOpt, site_profile
from allmil_cli.cli.console import (
    EXIT_OK,
    EXIT_USAGE,
    Device,
    Precision,
    fail,
    progress_bar,
    run_guard,
)
from allmil_cli.cli.inputs import (
    find_patients,
    load_labels,
    models_for_run,
    report_meta,
    warm_workers,
    worker_count,
)
from allmil_cli.cli.options import (
    CellSize,
    DecodeWorkers,
    DeviceOpt,
    HtmlOut,
    InputDir,
    MaxPixels,
    MinCellsNormal,
    PerImage,
    PrecisionOpt,
    Quiet,
    Threads,
    Weights,
    Workers,
)
from allmil_cli.cli.outputs import check_outputs, fails_cleanly
from allmil_cli.cli.runs import review_collector, write_review


class Remove(str, Enum):
    none = "none"
    blasts = "blasts"
    normals = "normals"


@fails_cleanly
def stress_test(
    input_dir: InputDir,
    remove: Annotated[Optional[list[Remove]], typer.Option("--remove", help="Condition(s) to run; repeat the flag. \\[default: none, blasts, normals]")] = None,
    truth: Annotated[Optional[Path], typer.Option("--truth", help="Folder of <image-stem>.xyc blast centroids (ALL-IDB1 xyc/). Without it, cells are removed by the model's own blast score.")] = None,
    labels: Annotated[Optional[Path], typer.Option("--labels", help="CSV 'patient,label'. Without it, ALL-IDB names (_1 = ALL) are used when they fit.")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="CSV with one row per condition (recall and counts).")] = None,
    html: HtmlOut = None,
    per_image: PerImage = False,
    weights: Weights = None,
    device: DeviceOpt = Device.auto,
    precision: PrecisionOpt = Precision.fp32,
    cell_size: CellSize = None,
    threads: Threads = None,
    max_pixels: MaxPixels = 80_000_000,
    decode_workers: DecodeWorkers = 1,
    workers: Workers = None,
    site: SiteOpt = None,
    min_cells_normal: MinCellsNormal = 4,
    quiet: Quiet = False,
) -> None:
    """The paper's stress test: recall on ALL patients after removing blast cells, or normal cells.

    A model that really looks at blasts loses recall when blasts are removed and keeps it when normal
    cells are removed.

    Example:

        allmil stress-test ALL-IDB1/im --per-image --truth ALL-IDB1/xyc --out stress.csv
    """
    check_outputs({"--out": out, "--html": html})
    warm_workers(input_dir, workers, device)
    from allmil_cli.io.report import atomic_write
    from allmil_cli.pipeline.stress import calls_by_patient, rows_csv, run_stress_test
    from allmil_cli.stages.labels import labels_from_names
    from allmil_cli.types.results import Options

    if truth is not None and not truth.is_dir():
        fail(f"--truth {truth}: not a folder of .xyc files.", EXIT_USAGE)
    conditions = [c.value for c in (remove or [Remove.none, Remove.blasts, Remove.normals])]
    patients = find_patients(input_dir, per_image, quiet)
    truth_labels = load_labels(labels, [p.name for p in patients]) if labels else labels_from_names([p.name for p in patients])
    if not any(v == 1 for v in truth_labels.values()):
        fail("no ALL patient among the labels: recall is undefined; pass --labels with at least one ALL patient.", EXIT_USAGE)
    options = Options(cell_size=cell_size, max_pixels=max_pixels, truth_dir=truth, decode_workers=decode_workers,
                      workers=worker_count(workers), precision=precision.value, min_cells_normal=min_cells_normal)
    profile = site_profile(site, weights, precision.value)
    if profile is not None:
        options = replace(options, rule=profile.rule, cell_threshold=profile.cell_threshold, site=profile.sha256)
    models = models_for_run(weights, device, threads, options, patients, quiet)
    review, by_condition = review_collector(html, None), []
    with run_guard(), progress_bar(len(patients) * len(conditions), quiet, "stress-test") as tick:
        def done(r) -> None:
            by_condition.append(r)
            if review:
                review.finish(r)
            tick(r.patient)

        rows = run_stress_test(models, patients, truth_labels, conditions, options, on_done=done,
                               on_field=review.on_field if review else None)
    table = Table(title="stress test (recall on ALL patients)", title_justify="left")
    for col in ("removed", "recall (ALL)", "recall (ALL or review)", "ALL called", "ALL patients", "specificity", "cells kept"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["removed"], f"{r['recall']:.4f}", f"{r['recall_screen']:.4f}", str(r["tp"]), str(r["n_all"]),
                      "" if r["specificity"] != r["specificity"] else f"{r['specificity']:.4f}", str(r["cells_kept"]))
    Console().print(table)
    if out:
        atomic_write(out, rows_csv(rows))
    if review is not None:
        first, calls = calls_by_patient(by_condition, conditions)
        from allmil_cli.io.review import run_versions

        meta = {**report_meta(models, options, "stress-test"), **run_versions(models), "input": str(input_dir)}
        if profile is not None:
            meta["site_profile"] = profile.meta()
        write_review(review, html, first, meta, quiet, stress_rows=rows, stress_calls=calls)
    raise typer.Exit(EXIT_OK)
