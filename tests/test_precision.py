"""int8 copies of the detector and embedder (``--precision``): how they are chosen, made, loaded and reported.

Real onnxruntime quantisation of the tiny test models, calibrated on the shipped example fields (real BCCD
images); the shipped int8 weights against the float ones on the same examples.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from allmil_cli.cli.app import app
from allmil_cli.stages.models import INT8_FILES, ModelError, load_models

from tests.conftest import EXAMPLES, SHIPPED


@pytest.fixture(scope="module")
def int8_weights(tmp_path_factory) -> Path:
    """Tiny weights with int8 copies made by the real quantiser from real fields."""
    from allmil_cli.train.quantize import quantize_weights
    from tests.onnx_fixtures import make_weights

    w = make_weights(tmp_path_factory.mktemp("int8") / "w")
    quantize_weights(w, sorted(EXAMPLES.glob("*/*.jpg"))[:4])
    return w


def test_fp32_unless_int8_is_asked_for(int8_weights, tmp_path):
    """int8 shifts calls toward normal (README): never chosen for the user, even where the copies exist."""
    assert load_models(int8_weights, device="cpu").precision == "fp32"
    with pytest.raises(ModelError, match="use fp32 or int8"):
        load_models(int8_weights, device="cpu", precision="bf16")
    r = CliRunner().invoke(app, ["diagnose", str(EXAMPLES), "--weights", str(int8_weights), "--out", str(tmp_path / "r.csv"),
                                 "--json", str(tmp_path / "r.json"), "--quiet"])
    assert r.exit_code in (0, 1), r.output
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["options"]["precision"] == "fp32" and "embedder.onnx" in doc["models_sha256"]


def test_int8_copies_keep_the_interface_and_are_verified(int8_weights):
    manifest = json.loads((int8_weights / "manifest.json").read_text())["sha256"]
    assert set(INT8_FILES.values()) <= set(manifest)
    m8 = load_models(int8_weights, device="cpu", precision="int8")
    m32 = load_models(int8_weights, device="cpu", precision="fp32")
    assert (m8.precision, m32.precision) == ("int8", "fp32")
    assert set(m8.sha256) == {"aggregator.onnx", *INT8_FILES.values()}  # the files that run: reports list them
    assert set(m32.sha256) == {"aggregator.onnx", "detector.onnx", "embedder.onnx"}
    for role in ("detector", "embedder"):
        meta = m8.metadata(role)
        assert meta["allmil.precision"] == "int8" and meta["allmil.kind"] == role
    assert any(n.op_type == "QuantizeLinear" for n in _graph(int8_weights / INT8_FILES["detector"]).node)  # its Conv
    from allmil_cli.pipeline.runner import Pipeline
    from allmil_cli.train.quantize import calibration_inputs

    x = calibration_inputs(Pipeline(m32), sorted(EXAMPLES.glob("patient_C/*.jpg"))[:1])[0][0]  # a real field's input
    h32 = m32.detector.run(None, {"image": x})[0]
    h8 = m8.detector.run(None, {"image": x})[0]
    assert h8.shape == h32.shape and np.abs(h8 - h32).max() < 0.05  # a heatmap in 0..1: int8 steps are ~1/255 of it
    (int8_weights / INT8_FILES["embedder"]).write_bytes((int8_weights / INT8_FILES["embedder"]).read_bytes() + b"\0")
    try:
        with pytest.raises(ModelError, match="does not match the manifest"):
            load_models(int8_weights, device="cpu", precision="int8")
    finally:
        (int8_weights / INT8_FILES["embedder"]).write_bytes((int8_weights / INT8_FILES["embedder"]).read_bytes()[:-1])


def _graph(path: Path):
    import onnx

    return onnx.load(str(path)).graph


def test_int8_without_copies_is_a_model_error_that_says_what_to_do(tiny_weights, tmp_path):
    r = CliRunner().invoke(app, ["diagnose", str(EXAMPLES), "--weights", str(tiny_weights), "--precision", "int8",
                                 "--out", str(tmp_path / "r.csv"), "--quiet"])
    assert r.exit_code == 3
    assert "detector_int8.onnx" in r.output and "allmil_cli.train.quantize" in r.output and "--precision fp32" in r.output


def test_workers_load_the_runs_precision_and_reports_say_which(int8_weights, tmp_path):
    runs = {}
    for precision, workers in (("int8", 1), ("int8", 2), ("fp32", 2)):
        out, js = tmp_path / f"{precision}{workers}.csv", tmp_path / f"{precision}{workers}.json"
        page = tmp_path / f"{precision}{workers}.html"
        r = CliRunner().invoke(app, ["diagnose", str(EXAMPLES), "--weights", str(int8_weights), "--precision", precision,
                                     "--workers", str(workers), "--device", "cpu", "--out", str(out), "--json", str(js),
                                     "--html", str(page), "--quiet"])
        assert r.exit_code in (0, 1), r.output
        html = page.read_text()
        assert f"<td>detector / embedder</td><td>{precision}</td>" in html  # the reviewer sees which models called
        assert ("embedder_int8.onnx" in html) == (precision == "int8")
        doc = json.loads(js.read_text())
        assert doc["options"]["precision"] == precision
        assert set(INT8_FILES.values()) <= set(doc["models_sha256"]) if precision == "int8" else not set(INT8_FILES.values()) & set(doc["models_sha256"])
        runs[precision, workers] = out.read_text()
    assert runs["int8", 1] == runs["int8", 2]  # worker processes loaded the int8 copies too (else: exit 3)


def test_shipped_int8_calls_the_examples_as_fp32_does(tmp_path):
    if not all((SHIPPED / f).exists() for f in INT8_FILES.values()):
        pytest.skip("shipped weights have no int8 copies")
    rows = {}
    for precision in ("fp32", "int8"):
        out = tmp_path / f"{precision}.csv"
        r = CliRunner().invoke(app, ["diagnose", str(EXAMPLES), "--precision", precision, "--device", "cpu",
                                     "--out", str(out), "--quiet"])
        assert r.exit_code == 0, r.output
        rows[precision] = {row["patient"]: row for row in csv.DictReader(open(out, newline=""))}
    assert rows["fp32"].keys() == rows["int8"].keys()
    for name, a in rows["fp32"].items():
        b = rows["int8"][name]
        assert a["call"] == b["call"] != "ALL" and a["n_blast_like"] == b["n_blast_like"] == "0"
        assert abs(float(a["p_all"]) - float(b["p_all"])) < 0.05
        assert abs(int(a["n_cells"]) - int(b["n_cells"])) <= 1


def test_shipped_calibration_does_not_need_test_fields():
    """The shipped int8 copies are calibrated on training data only: ALL-IDB1 (the shipped models train on all of
    it) and BCCD train fields, never the shipped examples (BCCD's test split)."""
    from tests.conftest import DATA

    if not (DATA / "ALL-IDB1").is_dir():
        pytest.skip("../shared/data is absent")
    from allmil_cli.train.quantize import shipped_calibration_fields

    fields = shipped_calibration_fields()
    assert len(fields) == 54 + 16
    assert not {p.name for p in fields} & {p.name for p in EXAMPLES.glob("*/*.jpg")}


def test_an_int8_copy_of_other_float_weights_is_refused(int8_weights, tmp_path):
    """After retraining, int8 copies left from the old float models must not be used silently."""
    from allmil_cli.stages.models import write_manifest
    from tests.onnx_fixtures import make_embedder

    w = tmp_path / "w"
    w.mkdir()
    for f in int8_weights.iterdir():
        (w / f.name).write_bytes(f.read_bytes())
    make_embedder(w / "embedder.onnx", dim=256)  # same interface...
    import onnx

    m = onnx.load(str(w / "embedder.onnx"))
    m.graph.initializer[0].raw_data = (np.frombuffer(m.graph.initializer[0].raw_data, np.float32) * 2).tobytes()  # ...other weights
    onnx.save(m, str(w / "embedder.onnx"))
    write_manifest(w)
    with pytest.raises(ModelError, match="made from another embedder.onnx"):
        load_models(w, device="cpu", precision="int8")
    assert load_models(w, device="cpu", precision="fp32").precision == "fp32"


def test_allmil_train_quantize_makes_copies_of_your_own_weights(tmp_path):
    """What a lab that trained its own models runs: int8 copies from its own calibration images."""
    pytest.importorskip("torch")  # 'allmil train' stages need the training extra
    from tests.onnx_fixtures import make_weights

    w = make_weights(tmp_path / "mine")
    images = tmp_path / "calibration"
    images.mkdir()
    for p in sorted(EXAMPLES.glob("patient_A/*.jpg"))[:3]:
        (images / p.name).write_bytes(p.read_bytes())
    (images / "broken.jpg").write_bytes(b"not a jpeg")  # left out with a note, not a crash
    r = CliRunner().invoke(app, ["train", "quantize", "--weights", str(w), "--calibration", str(images)])
    assert r.exit_code == 0, r.output
    assert all((w / f).is_file() for f in INT8_FILES.values())
    assert load_models(w, device="cpu", precision="int8").precision == "int8"  # the manifest was rewritten
    r = CliRunner().invoke(app, ["train", "quantize", "--weights", str(w), "--calibration", str(tmp_path / "empty")])
    assert r.exit_code == 2 and "no calibration images" in r.output
