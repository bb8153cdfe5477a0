"""What a command loads before it runs: the patients, the models (and worker processes), the labels, and the
report's metadata."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Any, Optional

from rich.markup import escape

from allmil_cli import __version__
from allmil_cli.cli.console import EXIT_MODEL, EXIT_USAGE, Device, err, fail


def find_patients(input_dir: Path, per_image: bool, quiet: bool):
    from allmil_cli.io.discover import discover_patients

    try:
        patients, notes = discover_patients(input_dir, per_image=per_image)
    except (FileNotFoundError, NotADirectoryError) as exc:
        fail(str(exc), EXIT_USAGE)
    for note in notes:
        if not quiet:
            err.print(f"[yellow]note:[/] {escape(note)}", soft_wrap=True)
    if not patients:
        fail(f"{input_dir}: no patient subfolders (and no images with --per-image) found; see 'allmil diagnose --help'.", EXIT_USAGE)
    return patients


def load_run_models(weights: Optional[Path], device: Device, threads: Optional[int], quiet: bool, precision: str = "fp32"):
    from allmil_cli.stages.models import ModelError, load_models

    try:
        models = load_models(weights, device=device.value, threads=threads, precision=precision)
    except ModelError as exc:
        fail(str(exc), EXIT_MODEL)
    if models.notice and not quiet:
        err.print(f"[yellow]note:[/] {escape(models.notice)}")
    return models


def load_labels(labels_path: Optional[Path], names: list[str]) -> dict[str, int]:
    from allmil_cli.stages.labels import LabelsError, read_labels

    if labels_path is None:
        return {}
    try:
        labels = read_labels(labels_path)
    except LabelsError as exc:
        fail(str(exc), EXIT_USAGE)
    missing = [n for n in names if n not in labels]
    if missing and len(missing) == len(names):
        fail(f"{labels_path}: none of the {len(names)} patient names appear in it (e.g. {names[0]!r}).", EXIT_USAGE)
    return labels


def report_meta(models, options, command: str) -> dict[str, Any]:
    from dataclasses import asdict

    from allmil_cli.stages.models import tool_version

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


def worker_count(workers: Optional[int]) -> int:
    """--workers for the local engine: worker processes, all cores by default."""
    from allmil_cli.executors.workers import default_workers

    return workers or default_workers()


def warm_workers(input_dir: Path, workers: Optional[int], device: Device, engine: str = "local") -> None:
    """First thing a command that may use worker processes does: start their forkserver, so its imports run beside
    this process's instead of after them (the workers are created later, once the run's files are known). Only when
    ``input_dir`` holds more than one file: a single field is analysed here, and the forkserver's imports would
    compete with this process's onnxruntime threads (measured: 0.1-0.3 s slower)."""
    if engine == "local" and device != Device.cuda and worker_count(workers) > 1 and more_than_one_file(input_dir):
        from allmil_cli.executors.workers import start_forkserver

        start_forkserver()


def visible_files(folder: Path) -> Iterator[Path]:
    """The files in ``folder`` and in its subfolders (one level down, as patient folders are), hidden ones left out."""
    for entry in folder.iterdir():
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            yield from (p for p in entry.iterdir() if p.is_file() and not p.name.startswith("."))
        elif entry.is_file():
            yield entry


def more_than_one_file(folder: Path) -> bool:
    """Whether ``folder`` holds more than one file (a quick look: the second one found ends it)."""
    try:
        return next(islice(visible_files(Path(folder)), 1, None), None) is not None
    except OSError:
        return False


def models_for_run(weights: Optional[Path], device: Device, threads: Optional[int], options, patients, quiet: bool):
    """This run's models. When it uses worker processes (``options.workers`` > 1 and more than one file), they are
    launched first, so they load their models while this process loads its own; this process then gets one
    onnxruntime thread (it only makes the patient calls: an idle multi-thread pool would spin on the workers'
    cores). Otherwise ``--threads``. The workers load ``options.precision``'s models, as this process does."""
    parallel = options.workers > 1 and sum(len(p.images) for p in patients) > 1
    if parallel:
        from allmil_cli.executors.workers import prestart
        from allmil_cli.stages.models import default_weights_dir

        prestart(weights or default_weights_dir(), options, options.workers)
    return load_run_models(weights, device, threads or (1 if parallel else None), quiet, options.precision)
