"""``allmil detect`` (one CSV row per white cell, optional crop PNGs) and ``allmil embed`` (per-cell features as
.npz). Parse, call the library (:mod:`allmil_cli.io.cell_export`), print; registered on the app in ``cli/app.py``."""

from __future__ import annotations

from contextlib import closing
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from allmil_cli.cli.console import (
    EXIT_OK,
    EXIT_PARTIAL,
    Device,
    Precision,
    err,
    progress_bar,
    run_guard,
)
from allmil_cli.cli.inputs import (
    find_patients,
    models_for_run,
    warm_workers,
    worker_count,
)
from allmil_cli.cli.options import (
    CellSize,
    DecodeWorkers,
    DetThreshold,
    DeviceOpt,
    InputDir,
    MaxPixels,
    PerImage,
    PrecisionOpt,
    Quiet,
    Threads,
    Weights,
    Workers,
)
from allmil_cli.cli.outputs import check_outputs, fails_cleanly
from allmil_cli.cli.runs import run_pipeline


@fails_cleanly
def detect(
    input_dir: InputDir,
    out: Annotated[Path, typer.Option("--out", "-o", help="CSV, one row per detected white cell ('-' for stdout).")] = Path("detections.csv"),
    crops: Annotated[Optional[Path], typer.Option("--crops", help="Also save each cell crop as PNG under this folder (created).")] = None,
    per_image: PerImage = False,
    weights: Weights = None,
    device: DeviceOpt = Device.auto,
    precision: PrecisionOpt = Precision.fp32,
    cell_size: CellSize = None,
    detect_threshold: DetThreshold = None,
    threads: Threads = None,
    max_pixels: MaxPixels = 80_000_000,
    decode_workers: DecodeWorkers = 1,
    workers: Workers = None,
    quiet: Quiet = False,
) -> None:
    """Find the white blood cells in every field: one CSV row per cell (patient, image, box, score).

    Example:

        allmil detect ./patients --out detections.csv --crops ./crops
    """
    check_outputs({"--out": out}, {"--crops": crops})
    warm_workers(input_dir, workers, device)
    from allmil_cli.io.cell_export import DetectionsCsv, save_crops
    from allmil_cli.io.report import write_report
    from allmil_cli.pipeline.runner import Pipeline
    from allmil_cli.types.results import Options

    patients = find_patients(input_dir, per_image, quiet)
    options = Options(cell_size=cell_size, detect_threshold=detect_threshold, max_pixels=max_pixels,
                      decode_workers=decode_workers, workers=worker_count(workers), precision=precision.value)
    pipeline = Pipeline(models_for_run(weights, device, threads, options, patients, quiet), options)
    detections = DetectionsCsv()
    problems = 0
    with run_guard(), closing(pipeline), progress_bar(len(patients), quiet, "detect") as tick:
        pipeline.prefetch(patients, mode="detect+crops" if crops is not None else "detect")
        for patient in patients:
            images, cells, crop_arrays = pipeline.detect_patient(patient, with_crops=crops is not None)
            detections.add(patient.name, cells)
            for img in images:
                if img.status != "ok":
                    problems += 1
                    if not quiet:
                        err.print(f"[yellow]skipped:[/] {escape(img.reason)}", soft_wrap=True)
            if not patient.images:
                problems += 1
                if not quiet:
                    err.print(f"[yellow]empty:[/] {escape(str(patient.folder))} holds no image.", soft_wrap=True)
            if crops is not None and crop_arrays:
                save_crops(crops, patient.name, cells, crop_arrays)
            tick(patient.name)
    write_report(out, detections.text())
    raise typer.Exit(EXIT_OK if problems == 0 else EXIT_PARTIAL)


@fails_cleanly
def embed(
    input_dir: InputDir,
    out: Annotated[Path, typer.Option("--out", "-o", help="NPZ file: features, boxes, blast scores, patient and image per cell.")] = Path("cells.npz"),
    per_image: PerImage = False,
    weights: Weights = None,
    device: DeviceOpt = Device.auto,
    precision: PrecisionOpt = Precision.fp32,
    cell_size: CellSize = None,
    threads: Threads = None,
    max_pixels: MaxPixels = 80_000_000,
    decode_workers: DecodeWorkers = 1,
    workers: Workers = None,
    quiet: Quiet = False,
) -> None:
    """Per-cell 256-d feature vectors, boxes and blast scores for every detected cell, as one .npz.

    Arrays: features (N,256) float32, boxes (N,4), centres (N,2), det_score (N), blast_score (N),
    patient (N) str, image (N) str.

    Example:

        allmil embed ./patients --out cells.npz
    """
    check_outputs({"--out": out})
    warm_workers(input_dir, workers, device)
    from allmil_cli.io.cell_export import cells_npz
    from allmil_cli.io.report import atomic_write
    from allmil_cli.types.results import Options

    options = Options(cell_size=cell_size, max_pixels=max_pixels, keep_features=True, min_cells=1, decode_workers=decode_workers,
                      workers=worker_count(workers), precision=precision.value)
    _, _, _, results = run_pipeline(input_dir, per_image, weights, device, threads, quiet, options, "embed")
    data, n_cells = cells_npz(results)
    atomic_write(out, data)
    if not quiet:
        err.print(f"{n_cells} cells from {len(results)} patient(s) -> {out}")
    raise typer.Exit(EXIT_OK if all(r.status != "failed" for r in results) else EXIT_PARTIAL)
