"""Adequacy: a normal call needs enough cells (--min-cells-normal); an ALL call from few cells stands."""

from __future__ import annotations

import inspect
import json
import math
import re
import shutil

import pytest
from typer.testing import CliRunner

from allmil_cli.cli.app import app, diagnose
from allmil_cli.types.rule import RuleParams
from allmil_cli.types.field import Patient
from allmil_cli.stages.models import load_models
from allmil_cli.types.results import MIN_CELLS_NORMAL, Options
from allmil_cli.pipeline.runner import Pipeline
from allmil_cli.io.report import metrics_for

from tests.conftest import EXAMPLES, ROOT, shipped_weights_or_skip

runner = CliRunner()
FIELD = EXAMPLES / "patient_A" / "BloodImage_00007.jpg"


#: Options that force a call whatever the tiny models score: no cell blast-like and an ALL level no count can
#: reach (normal), or every cell blast-like against a near-zero background (ALL).
NORMAL = dict(cell_threshold=1.01, rule=RuleParams(background=0.85, all_rate=0.99))
ALL = dict(cell_threshold=0.0, rule=RuleParams(background=0.001, all_rate=0.002, alpha=0.4))


@pytest.fixture(scope="module")
def models(tiny_weights):
    return load_models(tiny_weights, device="cpu")


def one_field_patient() -> Patient:
    return Patient(name="one field", folder=FIELD.parent, images=[FIELD])


def test_default_is_the_smallest_count_reaching_95_percent_in_the_ablation():
    text = (ROOT / "docs" / "classifier_results.md").read_text(encoding="utf-8")
    head = re.search(r"^#+ .*cells per patient.*$", text, flags=re.M | re.I)
    assert head, "docs/classifier_results.md lost its cells-per-patient ablation: the adequacy default is read from it"
    rows = re.findall(r"^\|\s*(\d+)\s*\|\s*([\d.]+)", text[head.end():].split("\n## ")[0], flags=re.M)
    assert rows, "no table under the cells-per-patient heading"
    reaching = [int(k) for k, acc in rows if float(acc) >= 95.0]
    assert min(reaching) == MIN_CELLS_NORMAL == Options().min_cells_normal
    assert inspect.signature(diagnose).parameters["min_cells_normal"].default == MIN_CELLS_NORMAL


def test_a_normal_call_from_too_few_cells_is_insufficient(models):
    base = Pipeline(models, Options(min_cells_normal=0, **NORMAL)).diagnose_patient(one_field_patient())
    n = base.n_cells
    assert base.ok and base.call == "normal" and n >= 1
    at = Pipeline(models, Options(min_cells_normal=n, **NORMAL)).diagnose_patient(one_field_patient())
    assert at.ok and at.call == "normal" and at.p_all == base.p_all  # exactly enough cells: the call stands
    below = Pipeline(models, Options(min_cells_normal=n + 1, **NORMAL)).diagnose_patient(one_field_patient())
    assert below.status == "insufficient" and below.call == "review" and math.isnan(below.p_all)
    assert below.blast_pct == 0.0 and below.blast_pct_hi > 0  # the count and its interval are still reported
    assert below.n_cells == n and len(below.cells) == n  # the cells are still reported
    assert f"only {n} white cell(s)" in below.reason and "--min-cells-normal" in below.reason
    assert f"{base.p_all:.4f}" in below.reason  # what the model would have said, for the reviewer


def test_an_all_call_from_few_cells_stands(models):
    r = Pipeline(models, Options(min_cells_normal=1000, **ALL)).diagnose_patient(one_field_patient())
    assert r.ok and r.call == "ALL" and r.n_cells < 1000 and r.blast_pct == 100.0
    assert r.reason.startswith(f"100 % blast-like (95 % CI {r.blast_pct_lo:.0f}-100 %) of {r.n_cells} cells")


def test_metrics_leave_insufficient_patients_out(models):
    pipe = Pipeline(models, Options(min_cells_normal=1000, **NORMAL))
    few = pipe.diagnose_patient(one_field_patient())
    enough = Pipeline(models, Options(min_cells_normal=0, **NORMAL)).diagnose_patient(one_field_patient())
    enough.patient = "enough"
    m = metrics_for([few, enough], {"one field": 1, "enough": 0}, pipe.threshold)
    assert m["n"] == 1 and m["n_not_ok"] == 1 and m["tn"] == 1


def test_cli_option_reaches_the_run_and_zero_disables(tiny_weights, tmp_path):
    patients_dir = tmp_path / "patients"
    for name, field in (("a", FIELD), ("b", EXAMPLES / "patient_B" / "BloodImage_00015.jpg")):
        (patients_dir / name).mkdir(parents=True)
        shutil.copy(field, patients_dir / name)
    docs, codes = {}, {}
    for value in ("0", "1000"):
        js = tmp_path / f"r{value}.json"
        r = runner.invoke(app, ["diagnose", str(patients_dir), "--out", str(tmp_path / f"r{value}.csv"), "--json", str(js),
                                "--weights", str(tiny_weights), "--quiet", "--cell-threshold", "1.01",
                                "--min-cells-normal", value], catch_exceptions=False)
        docs[value], codes[value] = json.loads(js.read_text()), r.exit_code
        assert docs[value]["options"]["min_cells_normal"] == int(value)
    assert codes["0"] == 0 and {p["status"] for p in docs["0"]["patients"]} == {"ok"}
    calls = {p["patient"]: p["call"] for p in docs["0"]["patients"]}
    assert set(calls.values()) <= {"normal", "review"}  # no cell is blast-like at --cell-threshold 1.01
    for p in docs["1000"]["patients"]:  # ALL calls stand; every other patient lacks the cells to be ruled out
        assert (p["status"], p["call"]) == (("ok", "ALL") if calls[p["patient"]] == "ALL" else ("insufficient", "review"))
    assert codes["1000"] == 1  # documented: 1 when some patients are insufficient


def test_shipped_example_patients_meet_the_rule(tmp_path):
    """A newcomer's first run: every example patient is analysed from enough cells for the adequacy rule, none is
    called ALL, and the reason says how many cells would rule a blast population out."""
    weights = shipped_weights_or_skip()
    src = tmp_path / "patients"
    shutil.copytree(EXAMPLES, src)
    r = runner.invoke(app, ["diagnose", str(src), "--out", str(tmp_path / "r.csv"), "--json", str(tmp_path / "r.json"),
                            "--weights", str(weights), "--quiet"], catch_exceptions=False)
    doc = json.loads((tmp_path / "r.json").read_text())
    assert r.exit_code == 0, [p["reason"] for p in doc["patients"]]
    for p in doc["patients"]:
        assert p["status"] == "ok" and p["n_cells"] >= MIN_CELLS_NORMAL
        assert p["call"] == "review" and p["n_blast_like"] == 0  # BCCD shows non-leukaemic blood; 6 cells rule nothing out
        assert "cells with this share would rule it out" in p["reason"]
    size = sum(f.stat().st_size for f in EXAMPLES.rglob("*") if f.is_file())
    assert size < 3_000_000
