"""Files: reports keep the umask; skipped files are listed; WebP is read; the terminal table fits 80 columns."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image, features
from rich.console import Console
from typer.testing import CliRunner

from allmil_cli.cli.app import app
from allmil_cli.io.discover import IMAGE_SUFFIXES, discover_patients
from allmil_cli.types.results import PatientResult
from allmil_cli.io.report import atomic_write
from allmil_cli.io.summary import counts_line, summary_table

from tests.conftest import EXAMPLES, ROOT

runner = CliRunner()
FIELD = EXAMPLES / "patient_A" / "BloodImage_00007.jpg"


@pytest.fixture()
def umask():
    old = os.umask(0o022)
    os.umask(old)

    def set_(mask: int) -> None:
        os.umask(mask)

    yield set_
    os.umask(old)


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_write_keeps_the_umask(tmp_path, umask, mask, mode):
    umask(mask)
    for data in ("text", b"bytes"):
        target = tmp_path / f"r_{type(data).__name__}"
        atomic_write(target, data)
        assert stat.S_IMODE(target.stat().st_mode) == mode
        atomic_write(target, data)  # replacing an existing report gives the same mode
        assert stat.S_IMODE(target.stat().st_mode) == mode
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.parametrize("mask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_cli_reports_keep_the_umask(patients_dir, tiny_weights, tmp_path, umask, mask, mode):
    umask(mask)
    out = tmp_path / "out"
    out.mkdir()
    r = runner.invoke(app, ["diagnose", str(patients_dir), "--out", str(out / "r.csv"), "--json", str(out / "r.json"),
                            "--html", str(out / "r.html"), "--crops-dir", str(out / "crops"), "--weights", str(tiny_weights),
                            "--quiet"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    written = [out / "r.csv", out / "r.json", out / "r.html", *(out / "crops").rglob("*.png"), *(out / "crops").rglob("*.csv")]
    assert len(written) > 5
    assert {stat.S_IMODE(p.stat().st_mode) for p in written} == {mode}


def _junk_patient(root: Path) -> Path:
    p = root / "patient_junk"
    (p / "__MACOSX").mkdir(parents=True)
    (p / ".thumbs").mkdir()
    (p / "field.jpg").write_bytes(FIELD.read_bytes())
    (p / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (p / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (p / "__MACOSX" / "._field.jpg").write_bytes(b"\0\5\26\7")
    (p / ".thumbs" / "small.jpg").write_bytes(FIELD.read_bytes())
    (p / "report.pdf").write_bytes(b"%PDF-1.4\n%%EOF\n")
    Image.open(FIELD).save(p / "anim.gif")
    (p / "gone.jpg").symlink_to(root / "nowhere.jpg")
    (p / "README").write_text("no extension")
    return p


def test_skipped_files_are_listed_with_a_reason(tmp_path):
    _junk_patient(tmp_path)
    (patient,), _ = discover_patients(tmp_path)
    assert [x.name for x in patient.images] == ["field.jpg"]
    reasons = {s["file"]: s["reason"] for s in patient.skipped}
    assert set(reasons) == {".DS_Store", "Thumbs.db", str(Path("__MACOSX/._field.jpg")), str(Path(".thumbs/small.jpg")),
                            "report.pdf", "anim.gif", "gone.jpg", "README"}
    for name in (".DS_Store", "Thumbs.db", str(Path("__MACOSX/._field.jpg")), str(Path(".thumbs/small.jpg"))):
        assert reasons[name] == "skipped: hidden or system file"
    assert reasons["report.pdf"].startswith("skipped: unsupported format ('.pdf')") and "JPEG, PNG or TIFF" in reasons["report.pdf"]
    assert reasons["anim.gif"].startswith("skipped: unsupported format ('.gif')")
    assert "broken link" in reasons["gone.jpg"]
    assert "no file extension" in reasons["README"]


def test_skipped_files_reach_the_json_and_the_terminal(tmp_path, tiny_weights):
    root = tmp_path / "in"
    root.mkdir()
    _junk_patient(root)
    empty = root / "patient_only_junk"
    empty.mkdir()
    (empty / "scan.pdf").write_bytes(b"%PDF-1.4\n")
    js = tmp_path / "r.json"
    r = runner.invoke(app, ["diagnose", str(root), "--out", str(tmp_path / "r.csv"), "--json", str(js), "--weights",
                            str(tiny_weights), "--min-cells-normal", "0"], catch_exceptions=False)
    doc = {p["patient"]: p for p in json.loads(js.read_text())["patients"]}
    assert len(doc["patient_junk"]["skipped"]) == 8 and doc["patient_junk"]["status"] == "ok"
    assert doc["patient_only_junk"]["skipped"] == [{"file": "scan.pdf", "reason": doc["patient_only_junk"]["skipped"][0]["reason"]}]
    assert doc["patient_only_junk"]["status"] == "insufficient" and "1 file(s) skipped" in doc["patient_only_junk"]["reason"]
    assert "9 file(s) skipped" in " ".join(r.output.split())


@pytest.mark.skipif(not features.check("webp"), reason="this Pillow cannot read WebP")
def test_webp_fields_are_analysed(tmp_path, tiny_weights):
    assert ".webp" in IMAGE_SUFFIXES
    p = tmp_path / "in" / "patient_webp"
    p.mkdir(parents=True)
    Image.open(FIELD).save(p / "field.webp", quality=90)
    js = tmp_path / "r.json"
    r = runner.invoke(app, ["diagnose", str(tmp_path / "in"), "--out", str(tmp_path / "r.csv"), "--json", str(js),
                            "--weights", str(tiny_weights), "--quiet", "--min-cells-normal", "0"], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    (patient,) = json.loads(js.read_text())["patients"]
    assert patient["n_images"] == 1 and patient["n_cells"] >= 1 and patient["skipped"] == []
    assert patient["images"][0]["width"] == 640


def _result(name: str, reason: str, status: str = "insufficient") -> PatientResult:
    return PatientResult(patient=name, status=status, call="review", p_all=float("nan"), n_images=12, n_cells=3,
                         n_blast_like=0, blast_fraction=0.0, reason=reason)


def test_summary_table_fits_80_columns_and_two_lines_per_cell():
    long_reason = " ".join(["none of 40 image(s) could be read; first problem: /very/long/path/to/a/field.jpg: truncated"] * 8)
    results = [_result("a" * 70, long_reason), _result("patient_2", "x" * 500),
               _result("p3", "", status="ok"), _result("[b]Ü[/b] ☃", long_reason)]
    console = Console(width=80, record=True, color_system=None, legacy_windows=False)
    console.print(summary_table(results, console.width))
    lines = console.export_text().splitlines()
    assert max(len(line) for line in lines) <= 80
    body = lines[3:]  # title, header, rule
    starts = [i for i, line in enumerate(body) if line[:1].strip()]  # a row starts where the patient column is filled
    assert len(starts) == len(results)
    spans = [b - a for a, b in zip(starts, starts[1:] + [len(body)])]
    assert max(spans) <= 2 and spans[0] == 2  # the long reason wraps once, then is cut
    assert "…" in body[1] and "…" in body[0]  # the cut reason and the cut 70-character name end in an ellipsis
    assert "[b]Ü[/b] ☃" in "\n".join(lines)  # user text is not read as rich markup
    results[1].skipped = [{"file": "scan.pdf", "reason": "skipped: unsupported format ('.pdf')"}]
    line = counts_line(results)
    assert "3 insufficient" in line and "0 failed" in line and "1 file(s) skipped" in line


def test_terminal_summary_from_the_cli_fits_80_columns(patients_dir, tiny_weights, tmp_path):
    bad = patients_dir / ("patient with a very long folder name that goes on and on " * 2).strip()
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(FIELD.read_bytes()[:3000])
    (bad / "notes.pdf").write_bytes(b"%PDF")
    env = dict(os.environ, COLUMNS="80", PYTHONPATH=str(ROOT))
    p = subprocess.run([sys.executable, "-m", "allmil_cli", "diagnose", str(patients_dir), "--out", str(tmp_path / "r.csv"),
                        "--weights", str(tiny_weights)], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 1, p.stderr  # one patient failed
    lines = p.stderr.splitlines()
    assert max(len(line) for line in lines if not line.startswith(("note:", "report:"))) <= 80
    table = lines[next(i for i, line in enumerate(lines) if "per-patient calls" in line):]
    assert sum(1 for line in table if "failed" in line and "patient(s):" not in line) == 1
    assert "1 file(s) skipped" in " ".join(p.stderr.split())
    with open(tmp_path / "r.csv", encoding="utf-8") as f:
        assert "truncated or corrupt" in f.read()  # the CSV holds the full reason
