"""The ``allmil`` command line. Parses arguments, calls the library, prints. No pipeline logic here.

Exit codes (also in README and ``allmil --help``):
  0  every patient was analysed (status ok)
  1  the run finished and reports were written, but some patients are failed or insufficient
  2  usage or input error (bad option, missing input folder, output folder missing, bad labels file)
  3  model error (weights missing, sha256 mismatch, model cannot be loaded, CUDA asked for but absent)
  130 interrupted (Ctrl-C); no partial report is left behind
"""

from __future__ import annotations

import csv
import io
import sys
from contextlib import closing
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from allmil_cli import __version__
from allmil_cli.cli_support import (
    _run_guard,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    Device,
    _check_output,
    _fail,
    _journal_path,
    _labels,
    _main_threads,
    _meta,
    _models,
    _patients,
    _print_summary,
    _progress,
    _review_collector,
    _run_cohort,
    _run_pipeline,
    _workers,
    _write_review,
    err,
)


EPILOG_CODES = "Exit codes: 0 all patients ok; 1 some patients failed/insufficient (reports written); 2 usage/input error; 3 model error; 130 interrupted."

app = typer.Typer(
    name="allmil",
    help=(
        "Screen blood-smear fields for Acute Lymphoblastic Leukemia, one call per patient.\n\n"
        "DIR holds one subfolder per patient with that patient's microscope fields (JPEG/PNG/TIFF).\n\n"
        "Example:  allmil diagnose ./patients --out report.csv --json report.json\n\n"
        "Research use only: not a medical device; every call needs review by a haematologist."
    ),
    epilog=EPILOG_CODES,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
)




class Remove(str, Enum):
    none = "none"
    blasts = "blasts"
    normals = "normals"


