"""What every ``allmil`` command does around the library: check outputs, find patients, load models, show
progress, run the pipeline or a cohort engine, and print the summary. Used by the ``cli*.py`` modules only."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from enum import Enum
from itertools import islice
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from allmil_cli import __version__


EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, EXIT_MODEL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
SUMMARY_ROWS = 50  # patients shown in the terminal table; the report holds all
err = Console(stderr=True, highlight=False)


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(str, Enum):
    fp32 = "fp32"
    int8 = "int8"


def _fail(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def _run_guard(where: str = "") -> Iterator[None]:
    """Around a run: worker processes that cannot start -> exit 3; Ctrl-C -> exit 130, no report written."""
    from allmil_cli.workers import WorkerStartError

    try:
        yield
    except WorkerStartError as exc:
        _fail(str(exc), EXIT_MODEL)
    except KeyboardInterrupt:
        err.print(f"[red]interrupted[/]: no report written{escape(where)}.")
        raise typer.Exit(EXIT_INTERRUPTED)


def _check_output(path: Optional[Path | str], flag: str) -> None:
    if path is None or str(path) == "-":
        return
    p = Path(path)
    if not p.parent.exists():
        _fail(f"{flag} {p}: the folder {p.parent} does not exist; create it first (mkdir -p {p.parent}).", EXIT_USAGE)
    if p.is_dir():
        _fail(f"{flag} {p}: is a folder; give a file name, e.g. {p / 'report.csv'}.", EXIT_USAGE)


def _patients(input_dir: Path, per_image: bool, quiet: bool):
    from allmil_cli.images import discover_patients

    try:
        patients, notes = discover_patients(input_dir, per_image=per_image)
    except (FileNotFoundError, NotADirectoryError) as exc:
        _fail(str(exc), EXIT_USAGE)
    for note in notes:
        if not quiet:
            err.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    if not patients:
        _fail(f"{input_dir}: no patient subfolders (and no images with --per-image) found; see 'allmil diagnose --help'.", EXIT_USAGE)
    return patients


def _models(weights: Optional[Path], device: Device, threads: Optional[int], quiet: bool, precision: str = "fp32"):
    from allmil_cli.models import ModelError, load_models

    try:
        models = load_models(weights, device=device.value, threads=threads, precision=precision)
    except ModelError as exc:
        _fail(str(exc), EXIT_MODEL)
    if models.notice and not quiet:
        err.print(f"[yellow]note:[/] {escape(models.notice)}")
    return models


@contextmanager
def _progress(total: int, quiet: bool, what: str) -> Iterator[Any]:
    enabled = not quiet and err.is_terminal
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[current]}"), console=err, disable=not enabled, transient=False,
    )
    with progress:
        task = progress.add_task(what, total=total, current="")
        yield lambda name: progress.update(task, advance=1, current=name)


def _labels(labels_path: Optional[Path], names: list[str]) -> dict[str, int]:
    from allmil_cli.labels import LabelsError, read_labels

    if labels_path is None:
        return {}
    try:
        labels = read_labels(labels_path)
    except LabelsError as exc:
        _fail(str(exc), EXIT_USAGE)
    missing = [n for n in names if n not in labels]
    if missing and len(missing) == len(names):
        _fail(f"{labels_path}: none of the {len(names)} patient names appear in it (e.g. {names[0]!r}).", EXIT_USAGE)
    return labels


def _meta(models, options, command: str) -> dict[str, Any]:
    from dataclasses import asdict

    from allmil_cli.models import tool_version

    opts = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()}
    return {
        "tool": tool_version(),
        "version": __version__,
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "execution_provider": models.provider,
        "weights_dir": str(models.weights_dir),
        "models_sha256": models.sha256,
        "options": opts,
    }


def _print_summary(results, pipeline, metrics: Optional[dict[str, Any]]) -> None:
    from allmil_cli.summary import counts_line, summary_table

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


def _review_collector(html: Optional[Path], crops_dir: Optional[Path]):
    """The collector of cell thumbnails for --html / --crops-dir (None when neither is asked for)."""
    if html is None and crops_dir is None:
        return None
    from allmil_cli.review_capture import ReviewCollector

    if crops_dir is not None:
        from allmil_cli.outputs import OutputError

        try:
            crops_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(crops_dir, exc) from exc
    return ReviewCollector(review=html is not None, crops_dir=crops_dir)


def _write_review(review, html: Optional[Path], results, meta: dict[str, Any], quiet: bool, **page: Any) -> None:
    """Finish the galleries (patients resumed or run elsewhere are read again) and write the --html page."""
    from allmil_cli.review import write_page

    for r in results:
        review.finish(r)
    if html is not None:
        size = write_page(html, results, meta, galleries=review.galleries, **page)
        if not quiet:
            err.print(f"review page: {html} ({size / 1e6:.2f} MB)")


def _workers(workers: Optional[int]) -> int:
    """--workers for the local engine: worker processes, all cores by default."""
    from allmil_cli.workers import default_workers

    return workers or default_workers()


def _warm_workers(input_dir: Path, workers: Optional[int], device: Device, engine: str = "local") -> None:
    """First thing a command that may use worker processes does: start their forkserver, so its imports run beside
    this process's instead of after them (the workers are created later, once the run's files are known). Only when
    ``input_dir`` holds more than one file: a single field is analysed here, and the forkserver's imports would
    compete with this process's onnxruntime threads (measured: 0.1-0.3 s slower)."""
    if engine == "local" and device != Device.cuda and _workers(workers) > 1 and _more_than_one_file(input_dir):
        from allmil_cli.workers import start_forkserver

        start_forkserver()


