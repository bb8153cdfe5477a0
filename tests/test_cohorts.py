"""Resumable runs, shards and merge (issue 9), local engine, real BCCD example fields and the shipped models."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from allmil_cli.cli.app import app
from allmil_cli.types.field import Patient
from allmil_cli.io.journal import read_journal
from allmil_cli.io.shard import parse_shard, select, shard_of

from tests.conftest import EXAMPLES, ROOT, shipped_weights_or_skip

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def patient_lines(journal: Path) -> list[str]:
    """Patient names of the journal's complete patient lines, in file order."""
    names = []
    for line in journal.read_text().splitlines():
        try:
            names.append(json.loads(line)["patient"]["patient"])
        except (ValueError, KeyError):
            continue
    return names


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """12 one-field patients built from the 6 real BCCD example fields (each field twice, under other names)."""
    root = tmp_path_factory.mktemp("cohort")
    fields = sorted(EXAMPLES.rglob("*.jpg"))
    for i in range(12):
        d = root / f"p{i:02d}"
        d.mkdir()
        shutil.copy(fields[i % len(fields)], d / fields[i % len(fields)].name)
    return root


@pytest.fixture(scope="module")
def whole(cohort, tmp_path_factory) -> Path:
    """A clean run over the whole cohort: the reference every other run must equal byte for byte."""
    shipped_weights_or_skip()
    out = tmp_path_factory.mktemp("whole")
    r = run("diagnose", cohort, "--out", out / "r.csv", "--json", out / "r.json", "--quiet")
    assert r.exit_code in (0, 1), r.output
    return out


def same_reports(a_dir: Path, a: str, b_dir: Path, b: str) -> None:
    assert (a_dir / f"{a}.csv").read_bytes() == (b_dir / f"{b}.csv").read_bytes()
    ja, jb = json.loads((a_dir / f"{a}.json").read_text()), json.loads((b_dir / f"{b}.json").read_text())
    assert ja["patients"] == jb["patients"] and ja["models_sha256"] == jb["models_sha256"]


def test_journal_is_written_beside_the_report_and_holds_every_patient(cohort, whole):
    journal = whole / "r.journal.jsonl"
    names = patient_lines(journal)
    assert sorted(names) == [f"p{i:02d}" for i in range(12)]
    c = read_journal(journal)
    assert c.n_planned == 12 and c.dropped == 0
    assert set(c.header["fingerprint"]["models_sha256"]) == {"detector.onnx", "embedder.onnx", "aggregator.onnx"}
    assert c.header["fingerprint"]["options"]["min_cells"] == 1 and c.header["fingerprint"]["options"]["per_image"] is False
    # everything the JSON report needs, per image and per cell
    doc = json.loads((whole / "r.json").read_text())
    assert sum(len(p["cells"]) for p in doc["patients"]) == sum(len(r.cells) for r in c.results) > 0


def test_killed_run_resumes_to_the_clean_result(cohort, whole, tmp_path):
    """SIGKILL mid-way (after >= 1 patient is journalled), then --resume: equal to a clean run, each patient once."""
    out = tmp_path / "r.csv"
    journal = tmp_path / "r.journal.jsonl"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "allmil_cli", "diagnose", str(cohort), "--out", str(out), "--json", str(tmp_path / "r.json"),
           "--quiet", "--threads", "1"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and len(patient_lines(journal)) >= 1:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = patient_lines(journal)
    assert 1 <= len(done) < 12 and not out.exists()  # killed mid-way: no report yet
    with open(journal, "a") as f:  # and as if killed in the middle of writing the next line
        f.write('{"patient":{"patient":"p11","status":"ok","ca')
    r = run("diagnose", cohort, "--out", out, "--json", tmp_path / "r.json", "--resume")
    assert r.exit_code in (0, 1), r.output
    assert f"resumed {len(done)} of 12 patient(s)" in r.output and "dropped and redone" in r.output
    names = patient_lines(journal)
    assert sorted(names) == [f"p{i:02d}" for i in range(12)]  # every patient exactly once
    assert names[: len(done)] == done  # the resumed ones were not analysed again
    same_reports(tmp_path, "r", whole, "r")


def test_resume_with_other_weights_or_options_is_refused(cohort, whole, tiny_weights, tmp_path):
    shutil.copy(whole / "r.journal.jsonl", tmp_path / "r.journal.jsonl")
    before = (tmp_path / "r.journal.jsonl").read_bytes()
    r = run("diagnose", cohort, "--out", tmp_path / "r.csv", "--resume", "--weights", tiny_weights)
    assert r.exit_code == 2, r.output
    assert "cannot resume" in r.output and "embedder.onnx" in r.output and "r.journal.jsonl" in r.output
    r = run("diagnose", cohort, "--out", tmp_path / "r.csv", "--resume", "--min-cells", "3")
    assert r.exit_code == 2 and "min_cells" in r.output, r.output
    assert (tmp_path / "r.journal.jsonl").read_bytes() == before and not (tmp_path / "r.csv").exists()