def _version(value: bool) -> None:
    if value:
        typer.echo(f"allmil {__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """allmil: ALL screening on blood-smear fields."""


# ---- shared option types --------------------------------------------------------------------------
InputDir = Annotated[Path, typer.Argument(help="Folder with one subfolder per patient (or images, with --per-image).", show_default=False)]
PerImage = Annotated[bool, typer.Option("--per-image", help="Treat every image as its own patient (ALL-IDB1 style).")]
Weights = Annotated[Optional[Path], typer.Option("--weights", help="Folder with detector/embedder/aggregator .onnx and manifest.json \\[default: shipped].")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="auto uses CUDA when onnxruntime-gpu sees a GPU, else the CPU.")]
CellSize = Annotated[Optional[float], typer.Option("--cell-size", min=4.0, help="Red-cell diameter in pixels; skips the automatic magnification estimate. ALL-IDB1 ~85, BCCD ~110.")]
Threads = Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads per model \\[default: all cores].")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary on stderr.")]
MaxPixels = Annotated[int, typer.Option("--max-pixels", min=1, help="Refuse images above this many pixels (decompression-bomb guard).")]
DecodeWorkers = Annotated[int, typer.Option("--decode-workers", min=1, max=64, help="Threads decoding upcoming images while the networks run (raise it on GPU machines).")]
DetThreshold = Annotated[Optional[float], typer.Option("--detect-threshold", min=0.0, max=1.0, help="Detector peak threshold \\[default: the model's].")]
MinCellsNormal = Annotated[int, typer.Option("--min-cells-normal", min=0, help="Adequacy: a patient with fewer white cells may be called ALL but not normal (it is 'insufficient'); from the cells-per-patient ablation (97 % held-out accuracy at 4 cells, 90 % at 2). 0 disables.")]
HtmlOut = Annotated[Optional[Path], typer.Option("--html", help="Self-contained review page: run, sortable patient table, the cells behind each call, plots. Opens offline in any browser.")]
CropsDir = Annotated[Optional[Path], typer.Option("--crops-dir", help="Save each patient's most blast-like cell crops (PNG, 224 px, with cells.csv) under this folder (created).")]
Workers = Annotated[Optional[int], typer.Option("--workers", min=1, help="Parallel workers: worker processes with --engine local, actors with --engine ray \\[default: all cores / all cluster CPUs].")]


class Engine(str, Enum):
    local = "local"
    ray = "ray"


@app.command(epilog=EPILOG_CODES)
def diagnose(
    input_dir: InputDir,
    out: Annotated[Path, typer.Option("--out", "-o", help="CSV report, one row per patient ('-' for stdout).")] = Path("report.csv"),
    json_out: Annotated[Optional[str], typer.Option("--json", help="JSON report with per-image and per-cell detail ('-' for stdout).")] = None,
    labels: Annotated[Optional[Path], typer.Option("--labels", help="CSV 'patient,label' (ALL/normal or 1/0): adds metrics.")] = None,
    per_image: PerImage = False,
    weights: Weights = None,
    device: DeviceOpt = Device.auto,
    cell_size: CellSize = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", min=0.0, max=1.0, help="p_all above which the call is ALL \\[default: the model's].")] = None,
    band: Annotated[float, typer.Option("--indeterminate-band", min=0.0, max=0.5, help="Calls with |p_all - threshold| below this are 'indeterminate'.")] = 0.05,
    min_cells: Annotated[int, typer.Option("--min-cells", min=1, help="Patients with fewer white cells are 'insufficient'.")] = 1,
    min_cells_normal: MinCellsNormal = 4,
    html: HtmlOut = None,
    crops_dir: CropsDir = None,
    detect_threshold: DetThreshold = None,
    threads: Threads = None,
    max_pixels: MaxPixels = 80_000_000,
    decode_workers: DecodeWorkers = 1,
    quiet: Quiet = False,
    resume: Annotated[bool, typer.Option("--resume", help="Skip the patients already in the journal (after a crash or kill) and finish the run; refused when weights or options differ.")] = False,
    journal: Annotated[Optional[Path], typer.Option("--journal", help="Journal file, one JSON line per finished patient \\[default: beside the report, report.journal.jsonl].")] = None,
    shard: Annotated[Optional[str], typer.Option("--shard", help="Run only shard I of N (e.g. 3/16; patients split by a hash of their id), for array jobs; combine with 'allmil merge'.")] = None,
    engine: Annotated[Engine, typer.Option("--engine", help="local: this process. ray: actors on a Ray cluster (pip install 'allmil\\[ray]').")] = Engine.local,
    workers: Workers = None,
    gpus_per_worker: Annotated[float, typer.Option("--gpus-per-worker", min=0.0, help="GPUs per Ray actor (e.g. 1, or 0.25 to share a GPU); 0 = CPU actors.")] = 0.0,
    ray_address: Annotated[Optional[str], typer.Option("--ray-address", help="Join a running Ray cluster (e.g. 10.0.0.1:6379 or auto) \\[default: start a local one].")] = None,
) -> None:
    """Call each patient ALL / normal / indeterminate, with p_all and the blast-like cells behind it.

    Example:

        allmil diagnose ./patients --out report.csv --json report.json

        allmil diagnose ALL-IDB1/im --per-image --labels labels.csv --out report.csv

        allmil diagnose ./patients --out report.csv --html review.html --crops-dir crops/

        allmil diagnose ./archive --out shard3.csv --json shard3.json --shard 3/16 --resume --engine ray
    """
    from allmil_cli.pipeline import Options
    from allmil_cli.report import csv_text, metrics_for, report_json, write_report

    if str(out) == "-" and json_out == "-":
        _fail("--out - and --json - both ask for stdout; send one of them to a file.", EXIT_USAGE)
    _check_output(out, "--out")
    _check_output(json_out, "--json")
    _check_output(html, "--html")
    _check_output(journal, "--journal")
    review = _review_collector(html, crops_dir)
    options = Options(cell_size=cell_size, threshold=threshold, indeterminate_band=band, min_cells=min_cells,
                      min_cells_normal=min_cells_normal, detect_threshold=detect_threshold, max_pixels=max_pixels,
                      decode_workers=decode_workers)
    from allmil_cli.engine import EngineConfig

    cfg = EngineConfig(engine=engine.value, workers=workers, gpus_per_worker=gpus_per_worker, ray_address=ray_address,
                       device=device.value, threads=threads)
    patients, models, pipeline, results = _run_cohort(input_dir, per_image, weights, quiet, options, cfg,
                                                      journal or _journal_path(out, json_out, resume), resume, shard, review)
    truth = _labels(labels, [p.name for p in patients])
    metrics = metrics_for(results, truth, pipeline.threshold) if truth else None
    write_report(out, csv_text(results, truth))
    meta = _meta(models, replace(options, threshold=pipeline.threshold), "diagnose")
    if json_out:
        write_report(json_out, report_json(results, meta, metrics))
    if review is not None:
        from allmil_cli.review import run_versions

        _write_review(review, html, results, {**meta, **run_versions(models), "input": str(input_dir)}, quiet, metrics=metrics,
                      labels=truth)
    if not quiet:
        _print_summary(results, pipeline, metrics)
        if str(out) != "-":
            err.print(f"report: {out}" + (f"  json: {json_out}" if json_out and json_out != "-" else "")
                      + (f"  review: {html}" if html else ""))
    raise typer.Exit(EXIT_OK if all(r.ok for r in results) else EXIT_PARTIAL)


# ---- stress-test --------------------------------------------------------------------------------
@app.command("stress-test", epilog=EPILOG_CODES)
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
    cell_size: CellSize = None,
    threads: Threads = None,
    max_pixels: MaxPixels = 80_000_000,
    decode_workers: DecodeWorkers = 1,
    workers: Workers = None,
    quiet: Quiet = False,
) -> None:
    """The paper's stress test: recall on ALL patients after removing blast cells, or normal cells.

    A model that really looks at blasts loses recall when blasts are removed and keeps it when normal
    cells are removed.

    Example:

        allmil stress-test ALL-IDB1/im --per-image --truth ALL-IDB1/xyc --out stress.csv
    """
    from allmil_cli.labels import labels_from_names
    from allmil_cli.pipeline import Options
    from allmil_cli.report import atomic_write
    from allmil_cli.stress import run_stress_test

    _check_output(out, "--out")
    _check_output(html, "--html")
    if truth is not None and not truth.is_dir():
        _fail(f"--truth {truth}: not a folder of .xyc files.", EXIT_USAGE)
    conditions = [c.value for c in (remove or [Remove.none, Remove.blasts, Remove.normals])]
    patients = _patients(input_dir, per_image, quiet)
    truth_labels = _labels(labels, [p.name for p in patients]) if labels else labels_from_names([p.name for p in patients])
    if not any(v == 1 for v in truth_labels.values()):
        _fail("no ALL patient among the labels: recall is undefined; pass --labels with at least one ALL patient.", EXIT_USAGE)
    models = _models(weights, device, _main_threads(threads, _workers(workers), patients), quiet)
    options = Options(cell_size=cell_size, max_pixels=max_pixels, truth_dir=truth, decode_workers=decode_workers,
                      workers=_workers(workers))
    review, by_condition = _review_collector(html, None), []
    with _run_guard(), _progress(len(patients) * len(conditions), quiet, "stress-test") as tick:
        def done(r) -> None:
            by_condition.append(r)
            if review:
                review.finish(r)
            tick(r.patient)

        rows = run_stress_test(models, patients, truth_labels, conditions, options, on_done=done,
                               on_field=review.on_field if review else None)
    table = Table(title="stress test (recall on ALL patients)", title_justify="left")
    for col in ("removed", "recall", "ALL called", "ALL patients", "specificity", "cells kept"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["removed"], f"{r['recall']:.4f}", str(r["tp"]), str(r["n_all"]),
                      "" if r["specificity"] != r["specificity"] else f"{r['specificity']:.4f}", str(r["cells_kept"]))
    Console().print(table)
    if out:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        atomic_write(out, buf.getvalue())
    if review is not None:
        first = by_condition[:: len(conditions)]  # results come patient by patient, conditions in order
        calls = {r.patient: {c: (x.call if x.ok else x.status) for c, x in zip(conditions, by_condition[i * len(conditions):])}
                 for i, r in enumerate(first)}
        from allmil_cli.review import run_versions

        meta = {**_meta(models, options, "stress-test"), **run_versions(models), "input": str(input_dir)}
        _write_review(review, html, first, meta, quiet, stress_rows=rows, stress_calls=calls)
    raise typer.Exit(EXIT_OK)


# ---- detect ---------------------------------------------------------------------------------------
@app.command(epilog=EPILOG_CODES)
def detect(
    input_dir: InputDir,
    out: Annotated[Path, typer.Option("--out", "-o", help="CSV, one row per detected white cell ('-' for stdout).")] = Path("detections.csv"),
    crops: Annotated[Optional[Path], typer.Option("--crops", help="Also save each cell crop as PNG under this folder (created).")] = None,
    per_image: PerImage = False,
    weights: Weights = None,
    device: DeviceOpt = Device.auto,
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
    from allmil_cli.pipeline import Options, Pipeline
    from allmil_cli.report import write_report

    _check_output(out, "--out")
    patients = _patients(input_dir, per_image, quiet)
    models = _models(weights, device, _main_threads(threads, _workers(workers), patients), quiet)
    pipeline = Pipeline(models, Options(cell_size=cell_size, detect_threshold=detect_threshold, max_pixels=max_pixels,
                                        decode_workers=decode_workers, workers=_workers(workers)))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["patient", "image", "x0", "y0", "x1", "y1", "cx", "cy", "score"])
    problems = 0
    with _run_guard(), closing(pipeline), _progress(len(patients), quiet, "detect") as tick:
        pipeline.prefetch(patients, mode="detect+crops" if crops is not None else "detect")
        for patient in patients:
            images, cells, crop_arrays = pipeline.detect_patient(patient, with_crops=crops is not None)
            for c in cells:
                w.writerow([patient.name, c.image, *(f"{v:.1f}" for v in c.box), f"{c.x:.1f}", f"{c.y:.1f}", f"{c.det_score:.4f}"])
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
                _save_crops(crops, patient.name, cells, crop_arrays)
            tick(patient.name)
    write_report(out, buf.getvalue())
    raise typer.Exit(EXIT_OK if problems == 0 else EXIT_PARTIAL)


def _save_crops(root: Path, patient: str, cells, crop_arrays) -> None:
    import numpy as np
    from PIL import Image

    from allmil_cli.report import atomic_write

    folder = root / patient
    folder.mkdir(parents=True, exist_ok=True)
    all_crops = np.concatenate(crop_arrays, axis=0)
    for i, (cell, crop) in enumerate(zip(cells, all_crops)):
        stem = Path(cell.image.replace("#", "_p")).stem
        b = io.BytesIO()
        Image.fromarray(crop).save(b, format="PNG")
        atomic_write(folder / f"{stem}_cell{i:03d}_x{int(cell.x)}_y{int(cell.y)}.png", b.getvalue())


# ---- embed ----------------------------------------------------------------------------------------
@app.command(epilog=EPILOG_CODES)
def embed(
    input_dir: InputDir,
    out: Annotated[Path, typer.Option("--out", "-o", help="NPZ file: features, boxes, blast scores, patient and image per cell.")] = Path("cells.npz"),
    per_image: PerImage = False,
    weights: Weights = None,
    device: DeviceOpt = Device.auto,
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
    import numpy as np

    from allmil_cli.pipeline import Options
    from allmil_cli.report import atomic_write

    _check_output(out, "--out")
    options = Options(cell_size=cell_size, max_pixels=max_pixels, keep_features=True, min_cells=1, decode_workers=decode_workers,
                      workers=_workers(workers))
    _, _, _, results = _run_pipeline(input_dir, per_image, weights, device, threads, quiet, options, "embed")
    feats, boxes, centres, det, blast, pat, img = [], [], [], [], [], [], []
    for r in results:
        if r.features is not None and len(r.cells):
            feats.append(r.features)
            for c in r.cells:
                boxes.append(c.box)
                centres.append((c.x, c.y))
                det.append(c.det_score)
                blast.append(c.blast_score)
                pat.append(r.patient)
                img.append(c.image)
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        features=np.concatenate(feats).astype(np.float32) if feats else np.zeros((0, 256), np.float32),
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        centres=np.asarray(centres, np.float32).reshape(-1, 2),
        det_score=np.asarray(det, np.float32),
        blast_score=np.asarray(blast, np.float32),
        patient=np.asarray(pat, dtype=str),
        image=np.asarray(img, dtype=str),
    )
    atomic_write(out, buf.getvalue())
    if not quiet:
        err.print(f"{sum(len(f) for f in feats)} cells from {len(results)} patient(s) -> {out}")
    raise typer.Exit(EXIT_OK if all(r.status != "failed" for r in results) else EXIT_PARTIAL)


# ---- merge ----------------------------------------------------------------------------------------
@app.command(epilog=EPILOG_CODES)
def merge(
    reports: Annotated[list[Path], typer.Argument(help="Shard journals (*.journal.jsonl), or shard reports with their journal beside them.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Merged CSV report ('-' for stdout).")] = Path("merged.csv"),
    json_out: Annotated[Optional[str], typer.Option("--json", help="Merged JSON report ('-' for stdout).")] = None,
    quiet: Quiet = False,
) -> None:
    """Combine the reports of shard runs (--shard I/N) into one CSV/JSON, as one run would have written it.

    Refuses a patient found in two shards, shards run with other models, allmil versions or options, and
    unfinished shards. The journals written beside each report are the source (exact, per cell).

    Example:

        allmil merge shard*.json --out merged.csv --json merged.json
    """
    from allmil_cli.merge import MergeError, merge_journals
    from allmil_cli.report import csv_text, report_json, write_report

    if str(out) == "-" and json_out == "-":
        _fail("--out - and --json - both ask for stdout; send one of them to a file.", EXIT_USAGE)
    _check_output(out, "--out")
    _check_output(json_out, "--json")
    try:
        merged = merge_journals(list(reports))
    except MergeError as exc:
        _fail(str(exc), EXIT_USAGE)
    write_report(out, csv_text(merged.results))
    if json_out:
        write_report(json_out, report_json(merged.results, merged.meta))
    if not quiet:
        err.print(f"merged {len(merged.results)} patient(s) from {len(merged.sources)} journal(s) -> {out}"
                  + (f"  json: {json_out}" if json_out and json_out != "-" else ""))
    raise typer.Exit(EXIT_OK if all(r.ok for r in merged.results) else EXIT_PARTIAL)


# ---- train --------------------------------------------------------------------------------------
TRAIN_STAGES = {
    "detector": "allmil_cli.train.detector",
    "cells": "allmil_cli.train.cells",
    "evaluate": "allmil_cli.train.evaluate",
    "protocol3": "allmil_cli.train.protocol3",
    "all": "allmil_cli.train.run_all",
}


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    epilog="Needs the training extra: pip install '.\\[train]'. Each stage has its own --help, e.g. 'allmil train detector --help'.",
)
def train(
    ctx: typer.Context,
    stage: Annotated[str, typer.Argument(help="detector | cells | evaluate | protocol3 | all | manifest", show_default=False)] = "",
) -> None:
    """Train, evaluate and export the models (needs torch: pip install '.\\[train]').

    Stages: detector (WBC detector), cells (embedder FC256 + LSTM aggregator), evaluate (protocols,
    stress test, ablations), all (everything that builds the shipped weights/), manifest (rewrite
    weights/manifest.json sha256 for models you trained yourself: allmil train manifest WEIGHTS_DIR).

    Example:

        allmil train all --data ../shared/data --out weights/
    """
    import importlib

    args = list(ctx.args)
    if stage in ("", "--help", "-h"):
        typer.echo(ctx.get_help())
        raise typer.Exit(EXIT_OK)
    if stage == "manifest":
        from allmil_cli.models import write_manifest

        folder = Path(args[0]) if args else Path("weights")
        if not folder.is_dir():
            _fail(f"{folder}: not a folder of .onnx models.", EXIT_USAGE)
        for name, digest in write_manifest(folder).items():
            typer.echo(f"{digest}  {name}")
        raise typer.Exit(EXIT_OK)
    if stage not in TRAIN_STAGES:
        _fail(f"unknown training stage {stage!r}; use one of: {', '.join(TRAIN_STAGES)}, manifest.", EXIT_USAGE)
    try:
        import torch  # noqa: F401
    except ImportError:
        _fail("training needs PyTorch: pip install '.[train]' (torch and torchvision).", EXIT_USAGE)
    import inspect

    module = importlib.import_module(TRAIN_STAGES[stage])
    if inspect.signature(module.main).parameters:
        code = module.main(args)
    else:  # argparse mains that read sys.argv
        saved = sys.argv
        sys.argv = [f"allmil train {stage}", *args]
        try:
            code = module.main()
        finally:
            sys.argv = saved
    raise typer.Exit(int(code or 0))


def run() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    run()
