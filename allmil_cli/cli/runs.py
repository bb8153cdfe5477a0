"""A command's run: the pipeline over the patients, or ``diagnose``'s cohort (shards, engine, journal), then the
review page and the terminal summary."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from rich.markup import escape

from allmil_cli.cli.console import (
    EXIT_USAGE,
    SUMMARY_ROWS,
    Device,
    err,
    fail,
    progress_bar,
    run_guard,
)
from allmil_cli.cli.inputs import (
    find_patients,
    models_for_run,
    report_meta,
    worker_count,
)


def print_summary(results, pipeline, metrics: Optional[dict[str, Any]]) -> None:
    from allmil_cli.io.summary import counts_line, summary_table

    err.print(summary_table(results, err.width, SUMMARY_ROWS))
    if len(results) > SUMMARY_ROWS:
        err.print(f"... and {len(results) - SUMMARY_ROWS} more patients: see the report.")
    err.print(counts_line(results))
    if metrics:
        sc = metrics["screen"]
        err.print(
            f"[bold]metrics[/] (n={metrics['n']}; ALL call): accuracy {metrics['accuracy']:.4f}  "
            f"F1 {metrics['f1']:.4f}  sensitivity {metrics['sensitivity']:.4f}  specificity {metrics['specificity']:.4f}  "
            f"confusion [tp {metrics['tp']} fn {metrics['fn']} / fp {metrics['fp']} tn {metrics['tn']}]; "
            f"screen (ALL or review): sensitivity {sc['sensitivity']:.4f} specificity {sc['specificity']:.4f}; "
            f"{metrics['n_review']} review; p_all ROC AUC {metrics['roc_auc']:.4f}"
        )


def review_collector(html: Optional[Path], crops_dir: Optional[Path]):
    """The collector of cell thumbnails for --html / --crops-dir (None when neither is asked for)."""
    if html is None and crops_dir is None:
        return None
    from allmil_cli.io.review_capture import ReviewCollector

    if crops_dir is not None:
        from allmil_cli.io.outputs import OutputError

        try:
            crops_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(crops_dir, exc) from exc
    return ReviewCollector(review=html is not None, crops_dir=crops_dir)


def write_review(review, html: Optional[Path], results, meta: dict[str, Any], quiet: bool, **page: Any) -> None:
    """Finish the galleries (patients resumed or run elsewhere are read again) and write the --html page."""
    from allmil_cli.io.review import write_page

    for r in results:
        review.finish(r)
    if html is not None:
        size = write_page(html, results, meta, galleries=review.galleries, **page)
        if not quiet:
            err.print(f"review page: {html} ({size / 1e6:.2f} MB)")


def run_pipeline(input_dir, per_image, weights, device, threads, quiet, options, what: str):
    from allmil_cli.pipeline.runner import Pipeline

    patients = find_patients(input_dir, per_image, quiet)
    models = models_for_run(weights, device, threads, options, patients, quiet)
    pipeline = Pipeline(models, options)
    results = []
    with run_guard(), progress_bar(len(patients), quiet, what) as tick:
        for result in pipeline.run(patients):
            results.append(result)
            tick(result.patient)
    return patients, models, pipeline, results


def resolve_journal(out, json_out, resume: bool) -> Optional[Path]:
    from allmil_cli.io.journal_lock import journal_path_for

    path = journal_path_for(out, json_out)
    if path is None and resume:
        fail("--resume needs a journal: write --out or --json to a file, or pass --journal FILE.", EXIT_USAGE)
    return path


def diagnose_cohort(input_dir, per_image, weights, quiet, options, cfg, journal_path, resume: bool, shard_text, review=None):
    """diagnose's run: shard selection, the engine, the journal (see allmil_cli.io.cohort)."""
    from allmil_cli.executors.engine import EngineError, fingerprint
    from allmil_cli.io.cohort import check_engine, run_cohort
    from allmil_cli.io.journal import JournalError
    from allmil_cli.io.journal_lock import JournalBusy
    from allmil_cli.io.shard import ShardError, parse_shard, select, sort_key
    from allmil_cli.pipeline.runner import Pipeline

    try:
        shard = parse_shard(shard_text) if shard_text else None
        check_engine(cfg)
    except (ShardError, EngineError) as exc:
        fail(str(exc), EXIT_USAGE)
    if cfg.engine == "local":
        options = replace(options, workers=worker_count(cfg.workers))  # local worker processes (the pipeline's own)
    everyone = find_patients(input_dir, per_image, quiet)
    patients = select(everyone, shard)
    if shard and not quiet:
        err.print(f"shard {shard[0]}/{shard[1]}: {len(patients)} of {len(everyone)} patient(s)")
    models = models_for_run(weights, Device(cfg.device), cfg.threads, options, patients, quiet)  # ray: options.workers 1
    pipeline = Pipeline(models, options, on_field=review.on_field if review else None)
    if review:
        review.expect(patients)
    meta = report_meta(models, replace(options, threshold=pipeline.threshold), "diagnose")
    fp = fingerprint(models, options, pipeline.threshold, per_image, shard)
    keys = {p.name: sort_key(p, input_dir, per_image) for p in patients}
    where = f"; the finished patients are in {journal_path}: rerun with --resume to go on" if journal_path else ""
    try:
        with run_guard(where), progress_bar(len(patients), quiet, "diagnose") as tick:
            run = run_cohort(patients, keys, pipeline, cfg, journal_path=journal_path, resume=resume, fp=fp, meta=meta,
                             on_result=lambda r: (review and review.finish(r), tick(r.patient)), on_resumed=lambda n: [tick("") for _ in range(n)])
    except (JournalError, JournalBusy) as exc:
        fail(str(exc), EXIT_USAGE)
    except EngineError as exc:
        fail(str(exc), EXIT_USAGE)
    if not quiet:
        for note in run.notes:
            err.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
        if resume and run.journal is not None:
            redo = f", {run.n_redone} cut-short journal line(s) dropped and redone" if run.n_redone else ""
            err.print(f"resumed {run.n_resumed} of {len(patients)} patient(s) from {run.journal}{redo}")
    return patients, models, pipeline, run.results