def test_resume_of_a_finished_run_analyses_nothing_and_rewrites_the_same_reports(cohort, whole, tmp_path):
    shutil.copy(whole / "r.journal.jsonl", tmp_path / "r.journal.jsonl")
    r = run("diagnose", cohort, "--out", tmp_path / "r.csv", "--json", tmp_path / "r.json", "--resume")
    assert r.exit_code in (0, 1) and "resumed 12 of 12" in r.output
    assert len(patient_lines(tmp_path / "r.journal.jsonl")) == 12
    same_reports(tmp_path, "r", whole, "r")


def test_shards_merged_equal_the_whole(cohort, whole, tmp_path):
    for i in (1, 2, 3):
        r = run("diagnose", cohort, "--out", tmp_path / f"s{i}.csv", "--json", tmp_path / f"s{i}.json", "--shard", f"{i}/3", "--quiet")
        assert r.exit_code in (0, 1), r.output
    sizes = [len(patient_lines(tmp_path / f"s{i}.journal.jsonl")) for i in (1, 2, 3)]
    assert sum(sizes) == 12
    # reports or journals may be named; the journals are the source
    r = run("merge", tmp_path / "s1.json", tmp_path / "s2.journal.jsonl", tmp_path / "s3.csv",
            "--out", tmp_path / "m.csv", "--json", tmp_path / "m.json")
    assert r.exit_code in (0, 1), r.output
    same_reports(tmp_path, "m", whole, "r")
    doc = json.loads((tmp_path / "m.json").read_text())
    assert doc["command"] == "merge" and doc["shards"] == ["1/3", "2/3", "3/3"]


def test_merge_refuses_duplicates_mixed_models_and_unfinished_shards(cohort, whole, tiny_weights, tmp_path):
    r = run("merge", whole / "r.journal.jsonl", tmp_path.parent / tmp_path.name / "nope.json", "--out", tmp_path / "m.csv")
    assert r.exit_code == 2 and "nope.json" in r.output
    run("diagnose", cohort, "--out", tmp_path / "a.csv", "--shard", "1/2", "--quiet")
    shutil.copy(tmp_path / "a.journal.jsonl", tmp_path / "b.journal.jsonl")
    r = run("merge", tmp_path / "a.journal.jsonl", tmp_path / "b.journal.jsonl", "--out", tmp_path / "m.csv")
    assert r.exit_code == 2 and "in both" in r.output and "a.journal.jsonl" in r.output and "b.journal.jsonl" in r.output
    run("diagnose", cohort, "--out", tmp_path / "t.csv", "--shard", "2/2", "--quiet", "--weights", tiny_weights)
    r = run("merge", tmp_path / "a.journal.jsonl", tmp_path / "t.journal.jsonl", "--out", tmp_path / "m.csv")
    assert r.exit_code == 2 and "models" in r.output and "t.journal.jsonl" in r.output
    lines = (tmp_path / "a.journal.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "cut.journal.jsonl").write_text("".join(lines[:-1]))  # one patient short of its plan
    r = run("merge", tmp_path / "cut.journal.jsonl", "--out", tmp_path / "m.csv")
    assert r.exit_code == 2 and "incomplete" in r.output and "--resume" in r.output
    assert not (tmp_path / "m.csv").exists()


def test_shard_partition_is_stable_and_complete():
    names = [f"patient_{i}" for i in range(200)]
    pats = [Patient(name=n, folder=Path(n)) for n in names]
    parts = [select(pats, (i, 4)) for i in (1, 2, 3, 4)]
    assert sorted(p.name for part in parts for p in part) == sorted(names)
    assert all(20 < len(part) < 80 for part in parts)  # roughly even
    # adding or removing other patients never moves a patient
    fewer = [p for p in pats if p.name != "patient_7"] + [Patient(name="new", folder=Path("new"))]
    for i in (1, 2, 3, 4):
        assert {p.name for p in select(fewer, (i, 4))} - {"new"} == {p.name for p in parts[i - 1]} - {"patient_7"}
    assert shard_of("patient_1", 4) == shard_of("patient_1", 4)
    assert parse_shard("3/16") == (3, 16)
    for bad in ("0/3", "4/3", "3", "a/b", "1/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)


def test_bad_shard_and_resume_to_stdout_are_usage_errors(cohort, tmp_path):
    r = run("diagnose", cohort, "--out", tmp_path / "r.csv", "--shard", "4/3")
    assert r.exit_code == 2 and "1 <= I <= N" in r.output
    r = run("diagnose", cohort, "--out", "-", "--resume")
    assert r.exit_code == 2 and "--journal" in r.output
