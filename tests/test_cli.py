"""The CLI end to end on real images (the shipped BCCD example fields) with tiny real ONNX models."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from allmil_cli.cli.app import app
from allmil_cli.io.report import CSV_COLUMNS

from tests.conftest import EXAMPLES, ROOT

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_diagnose_examples_writes_csv_and_json(patients_dir, tiny_weights, tmp_path):
    out, js = tmp_path / "report.csv", tmp_path / "report.json"
    r = run("diagnose", patients_dir, "--out", out, "--json", js, "--weights", tiny_weights, "--quiet")
    assert r.exit_code == 0, r.output
    rows = read_csv(out)
    assert list(rows[0].keys()) == CSV_COLUMNS
    assert [row["patient"] for row in rows] == ["patient_A", "patient_B", "patient_C"]
    for row in rows:
        assert row["status"] == "ok" and row["call"] in {"ALL", "normal", "review"}
        # the reason explains the call: the blast-like percentage, its interval and the cell count
        assert row["reason"].startswith(f"{float(row['blast_pct']):.0f} % blast-like (95 % CI ")
        assert f"of {row['n_cells']} cells" in row["reason"]
        assert float(row["blast_pct_lo"]) <= float(row["blast_pct"]) <= float(row["blast_pct_hi"])
        assert 0.0 <= float(row["p_all"]) <= 1.0
        assert int(row["n_cells"]) >= 1  # every BCCD field holds at least one stained WBC
    assert [int(r["n_images"]) for r in rows] == [5, 5, 5]
    doc = json.loads(js.read_text())
    assert set(doc["models_sha256"]) == {"detector.onnx", "embedder.onnx", "aggregator.onnx"}
    assert doc["execution_provider"] == "CPUExecutionProvider" and doc["version"]
    cell = doc["patients"][0]["cells"][0]
    x0, y0, x1, y1 = cell["box"]
    assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 480 and 0 <= cell["blast_score"] <= 1
    # every detection's score is kept: a cell lists the weaker heatmap peaks merged into it (each below its own score)
    for p in doc["patients"]:
        for c in p["cells"]:
            assert all(0 < m <= c["det_score"] for m in c["merged_scores"])
    assert len(doc["patients"][1]["images"]) == 5
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temp files


def test_detected_cells_sit_on_annotated_wbcs(tiny_weights, tmp_path):
    """Even the tiny colour detector must land on the annotated WBC of a BCCD example field."""
    r = run("detect", EXAMPLES, "--out", tmp_path / "d.csv", "--weights", tiny_weights, "--quiet", "--crops", tmp_path / "crops")
    assert r.exit_code == 0, r.output
    rows = [row for row in read_csv(tmp_path / "d.csv") if row["image"] == "BloodImage_00007.jpg"]
    assert rows, "no detection on BloodImage_00007"
    crops = list((tmp_path / "crops" / "patient_A").glob("*.png"))
    assert len(crops) == len([row for row in read_csv(tmp_path / "d.csv") if row["patient"] == "patient_A"])


def test_bad_inputs_do_not_kill_the_batch(patients_dir, tiny_weights, tmp_path):
    bad = patients_dir / "patient bad ☃"
    bad.mkdir()
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("not an image")
    (bad / "notes.pdf").write_text("ignored: not an image suffix")
    (patients_dir / "patient_empty").mkdir()
    mixed = patients_dir / "patient_A"
    (mixed / "truncated.jpg").write_bytes((mixed / "BloodImage_00007.jpg").read_bytes()[:2000])
    out = tmp_path / "report.csv"
    r = run("diagnose", patients_dir, "--out", out, "--json", tmp_path / "r.json", "--weights", tiny_weights, "--quiet")
    assert r.exit_code == 1  # documented: some patients failed/insufficient
    rows = {row["patient"]: row for row in read_csv(out)}
    reason = rows["patient bad ☃"]["reason"]
    assert rows["patient bad ☃"]["status"] == "failed" and "none of 2 image(s) could be read" in reason and "text.jpg" in reason
    assert rows["patient_empty"]["status"] == "insufficient" and "no images" in rows["patient_empty"]["reason"]
    assert rows["patient_A"]["status"] == "ok" and rows["patient_A"]["n_images"] == "5"
    assert rows["patient_B"]["status"] == "ok"
    doc = json.loads((tmp_path / "r.json").read_text())
    a = next(p for p in doc["patients"] if p["patient"] == "patient_A")
    failed = [i for i in a["images"] if i["status"] == "failed"]
    assert len(failed) == 1 and "truncated" in failed[0]["reason"]


def test_output_in_missing_folder_is_a_usage_error(patients_dir, tiny_weights, tmp_path):
    r = run("diagnose", patients_dir, "--out", tmp_path / "nope" / "r.csv", "--weights", tiny_weights)
    assert r.exit_code == 2
    assert "does not exist" in r.output and "mkdir -p" in r.output


def test_missing_input_folder_is_a_usage_error(tmp_path, tiny_weights):
    r = run("diagnose", tmp_path / "absent", "--out", tmp_path / "r.csv", "--weights", tiny_weights)
    assert r.exit_code == 2 and "no such folder" in r.output


def test_tampered_model_is_refused(patients_dir, tiny_weights, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(tiny_weights, w)
    with open(w / "embedder.onnx", "ab") as f:
        f.write(b"\0")
    r = run("diagnose", patients_dir, "--out", tmp_path / "r.csv", "--weights", w)
    assert r.exit_code == 3 and "sha256" in r.output and "embedder.onnx" in r.output
    assert not (tmp_path / "r.csv").exists()


def test_missing_model_is_refused(patients_dir, tiny_weights, tmp_path):
    w = tmp_path / "w"
    shutil.copytree(tiny_weights, w)
    (w / "detector.onnx").unlink()
    r = run("diagnose", patients_dir, "--out", tmp_path / "r.csv", "--weights", w)
    assert r.exit_code == 3 and "detector.onnx" in r.output and "missing" in r.output


def test_json_to_stdout_is_pure_json(patients_dir, tiny_weights, tmp_path):
    r = run("diagnose", patients_dir, "--out", tmp_path / "r.csv", "--json", "-", "--weights", tiny_weights, "--quiet")
    assert r.exit_code == 0
    doc = json.loads(r.stdout)
    assert len(doc["patients"]) == 3


def test_labels_add_metrics(patients_dir, tiny_weights, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("patient,label\npatient_A,normal\npatient_B,ALL\npatient_C,0\n")
    r = run("diagnose", patients_dir, "--out", tmp_path / "r.csv", "--json", tmp_path / "r.json", "--labels", labels,
            "--weights", tiny_weights)
    assert r.exit_code == 0
    m = json.loads((tmp_path / "r.json").read_text())["metrics"]
    assert m["n"] == 3 and m["tp"] + m["fn"] == 1 and m["tn"] + m["fp"] == 2
    assert "sensitivity" in r.output
    rows = read_csv(tmp_path / "r.csv")
    assert [row["label"] for row in rows] == ["normal", "ALL", "normal"]


def test_bad_labels_file(patients_dir, tiny_weights, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("patient,label\npatient_A,maybe\n")
    r = run("diagnose", patients_dir, "--out", tmp_path / "r.csv", "--labels", labels, "--weights", tiny_weights)
    assert r.exit_code == 2 and "line 2" in r.output


def test_stress_test_with_truth_files(patients_dir, tiny_weights, tmp_path):
    # Mark every detected cell of patient_B as a "blast" via a truth folder built from detect's output.
    run("detect", patients_dir, "--out", tmp_path / "d.csv", "--weights", tiny_weights, "--quiet")
    truth = tmp_path / "truth"
    truth.mkdir()
    for row in read_csv(tmp_path / "d.csv"):
        with open(truth / (Path(row["image"]).stem + ".xyc"), "a") as f:
            f.write(f"{row['cx']}\t{row['cy']}\n")
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_A,ALL\npatient_B,ALL\npatient_C,normal\n")
    out = tmp_path / "stress.csv"
    r = run("stress-test", patients_dir, "--truth", truth, "--labels", labels, "--out", out, "--weights", tiny_weights, "--quiet")
    assert r.exit_code == 0, r.output
    rows = {row["removed"]: row for row in read_csv(out)}
    assert set(rows) == {"none", "blasts", "normals"}
    # every cell is a "blast": removing blasts leaves no cell, so no ALL call survives
    assert float(rows["blasts"]["recall"]) == 0.0 and rows["blasts"]["cells_kept"] == "0"
    assert rows["normals"]["recall"] == rows["none"]["recall"]


def test_embed_writes_npz(patients_dir, tiny_weights, tmp_path):
    out = tmp_path / "cells.npz"
    r = run("embed", patients_dir, "--out", out, "--weights", tiny_weights, "--quiet")
    assert r.exit_code == 0
    z = np.load(out)
    n = len(z["patient"])
    assert n > 0 and z["features"].shape == (n, 256) and z["boxes"].shape == (n, 4)
    assert set(z["patient"]) == {"patient_A", "patient_B", "patient_C"}
    assert np.all((z["blast_score"] >= 0) & (z["blast_score"] <= 1))


def test_cell_size_override_is_used_for_every_field(patients_dir, tiny_weights, tmp_path):
    run("diagnose", patients_dir, "--out", tmp_path / "a.csv", "--json", tmp_path / "a.json", "--weights", tiny_weights,
        "--quiet", "--cell-size", "100")
    run("diagnose", patients_dir, "--out", tmp_path / "b.csv", "--json", tmp_path / "b.json", "--weights", tiny_weights, "--quiet")
    given = [i["rbc_px"] for p in json.loads((tmp_path / "a.json").read_text())["patients"] for i in p["images"]]
    estimated = [i["rbc_px"] for p in json.loads((tmp_path / "b.json").read_text())["patients"] for i in p["images"]]
    assert given == [100.0] * 15
    assert len(set(estimated)) > 1 and all(60 < e < 200 for e in estimated)  # per-field automatic estimate


@pytest.mark.parametrize("command", ["diagnose", "detect", "embed", "stress-test", "train"])
def test_every_subcommand_has_help_with_an_example(command):
    r = run(command, "--help")
    assert r.exit_code == 0 and "Example" in r.output


def test_cuda_request_without_gpu_build_is_a_model_error(patients_dir, tiny_weights, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    r = run("diagnose", patients_dir, "--out", tmp_path / "r.csv", "--weights", tiny_weights, "--device", "cuda")
    assert r.exit_code == 3 and "allmil[gpu]" in r.output


def test_diagnose_runs_without_torch(patients_dir, tiny_weights, tmp_path):
    """The inference path must not import torch: run the real CLI in a process where torch cannot import."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'torchvision'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, _NoTorch())\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(ROOT)]))
    code = (
        "import sys; from allmil_cli.cli.app import run; sys.argv=['allmil','diagnose',sys.argv[1],'--out',sys.argv[2],"
        "'--weights',sys.argv[3],'--quiet']\n"
        "try:\n    run()\nexcept SystemExit as e:\n"
        "    assert 'torch' not in sys.modules, 'torch was imported'\n    raise\n"
    )
    p = subprocess.run([sys.executable, "-c", code, str(patients_dir), str(tmp_path / "r.csv"), str(tiny_weights)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    check = subprocess.run([sys.executable, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert check.returncode != 0  # the blocker really blocks
    assert len(read_csv(tmp_path / "r.csv")) == 3


def test_library_pipeline_with_lookahead_matches_direct_calls(patients_dir, tiny_weights):
    """Decoding ahead in a thread must not change any result, and skipping a patient must be safe."""
    from allmil_cli.io.discover import discover_patients
    from allmil_cli.stages.models import load_models
    from allmil_cli.pipeline.runner import Pipeline

    patients, _ = discover_patients(patients_dir)
    pipe = Pipeline(load_models(tiny_weights, device="cpu"))
    streamed = list(pipe.run(patients))
    direct = [Pipeline(load_models(tiny_weights, device="cpu")).diagnose_patient(p) for p in patients]
    assert [(r.patient, r.p_all, r.n_cells) for r in streamed] == [(r.patient, r.p_all, r.n_cells) for r in direct]
    pipe.prefetch(patients)
    skipped_first = pipe.diagnose_patient(patients[2])  # patients 0 and 1 were scheduled but are skipped
    pipe.close()
    assert skipped_first.n_cells == direct[2].n_cells and skipped_first.p_all == direct[2].p_all
