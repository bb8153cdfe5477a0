"""``allmil calibrate`` and ``--site`` end to end on real images and real ONNX sessions: the profile is written, used,
recorded (JSON, journal, merge), and every refusal exits 2 naming what is wrong, with nothing half-written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from allmil_cli.cli.app import app

from tests.conftest import EXAMPLES

runner = CliRunner()
FIELDS = sorted(EXAMPLES.rglob("*.jpg"))  # 15 BCCD fields


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture()
def lab(tmp_path) -> tuple[Path, Path]:
    """12 single-field 'normal' patients and their labels file."""
    root = tmp_path / "lab"
    lines = ["patient,label"]
    for i, f in enumerate(FIELDS[:12]):
        (root / f"N{i:02d}").mkdir(parents=True)
        shutil.copy(f, root / f"N{i:02d}")
        lines.append(f"N{i:02d},normal")
    labels = tmp_path / "labels.csv"
    labels.write_text("\n".join(lines) + "\n")
    return root, labels


def test_calibrate_writes_a_profile_that_diagnose_uses_and_records(lab, tiny_weights, tmp_path):
    root, labels = lab
    site = tmp_path / "site.yaml"
    r = invoke("calibrate", root, "--labels", labels, "--out", site, "--weights", tiny_weights, "--quiet")
    assert r.exit_code == 0, r.output
    doc = yaml.safe_load(site.read_text())
    assert site.read_text().startswith("# allmil site profile")
    assert doc["input"]["n_normal"] == 12 and doc["input"]["n_all"] == 0
    assert doc["rule"]["all_criterion"] in ("shipped", "raised")
    assert doc["cross_validation"]["specificity"]["n"] == 12 and doc["cross_validation"]["sensitivity"] is None
    assert any("normal patients only" in w for w in doc["warnings"])
    assert set(doc["models_sha256"]) == {"detector.onnx", "embedder.onnx", "aggregator.onnx"}

    js = tmp_path / "r.json"
    r = invoke("diagnose", EXAMPLES, "--site", site, "--out", tmp_path / "r.csv", "--json", js, "--weights", tiny_weights,
               "--quiet")
    assert r.exit_code in (0, 1), r.output
    out = json.loads(js.read_text())
    import hashlib

    sha = hashlib.sha256(site.read_bytes()).hexdigest()
    assert out["site_profile"]["sha256"] == sha and out["options"]["site"] == sha
    assert out["options"]["rule"]["background"] == doc["rule"]["background"]
    for p in out["patients"]:
        assert p["rule"]["background_pct"] == pytest.approx(100 * doc["rule"]["background"])

    # --resume with another profile is refused: the profile's sha256 is part of the journal's fingerprint
    other = tmp_path / "other.yaml"
    other.write_text(site.read_text().replace("Do not edit", "Do not edit (copy)"))
    r = invoke("diagnose", EXAMPLES, "--site", other, "--out", tmp_path / "r.csv", "--json", js, "--weights", tiny_weights,
               "--quiet", "--resume")
    assert r.exit_code == 2 and "site" in r.output

    # a profile made for other weights is refused, naming the model that differs
    shipped = Path(__file__).resolve().parents[1] / "weights"
    r = invoke("diagnose", EXAMPLES, "--site", site, "--out", tmp_path / "s.csv", "--weights", shipped, "--quiet")
    assert r.exit_code == 2 and "sha256" in r.output and "allmil calibrate" in r.output
    assert not (tmp_path / "s.csv").exists()


def test_merge_refuses_shards_run_with_different_profiles(lab, tiny_weights, tmp_path):
    root, labels = lab
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    assert invoke("calibrate", root, "--labels", labels, "--out", a, "--weights", tiny_weights, "--quiet").exit_code == 0
    b.write_text(a.read_text() + "# another lab\n")
    for i, prof in ((1, a), (2, b)):
        r = invoke("diagnose", EXAMPLES, "--site", prof, "--shard", f"{i}/2", "--out", tmp_path / f"s{i}.csv",
                   "--json", tmp_path / f"s{i}.json", "--weights", tiny_weights, "--quiet")
        assert r.exit_code in (0, 1), r.output
    r = invoke("merge", tmp_path / "s1.json", tmp_path / "s2.json", "--out", tmp_path / "m.csv")
    assert r.exit_code == 2 and "site" in r.output
    assert not (tmp_path / "m.csv").exists()


def test_too_few_normal_patients_is_refused_before_any_analysis(lab, tiny_weights, tmp_path):
    root, labels = lab
    short = tmp_path / "short.csv"
    short.write_text("\n".join(labels.read_text().splitlines()[:10]) + "\n")  # header + 9 patients
    r = invoke("calibrate", root, "--labels", short, "--out", tmp_path / "site.yaml", "--weights", tiny_weights, "--quiet")
    assert r.exit_code == 2 and "9 normal patient(s)" in r.output and "at least 10" in r.output
    assert not (tmp_path / "site.yaml").exists()


@pytest.mark.parametrize("extra,message", [("ghost,normal\n", "have no folder"), ("N03,ALL\n", "listed twice"),
                                           ("N99,maybe\n", "use ALL or normal")])
def test_bad_labels_are_refused_naming_the_problem(lab, tiny_weights, tmp_path, extra, message):
    root, labels = lab
    labels.write_text(labels.read_text() + extra)
    r = invoke("calibrate", root, "--labels", labels, "--out", tmp_path / "site.yaml", "--weights", tiny_weights, "--quiet")
    assert r.exit_code == 2 and message in r.output, r.output
    assert not (tmp_path / "site.yaml").exists()


def test_a_broken_profile_is_refused(tiny_weights, tmp_path):
    bad = tmp_path / "site.yaml"
    bad.write_text("allmil_site_profile: 1\nrule: {background: 0.1}\n")
    r = invoke("diagnose", EXAMPLES, "--site", bad, "--out", tmp_path / "r.csv", "--weights", tiny_weights, "--quiet")
    assert r.exit_code == 2 and "site.yaml" in r.output
