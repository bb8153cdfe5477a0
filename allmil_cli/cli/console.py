"""The terminal side of every ``allmil`` command: exit codes, the stderr console, errors, the run guard and the
progress bar."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

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


def fail(message: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def run_guard(where: str = "") -> Iterator[None]:
    """Around a run: worker processes that cannot start -> exit 3; Ctrl-C -> exit 130, no report written."""
    from allmil_cli.executors.workers import WorkerStartError

    try:
        yield
    except WorkerStartError as exc:
        fail(str(exc), EXIT_MODEL)
    except KeyboardInterrupt:
        err.print(f"[red]interrupted[/]: no report written{escape(where)}.")
        raise typer.Exit(EXIT_INTERRUPTED)


def check_output(path: Optional[Path | str], flag: str) -> None:
    if path is None or str(path) == "-":
        return
    p = Path(path)
    if not p.parent.exists():
        fail(f"{flag} {p}: the folder {p.parent} does not exist; create it first (mkdir -p {p.parent}).", EXIT_USAGE)
    if p.is_dir():
        fail(f"{flag} {p}: is a folder; give a file name, e.g. {p / 'report.csv'}.", EXIT_USAGE)


@contextmanager
def progress_bar(total: int, quiet: bool, what: str) -> Iterator[Any]:
    enabled = not quiet and err.is_terminal
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[current]}"), console=err, disable=not enabled, transient=False,
    )
    with progress:
        task = progress.add_task(what, total=total, current="")
        yield lambda name: progress.update(task, advance=1, current=name)
