"""The shipped weights on the shipped examples: the README's main job, for real."""

from __future__ import annotations

import csv
import json

from typer.testing import CliRunner

from allmil_cli.cli.app import app
from allmil_cli.stages.models import load_models, sha256_of

from tests.conftest import EXAMPLES, shipped_weights_or_skip


def test_manifest_matches_shipped_models():
    w = shipped_weights_or_skip()
    manifest = json.loads((w / "manifest.json").read_text())["sha256"]
    assert {k: sha256_of(w / k) for k in manifest} == manifest
    models = load_models(w, device="cpu")
    assert models.metadata("detector")["allmil.kind"] == "detector"
    assert models.metadata("aggregator")["allmil.bag_size"] == "15"


def test_examples_are_never_called_all_and_say_how_many_cells_would_rule_out(tmp_path):
    """BCCD fields (normal / non-leukemic blood, BCCD test split: never trained on): no blast-like cell, so no ALL call;
    six cells cannot exclude a small blast population, so the call is review, and the reason says what would."""
    shipped_weights_or_skip()
    out = tmp_path / "report.csv"
    r = CliRunner().invoke(app, ["diagnose", str(EXAMPLES), "--out", str(out), "--json", str(tmp_path / "r.json"), "--quiet"])
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(out, newline="")))
    assert len(rows) == 3
    for row in rows:
        assert row["status"] == "ok" and row["call"] == "review" and float(row["p_all"]) < 0.2
        assert row["n_blast_like"] == "0" and float(row["blast_pct"]) == 0.0 and float(row["blast_pct_hi"]) > 10
        assert "too few cells to exclude a small blast population" in row["reason"] and "cells with this share" in row["reason"]
        assert int(row["n_cells"]) >= int(row["n_images"])  # every BCCD field shows at least one WBC
    doc = json.loads((tmp_path / "r.json").read_text())
    for p in doc["patients"]:
        for c in p["cells"]:
            assert 0.0 <= c["blast_score"] <= 1.0 and c["blast_like"] is False


def test_the_large_example_patient_is_called_normal(tmp_path):
    """217 PBC normal-cell images (held out of training): enough cells, none blast-like: the interval excludes a
    blast population, so the call is normal, with no QC flag."""
    shipped_weights_or_skip()
    out = tmp_path / "large.csv"
    r = CliRunner().invoke(app, ["diagnose", str(EXAMPLES.parent / "large"), "--out", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    (row,) = list(csv.DictReader(open(out, newline="")))
    assert row["call"] == "normal" and row["qc"] == "" and int(row["n_cells"]) >= 210
    assert float(row["blast_pct_hi"]) <= 1.82 and "within what normal blood shows" in row["reason"]
