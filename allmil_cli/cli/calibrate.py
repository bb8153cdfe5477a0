"""``allmil calibrate``: fit the patient rule to a lab's own labelled patients and write a site profile (YAML).

Parse, run the library (:mod:`allmil_cli.stages.calibrate`, :mod:`allmil_cli.io.site`), print; registered in ``cli/app.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from allmil_cli.cli.console import (
    EXIT_USAGE,
    Device,
    err,
    fail,
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
    DeviceOpt,
    InputDir,
    MaxPixels,
    PerImage,
    Quiet,
    Threads,
    Weights,
    Workers,
)
from allmil_cli.cli.outputs import check_outputs, fails_cleanly

SiteOpt = Annotated[Optional[Path], typer.Option("--site", help="Site profile made by 'allmil calibrate' (YAML): this lab's patient rule (docs/validating.md).")]


def site_profile(site: Optional[Path], weights: Optional[Path], precision: str):
    """The checked site profile for a run with these weights (None without --site); exit 2 when it does not fit."""
    if site is None:
        return None
    import json

    from allmil_cli import __version__
    from allmil_cli.io.site import SiteError, load_profile
    from allmil_cli.stages.models import (
        MANIFEST,
        default_weights_dir,
        model_files,
        sha256_of,
    )

    wdir = Path(weights) if weights else default_weights_dir()
    names = list(model_files(precision).values())
    try:  # the run refuses any file whose bytes differ from its manifest, so the manifest's sha256 are this run's
        listed = json.loads((wdir / MANIFEST).read_text())["sha256"]
        digests = {name: listed[name] for name in names}
    except (OSError, ValueError, KeyError, TypeError):  # no usable manifest: hash the files (the run then says why)
        digests = {name: sha256_of(wdir / name) for name in names if (wdir / name).is_file()}
    try:
        return load_profile(site, digests, __version__)
    except SiteError as exc:
        fail(str(exc), EXIT_USAGE)


def _pct(r) -> str:
    return "not measured" if r is None else f"{100 * r.value:.0f} % (95 % CI {100 * r.lo:.0f}-{100 * r.hi:.0f} %; {r.k}/{r.n})"


@fails_cleanly
def calibrate(
    input_dir: InputDir,
    labels: Annotated[Path, typer.Option("--labels", help="CSV 'patient,label' (ALL/normal or 1/0); normal patients only is fine. At least 10 normal patients.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The site profile to write (YAML).")] = Path("site.yaml"),
    per_image: PerImage = False,
    weights: Weights = None,
    device: DeviceOpt = Device.auto,
    cell_size: CellSize = None,
    threads: Threads = None,
    max_pixels: MaxPixels = 80_000_000,
    workers: Workers = None,
    quiet: Quiet = False,
) -> None:
    """Fit the patient rule to your lab's own patients and write a site profile for 'diagnose --site'.

    The profile holds what your normal patients showed (stain, blast-like background), the rule fitted to them and
    its leave-one-patient-out sensitivity and specificity with 95 % intervals. See docs/validating.md.

    Example:

        allmil calibrate ./cleared_patients --labels labels.csv --out site.yaml

        allmil diagnose ./patients --site site.yaml --out report.csv
    """
    from allmil_cli import __version__
    from allmil_cli.io.report import write_report
    from allmil_cli.io.site import profile_text
    from allmil_cli.pipeline.runner import Pipeline
    from allmil_cli.stages.calibrate import MIN_NORMAL_PATIENTS, Counts, fit_site
    from allmil_cli.stages.labels import LabelsError, read_labels
    from allmil_cli.types.results import Options

    check_outputs({"--out": out})
    try:
        truth = read_labels(labels, strict=True)
    except LabelsError as exc:
        fail(str(exc), EXIT_USAGE)
    patients = find_patients(input_dir, per_image, quiet)
    names = {p.name for p in patients}
    missing = sorted(n for n in truth if n not in names)
    if missing:
        fail(f"{labels}: {len(missing)} labelled patient(s) have no folder in {input_dir}: {', '.join(missing[:5])}"
              + (" ..." if len(missing) > 5 else "") + ". Fix the names or remove those lines.", EXIT_USAGE)
    n_normal = sum(1 for n, y in truth.items() if y == 0)
    if n_normal < MIN_NORMAL_PATIENTS:
        fail(f"{labels}: {n_normal} normal patient(s); calibration needs at least {MIN_NORMAL_PATIENTS} cleared (normal) "
              "patients to bound this lab's normal blast-like rate (with fewer, even a perfect run leaves a 95 % upper "
              "bound above 28 % on the false-ALL rate). Add normal patients.", EXIT_USAGE)
    chosen = [p for p in patients if p.name in truth]
    unlabelled = len(patients) - len(chosen)
    if unlabelled and not quiet:
        err.print(f"[yellow]note:[/] {unlabelled} patient folder(s) not in {escape(str(labels))} are left out.")
    warm_workers(input_dir, workers, device)
    options = Options(cell_size=cell_size, max_pixels=max_pixels, workers=worker_count(workers), min_cells_normal=0)
    models = models_for_run(weights, device, threads, options, chosen, quiet)
    pipeline = Pipeline(models, options)
    results = []
    with run_guard(), progress_bar(len(chosen), quiet, "calibrate") as tick:
        for result in pipeline.run(chosen):
            results.append(result)
            tick(result.patient)
    counts = [Counts(r.patient, truth[r.patient], r.n_cells if r.status != "failed" else 0, r.n_blast_like) for r in results]
    try:
        fit = fit_site(counts, pipeline.rule)
    except ValueError as exc:
        fail(f"{labels}: {exc}", EXIT_USAGE)
    stats = [i.stats for r in results if truth[r.patient] == 0 for i in r.images if i.status == "ok" and i.stats and i.stats.measured]
    import numpy as np

    stain = {"n_fields": len(stats),
             "background_rgb": [round(float(v), 1) for v in np.median([s.background_rgb for s in stats], axis=0)] if stats else None,
             "rbc_rgb": [round(float(v), 1) for v in np.median([s.rbc_rgb for s in stats], axis=0)] if stats else None,
             "rbc_px_median": round(float(np.median([s.rbc_px for s in stats])), 1) if stats else None}
    source = {"folder": str(input_dir), "labels": str(labels), "n_normal": sum(1 for c in counts if c.label == 0),
              "n_all": sum(1 for c in counts if c.label == 1), "n_cells": int(sum(c.n_cells for c in counts)),
              "n_fields": int(sum(r.n_images for r in results))}
    text = profile_text(fit, counts, models_sha256=models.sha256, version=__version__, cell_threshold=pipeline.cell_threshold,
                        stain=stain, source=source)
    write_report(out, text)
    if quiet:
        return
    p, shipped = fit.params, pipeline.rule
    table = Table(title=f"allmil calibrate: {len(counts)} patients ({source['n_normal']} normal, {source['n_all']} ALL)",
                  title_justify="left")
    table.add_column("")
    table.add_column("shipped")
    table.add_column("this lab")
    table.add_row("normal blood: blast-like up to", f"{100 * shipped.background:.1f} %",
                  f"{100 * p.background:.1f} % ({fit.background_how})")
    table.add_row("ALL level", f"{100 * shipped.all_rate:.1f} %", f"{100 * p.all_rate:.1f} % ({fit.all_criterion})")
    table.add_row("sensitivity (leave-one-out)", "", _pct(fit.sensitivity))
    table.add_row("specificity (leave-one-out)", "", _pct(fit.specificity))
    table.add_row("normal patients called normal", "", _pct(fit.normal_calls))
    err.print(table)
    for w in fit.warnings:
        err.print(f"[yellow]warning:[/] {escape(w)}", soft_wrap=True)
    err.print(f"site profile: {out}  (use: allmil diagnose DIR --site {out})")
