"""The ``allmil`` command line. Parses arguments, calls the library, prints. No pipeline logic here.

This module holds the Typer app and its command table; each command group lives in its own module of this folder:
``diagnose`` (diagnose, merge), ``stress`` (stress-test), ``calibrate`` (calibrate), ``cells`` (detect, embed),
``train`` (train). What they share: ``options`` (the argument and option types, declared once), ``console`` (exit
codes, errors, progress), ``inputs`` (patients, models, labels), ``runs`` (the pipeline or the cohort run, the review
page, the summary) and ``outputs`` (checking every output before a run, and failing cleanly when a write fails).

Exit codes (also in README and ``allmil --help``):
  0  every patient was analysed (status ok)
  1  the run finished and reports were written, but some patients are failed or insufficient
  2  usage or input error (bad option, missing input folder, output folder missing, bad labels file; another run
     is using the same journal)
  3  model error (weights missing, sha256 mismatch, model cannot be loaded, CUDA asked for but absent)
  4  an output could not be written (read-only, permission denied, disk full, quota); the line names the file
  130 interrupted (Ctrl-C); no partial report is left behind
"""

from __future__ import annotations

from typing import Annotated

import typer

from allmil_cli import __version__
from allmil_cli.cli.calibrate import calibrate
from allmil_cli.cli.cells import detect, embed
from allmil_cli.cli.console import EXIT_OK
from allmil_cli.cli.diagnose import diagnose, merge
from allmil_cli.cli.options import EPILOG_CODES
from allmil_cli.cli.stress import stress_test
from allmil_cli.cli.train import TRAIN_EPILOG, TRAIN_SETTINGS, train

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


def _version(value: bool) -> None:
    if value:
        typer.echo(f"allmil {__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def main(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """allmil: ALL screening on blood-smear fields."""


# The commands, in the order ``allmil --help`` lists them.
app.command(epilog=EPILOG_CODES)(diagnose)
app.command("stress-test", epilog=EPILOG_CODES)(stress_test)
app.command(epilog=EPILOG_CODES)(calibrate)
app.command(epilog=EPILOG_CODES)(detect)
app.command(epilog=EPILOG_CODES)(embed)
app.command(epilog=EPILOG_CODES)(merge)
app.command(context_settings=TRAIN_SETTINGS, epilog=TRAIN_EPILOG)(train)


def run() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    run()