def _visible_files(folder: Path) -> Iterator[Path]:
    """The files in ``folder`` and in its subfolders (one level down, as patient folders are), hidden ones left out."""
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from (p for p in entry.iterdir() if p.is_file() and not p.name.startswith("."))
        elif entry.is_file():
            yield entry


def _more_than_one_file(folder: Path) -> bool:
    """Whether ``folder`` holds more than one file (a quick look: the second one found ends it)."""
    try:
        return next(islice(_visible_files(Path(folder)), 1, None), None) is not None
    except OSError:
        return False


def _models_for_run(weights: Optional[Path], device: Device, threads: Optional[int], options, patients, quiet: bool):
    """This run's models. When it uses worker processes (``options.workers`` > 1 and more than one file), they are
    launched first, so they load their models while this process loads its own; this process then gets one
    onnxruntime thread (it only makes the patient calls: an idle multi-thread pool would spin on the workers'
    cores). Otherwise ``--threads``. The workers load ``options.precision``'s models, as this process does."""
    parallel = options.workers > 1 and sum(len(p.images) for p in patients) > 1
    if parallel:
        from allmil_cli.models import default_weights_dir
        from allmil_cli.workers import prestart

        prestart(weights or default_weights_dir(), options, options.workers)
    return _models(weights, device, threads or (1 if parallel else None), quiet, options.precision)


def _run_pipeline(input_dir, per_image, weights, device, threads, quiet, options, what: str):
    from allmil_cli.pipeline import Pipeline

    patients = _patients(input_dir, per_image, quiet)
    models = _models_for_run(weights, device, threads, options, patients, quiet)
    pipeline = Pipeline(models, options)
    results = []
    with _run_guard(), _progress(len(patients), quiet, what) as tick:
        for result in pipeline.run(patients):
            results.append(result)
            tick(result.patient)
    return patients, models, pipeline, results


def _journal_path(out, json_out, resume: bool) -> Optional[Path]:
    from allmil_cli.journal_lock import journal_path_for

    path = journal_path_for(out, json_out)
    if path is None and resume:
        _fail("--resume needs a journal: write --out or --json to a file, or pass --journal FILE.", EXIT_USAGE)
    return path


def _run_cohort(input_dir, per_image, weights, quiet, options, cfg, journal_path, resume: bool, shard_text, review=None):
    """diagnose's run: shard selection, the engine, the journal (see allmil_cli.cohort)."""
    from allmil_cli.cohort import check_engine, run_cohort
    from allmil_cli.engine import EngineError, fingerprint
    from allmil_cli.journal import JournalError
    from allmil_cli.journal_lock import JournalBusy
    from allmil_cli.pipeline import Pipeline
    from allmil_cli.shard import ShardError, parse_shard, select, sort_key

    try:
        shard = parse_shard(shard_text) if shard_text else None
        check_engine(cfg)
    except (ShardError, EngineError) as exc:
        _fail(str(exc), EXIT_USAGE)
    if cfg.engine == "local":
        options = replace(options, workers=_workers(cfg.workers))  # local worker processes (the pipeline's own)
    everyone = _patients(input_dir, per_image, quiet)
    patients = select(everyone, shard)
    if shard and not quiet:
        err.print(f"shard {shard[0]}/{shard[1]}: {len(patients)} of {len(everyone)} patient(s)")
    models = _models_for_run(weights, Device(cfg.device), cfg.threads, options, patients, quiet)  # ray: options.workers 1
    pipeline = Pipeline(models, options, on_field=review.on_field if review else None)
    if review:
        review.expect(patients)
    meta = _meta(models, replace(options, threshold=pipeline.threshold), "diagnose")
    fp = fingerprint(models, options, pipeline.threshold, per_image, shard)
    keys = {p.name: sort_key(p, input_dir, per_image) for p in patients}
    where = f"; the finished patients are in {journal_path}: rerun with --resume to go on" if journal_path else ""
    try:
        with _run_guard(where), _progress(len(patients), quiet, "diagnose") as tick:
            run = run_cohort(patients, keys, pipeline, cfg, journal_path=journal_path, resume=resume, fp=fp, meta=meta,
                             on_result=lambda r: (review and review.finish(r), tick(r.patient)), on_resumed=lambda n: [tick("") for _ in range(n)])
    except (JournalError, JournalBusy) as exc:
        _fail(str(exc), EXIT_USAGE)
    except EngineError as exc:
        _fail(str(exc), EXIT_USAGE)
    if not quiet:
        for note in run.notes:
            err.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
        if resume and run.journal is not None:
            redo = f", {run.n_redone} cut-short journal line(s) dropped and redone" if run.n_redone else ""
            err.print(f"resumed {run.n_resumed} of {len(patients)} patient(s) from {run.journal}{redo}")
    return patients, models, pipeline, run.results
