"""The command line split over the modules of allmil_cli/cli/: one app, commands in their order, a light import, and the
stress-test helpers that moved from the CLI into allmil_cli.pipeline.stress."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import typer

from allmil_cli.cli.app import app
from allmil_cli.pipeline.stress import calls_by_patient, rows_csv


def test_every_command_is_on_the_one_app_in_help_order():
    names = list(typer.main.get_command(app).commands)
    assert names == ["diagnose", "stress-test", "calibrate", "detect", "embed", "merge", "train"]


def test_importing_the_cli_loads_no_numerics():
    # `allmil --help` must stay quick: the command modules import numpy/onnxruntime/the pipeline only when they run.
    code = ("import sys, allmil_cli.cli.app; "
            "print(sorted(m for m in ('numpy', 'onnxruntime', 'PIL', 'allmil_cli.pipeline.runner') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_calls_by_patient_regroups_the_stream_of_results():
    def r(patient, call, ok=True, status="ok"):
        return SimpleNamespace(patient=patient, call=call, ok=ok, status=status)

    stream = [r("a", "ALL"), r("a", "normal"), r("b", "normal"), r("b", "", ok=False, status="insufficient")]
    first, calls = calls_by_patient(stream, ["none", "blasts"])
    assert [x.patient for x in first] == ["a", "b"] and first[0] is stream[0] and first[1] is stream[2]
    assert calls == {"a": {"none": "ALL", "blasts": "normal"}, "b": {"none": "normal", "blasts": "insufficient"}}


def test_rows_csv_has_one_line_per_condition():
    rows = [{"removed": "none", "recall": 1.0}, {"removed": "blasts", "recall": 0.5}]
    assert rows_csv(rows) == "removed,recall\nnone,1.0\nblasts,0.5\n"
