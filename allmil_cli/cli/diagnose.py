"""``allmil diagnose`` (one call per patient: shards, resume, local or Ray engine) and ``allmil merge`` (the
shard reports into one). Parse, call the library, print; registered on the app in ``cli/app.py``."""

from __future__ import annotations

from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from allmil_cli.cli.calibrate import SiteOpt, site_profile
from allmil_cli.cli.console import (
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    Device,
    Precision,
    err,
    fail,
)
from allmil_cli.cli.inputs import load_labels, report_meta, warm_workers
from allmil_cli.cli.options import (
    CellSize,
    CropsDir,
    DecodeWorkers,
    DetThreshold,
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
from allmil_cli.cli.runs import (
    diagnose_cohort,
    print_summary,
    resolve_journal,
    review_collector,
    write_review,
)


class Engine(str, Enum):
    local = "local"
    ray = "ray"


@fails_cleanly
def diagnose(
    input_dir: InputDir,
    out: Annotated[Path, typer.Option("--out", "-o", help="CSV report, one row per patient ('-' for stdout).")] = Path("report.csv"),
    json_out: Annotated[Optional[str], typer.Option("--json", help="JSON report with per-image and per-cell detail ('-' for stdout).")] = None,
    labels: Annotated[Optional[Path], typer.Option("--labels", help="CSV 'patient,label' (ALL/normal or 1/0): adds metrics.")] = None,
    per_image: PerImage = False,
    weights: Weights = None,
    device: DeviceOpt = Device.auto,
    precision: PrecisionOpt = Precision.fp32,
    cell_size: CellSize = None,
    threshold: Annotated[Optional[float], typer.Option("--threshold", min=0.0, max=1.0, help="p_all threshold of the LSTM-only metrics that --labels adds (the call itself is the blast-percentage rule) \\[default: the model's].")] = None,
    cell_threshold: Annotated[Optional[float], typer.Option("--cell-threshold", min=0.0, max=1.01, help="Blast score at or above which a cell counts as blast-like \\[default: the model's].")] = None,
    site: SiteOpt = None,
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
    """Call each patient ALL / review / normal from its blast-like percentage (with its 95 % interval), and p_all.

    Example:

        allmil diagnose ./patients --out report.csv --json report.json

        allmil diagnose ALL-IDB1/im --per-image --labels labels.csv --out report.csv

        allmil diagnose ./patients --out report.csv --html review.html --crops-dir crops/

        allmil diagnose ./archive --out shard3.csv --json shard3.json --shard 3/16 --resume --engine ray
    """
    if str(out) == "-" and json_out == "-":
        fail("--out - and --json - both ask for stdout; send one of them to a file.", EXIT_USAGE)
    if site is not None and cell_threshold is not None:
        fail("--site and --cell-threshold both set the cell threshold; the profile's is part of its rule: drop one.", EXIT_USAGE)
    journal = journal or resolve_journal(out, json_out, resume)
    check_outputs({"--out": out, "--json": json_out, "--html": html}, {"--crops-dir": crops_dir}, journal=journal)
    warm_workers(input_dir, workers, device, engine.value)
    from allmil_cli.io.report import csv_text, metrics_for, report_json, write_report
    from allmil_cli.types.results import Options

    review = review_collector(html, crops_dir)
    options = Options(cell_size=cell_size, threshold=threshold, cell_threshold=cell_threshold, min_cells=min_cells,
                      min_cells_normal=min_cells_normal, detect_threshold=detect_threshold, max_pixels=max_pixels,
                      decode_workers=decode_workers, precision=precision.value)
    profile = site_profile(site, weights, precision.value)
    if profile is not None:  # the lab's rule; its sha256 goes into the options, so the journal and merge check it
        options = replace(options, rule=profile.rule, cell_threshold=profile.cell_threshold, site=profile.sha256)
    from allmil_cli.executors.engine import EngineConfig

    cfg = EngineConfig(engine=engine.value, workers=workers, gpus_per_worker=gpus_per_worker, ray_address=ray_address,
                       device=device.value, threads=threads)
    patients, models, pipeline, results = diagnose_cohort(input_dir, per_image, weights, quiet, options, cfg,
                                                      journal, resume, shard, review)
    truth = load_labels(labels, [p.name for p in patients])
    metrics = metrics_for(results, truth, pipeline.threshold) if truth else None
    write_report(out, csv_text(results, truth))
    meta = report_meta(models, replace(options, threshold=pipeline.threshold), "diagnose")
    if profile is not None:
        meta["site_profile"] = profile.meta()
    if json_out:
        write_report(json_out, report_json(results, meta, metrics))
    if review is not None:
        from allmil_cli.io.review import run_versions

        write_review(review, html, results, {**meta, **run_versions(models), "input": str(input_dir)}, quiet, metrics=metrics,
                      labels=truth)
    if not quiet:
        print_summary(results, pipeline, metrics)
        if str(out) != "-":
            err.print(f"report: {out}" + (f"  json: {json_out}" if json_out and json_out != "-" else "")
                      + (f"  review: {html}" if html else ""))
    raise typer.Exit(EXIT_OK if all(r.ok for r in results) else EXIT_PARTIAL)


@fails_cleanly
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
    from allmil_cli.io.merge import MergeError, merge_journals
    from allmil_cli.io.report import csv_text, report_json, write_report

    if str(out) == "-" and json_out == "-":
        fail("--out - and --json - both ask for stdout; send one of them to a file.", EXIT_USAGE)
    check_outputs({"--out": out, "--json": json_out})
    try:
        merged = merge_journals(list(reports))
    except MergeError as exc:
        fail(str(exc), EXIT_USAGE)
    write_report(out, csv_text(merged.results))
    if json_out:
        write_report(json_out, report_json(merged.results, merged.meta))
    if not quiet:
        err.print(f"merged {len(merged.results)} patient(s) from {len(merged.sources)} journal(s) -> {out}"
                  + (f"  json: {json_out}" if json_out and json_out != "-" else ""))
    raise typer.Exit(EXIT_OK if all(r.ok for r in merged.results) else EXIT_PARTIAL)
