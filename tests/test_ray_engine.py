"""The Ray engine (issue 9) on a real local Ray cluster (2 CPUs) started by the tests, real BCCD fields, shipped models.

Skipped when Ray is not installed (pip install 'allmil[ray]'), except the test that checks the install hint.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from allmil_cli.cli.app import app
from allmil_cli.io.discover import discover_patients

from tests.conftest import EXAMPLES, ROOT, shipped_weights_or_skip

runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray cluster with 2 CPUs for this module; its GCS address is what --ray-address joins."""
    ray = pytest.importorskip("ray")
    shipped_weights_or_skip()
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024**2, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def local_reports(tmp_path_factory) -> Path:
    """The local engine's reports over the example fields, each its own patient: the reference."""
    shipped_weights_or_skip()
    out = tmp_path_factory.mktemp("local")
    r = run("diagnose", EXAMPLES, "--per-image", "--out", out / "r.csv", "--json", out / "r.json", "--quiet")
    assert r.exit_code in (0, 1), r.output
    return out


def assert_same(a: Path, b: Path) -> None:
    assert (a / "r.csv").read_bytes() == (b / "r.csv").read_bytes()
    ja, jb = json.loads((a / "r.json").read_text()), json.loads((b / "r.json").read_text())
    assert ja["patients"] == jb["patients"] and ja["models_sha256"] == jb["models_sha256"]
    assert sum(len(p["cells"]) for p in ja["patients"]) > 0


def journalled(path: Path) -> list[str]:
    return [json.loads(line)["patient"]["patient"] for line in path.read_text().splitlines() if line.startswith('{"patient"')]


def test_ray_and_local_engines_give_identical_reports(ray_cluster, local_reports, tmp_path):
    r = run("diagnose", EXAMPLES, "--per-image", "--out", tmp_path / "r.csv", "--json", tmp_path / "r.json", "--quiet",
            "--engine", "ray", "--workers", "2")
    assert r.exit_code in (0, 1), r.output
    assert_same(tmp_path, local_reports)
    assert sorted(journalled(tmp_path / "r.journal.jsonl")) == sorted(journalled(local_reports / "r.journal.jsonl"))
    assert len(journalled(tmp_path / "r.journal.jsonl")) == len(discover_patients(EXAMPLES, per_image=True)[0])  # each once


def test_a_separate_driver_joins_the_running_cluster(ray_cluster, local_reports, tmp_path):
    """--ray-address: another process (the CLI) joins the test's cluster; same reports as the local engine."""
    # os.environ holds RAY_AUTH_MODE=token since the fixture's ray.init: an explicit address needs it (Ray's token auth)
    env = dict(os.environ, PYTHONPATH=str(ROOT), RAY_USAGE_STATS_ENABLED="0")
    p = subprocess.run([sys.executable, "-m", "allmil_cli", "diagnose", str(EXAMPLES), "--per-image", "--out", str(tmp_path / "r.csv"),
                        "--json", str(tmp_path / "r.json"), "--quiet", "--engine", "ray", "--ray-address", ray_cluster],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode in (0, 1), p.stderr[-3000:]
    assert_same(tmp_path, local_reports)


def _actor_pids() -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "cmdline").read_bytes().startswith(b"ray::PatientWorker"):
                    pids.append(int(d.name))
            except OSError:
                continue
    return pids


def test_a_killed_ray_worker_is_restarted_and_its_patient_retried(ray_cluster, local_reports, tmp_path):
    """SIGKILL one actor process after the first result: Ray restarts it, the run completes, results unchanged."""
    from allmil_cli.io.cohort import iter_results
    from allmil_cli.executors.engine import EngineConfig
    from allmil_cli.stages.models import load_models
    from allmil_cli.pipeline.runner import Pipeline
    from allmil_cli.io.report import csv_text

    patients, _ = discover_patients(EXAMPLES, per_image=True)
    pipeline = Pipeline(load_models(device="cpu"))
    results = iter_results(EngineConfig(engine="ray", workers=2), pipeline, patients)
    got = [next(results)]
    victims = _actor_pids()
    assert len(victims) == 2
    os.kill(victims[0], signal.SIGKILL)  # one of this test's own actors
    got.extend(results)
    assert sorted(r.patient for r in got) == sorted(p.name for p in patients)  # each patient exactly once
    order = {p.name: i for i, p in enumerate(patients)}
    got.sort(key=lambda r: order[r.patient])
    assert csv_text(got) == (local_reports / "r.csv").read_text()


def test_engine_ray_without_ray_says_how_to_install(tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoRay:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'ray':\n"
        "            raise ImportError('ray is blocked in this test')\n"
        "sys.meta_path.insert(0, _NoRay())\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker), str(ROOT)]))
    p = subprocess.run([sys.executable, "-m", "allmil_cli", "diagnose", str(EXAMPLES), "--out", str(tmp_path / "r.csv"),
                        "--engine", "ray"], env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "allmil[ray]" in p.stderr and "pip install" in p.stderr
    assert not (tmp_path / "r.csv").exists() and not (tmp_path / "r.journal.jsonl").exists()
