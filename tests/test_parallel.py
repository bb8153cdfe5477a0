"""Worker processes (``Options.workers`` > 1) give exactly the serial results, in order, bounded, and clean up.

Real images (the shipped BCCD example patients plus a corrupt and an empty file) and the shipped models.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT, shipped_weights_or_skip


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (children, grandchildren: forkserver workers are grandchildren)."""
    parents: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z":
                parents[int(d.name)] = int(fields[1])
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - out
        out |= frontier
    return out


@pytest.fixture(scope="module")
def models():
    from allmil_cli.stages.models import load_models

    return load_models(shipped_weights_or_skip(), device="cpu")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """The example patients, one of them with a corrupt JPEG and an empty file among its fields."""
    from tests.conftest import EXAMPLES

    patients_dir = tmp_path_factory.mktemp("cohort") / "patients"
    shutil.copytree(EXAMPLES, patients_dir)
    bad = patients_dir / "patient_B"
    (bad / "BloodImage_00016b.jpg").write_bytes((bad / "BloodImage_00016.jpg").read_bytes()[:2000])  # truncated
    (bad / "BloodImage_00017.jpg").write_bytes(b"")
    shutil.copytree(patients_dir / "patient_A", patients_dir / "patient_D")
    return patients_dir


@pytest.fixture(scope="module")
def serial(models, cohort):
    return _run(models, cohort, workers=1)[0]


def _run(models, folder: Path, workers: int, **kw):
    from allmil_cli.io.discover import discover_patients
    from allmil_cli.types.results import Options
    from allmil_cli.pipeline.runner import Pipeline

    patients, _ = discover_patients(folder)
    pipe = Pipeline(models, Options(workers=workers, keep_features=True, **kw))
    return list(pipe.run(patients)), pipe


def _flat(result) -> str:
    """Everything of a result, NaNs included (repr), features bit for bit."""
    d = asdict(result)
    d["features"] = None if result.features is None else result.features.tobytes()
    return repr(d)


def test_workers_give_the_serial_results_cell_for_cell(models, cohort, serial):
    parallel, pipe = _run(models, cohort, workers=2)
    assert pipe.executor.pool is None  # closed after the run
    assert [r.patient for r in parallel] == ["patient_A", "patient_B", "patient_C", "patient_D"]
    assert sum(r.n_cells for r in serial) > 10
    for s, p in zip(serial, parallel):
        assert _flat(s) == _flat(p)  # every cell (box, centre, scores), image entry, ruler stats and feature bit
    bad = {i.image: i.reason for i in parallel[1].images if i.status == "failed"}
    assert set(bad) == {"BloodImage_00016b.jpg", "BloodImage_00017.jpg"}
    assert "truncated or corrupt" in bad["BloodImage_00016b.jpg"] and "empty (0 bytes)" in bad["BloodImage_00017.jpg"]


def test_detect_and_crops_match_serial(models, cohort):
    from allmil_cli.io.discover import discover_patients
    from allmil_cli.types.results import Options
    from allmil_cli.pipeline.runner import Pipeline

    patients, _ = discover_patients(cohort)
    out = {}
    for workers in (1, 2):
        pipe = Pipeline(models, Options(workers=workers))
        pipe.prefetch(patients, mode="detect+crops")
        out[workers] = [pipe.detect_patient(p, with_crops=True) for p in patients]
        pipe.close()
    for (i1, c1, k1), (i2, c2, k2) in zip(out[1], out[2]):
        assert repr([asdict(x) for x in i1]) == repr([asdict(x) for x in i2])  # repr: NaN blast scores compare equal
        assert repr([asdict(x) for x in c1]) == repr([asdict(x) for x in c2])
        assert len(k1) == len(k2) and all(np.array_equal(a, b) for a, b in zip(k1, k2))


def test_in_flight_is_bounded_and_on_field_gets_decoded_fields(models, cohort):
    from allmil_cli.io.discover import discover_patients
    from allmil_cli.executors.parallel import LOOKAHEAD_PER_WORKER
    from allmil_cli.types.results import Options
    from allmil_cli.pipeline.runner import Pipeline

    patients, _ = discover_patients(cohort)
    seen: list[tuple[str, tuple[int, ...], int]] = []
    depth: list[int] = []

    def on_field(patient, fld, cells, rbc_px):
        seen.append((patient.name, fld.rgb.shape, len(cells)))
        depth.append(len(pipe.executor.pool._queue.pending))

    pipe = Pipeline(models, Options(workers=2), on_field=on_field)
    results = list(pipe.run(patients))
    assert max(depth) <= LOOKAHEAD_PER_WORKER * 2
    assert [s[0] for s in seen] == [r.patient for r in results for i in r.images if i.status == "ok"]
    assert all(shape == (480, 640, 3) for _, shape, _ in seen)
    assert sum(n for *_, n in seen) == sum(r.n_cells for r in results)


def test_a_killed_worker_is_replaced_and_results_stay_identical(models, cohort, serial):
    from allmil_cli.io.discover import discover_patients
    from allmil_cli.types.results import Options
    from allmil_cli.pipeline.runner import Pipeline

    patients, _ = discover_patients(cohort)
    pipe = Pipeline(models, Options(workers=2, keep_features=True))
    pipe.prefetch(patients)
    pipe.executor.pool.start()  # wait until the workers run (one dying while it starts is a start failure: exit 3)
    victim = next(iter(pipe.executor.pool._executor._processes.values()))
    os.kill(victim.pid, signal.SIGKILL)
    try:
        parallel = [pipe.diagnose_patient(p) for p in patients]
    finally:
        pipe.close()
    assert [_flat(r) for r in parallel] == [_flat(r) for r in serial]
    assert not _descendants(os.getpid()) - {victim.pid} - _forkservers()


def test_breaking_off_a_run_leaves_no_worker_process(models, cohort):
    from allmil_cli.io.discover import discover_patients
    from allmil_cli.types.results import Options
    from allmil_cli.pipeline.runner import Pipeline

    patients, _ = discover_patients(cohort)
    before = _descendants(os.getpid())
    gen = Pipeline(models, Options(workers=2)).run(patients)
    next(gen)
    assert len(_descendants(os.getpid()) - before) >= 2  # the workers (and the forkserver) run
    gen.close()  # what an exception in the caller's loop does
    deadline = time.time() + 10
    while time.time() < deadline and (_descendants(os.getpid()) - before) - _forkservers():
        time.sleep(0.1)
    assert not (_descendants(os.getpid()) - before) - _forkservers()


def _forkservers() -> set[int]:
    """multiprocessing's forkserver and resource tracker live as long as this process (by design); not workers."""
    from multiprocessing import forkserver, resource_tracker

    pids = {getattr(forkserver._forkserver, "_forkserver_pid", None), getattr(resource_tracker._resource_tracker, "_pid", None)}
    return {p for p in pids if p}


def test_ctrl_c_stops_the_cli_and_its_workers(cohort, tmp_path):
    weights = shipped_weights_or_skip()
    many = tmp_path / "many"
    many.mkdir()
    for i in range(40):  # enough fields (200) that the run is still going when Ctrl-C comes
        shutil.copytree(cohort / "patient_A", many / f"p{i:02d}")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "allmil_cli", "diagnose", str(many), "--out", str(tmp_path / "r.csv"),
                             "--weights", str(weights), "--workers", "2", "--device", "cpu", "-q"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 20
    journal = tmp_path / "r.journal.jsonl"  # a line per finished patient: two, and the run is past its start-up
    while time.time() < deadline and not (journal.exists() and journal.read_text().count('{"patient":') >= 2):
        time.sleep(0.02)
    assert len(_descendants(proc.pid)) >= 3, "the worker processes never started"  # forkserver + 2 workers
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not (tmp_path / "r.csv").exists()
    time.sleep(0.5)
    leftover = [d for d in Path("/proc").iterdir() if d.name.isdigit() and _session_of(d) == proc.pid]
    assert not leftover, f"processes left behind: {[d.name for d in leftover]}"


def _session_of(d: Path) -> int | None:
    try:
        stat = (d / "stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return None if fields[0] == "Z" else int(fields[3])


def test_workers_exit_when_the_main_process_is_killed(cohort, tmp_path):
    """SIGKILL leaves the main process no chance to clean up: the workers must notice on their own."""
    weights = shipped_weights_or_skip()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "allmil_cli", "diagnose", str(cohort), "--out", str(tmp_path / "r.csv"),
                             "--weights", str(weights), "--workers", "2", "--device", "cpu", "-q"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 20
    while time.time() < deadline and len(_descendants(proc.pid)) < 3:
        time.sleep(0.05)
    below = _descendants(proc.pid)
    assert len(below) >= 3, "the worker processes never started"
    proc.kill()
    proc.wait()
    deadline = time.time() + 15
    while time.time() < deadline and _alive(below):
        time.sleep(0.1)
    assert not _alive(below), f"orphaned: {sorted(_alive(below))}"


def _alive(pids: set[int]) -> set[int]:
    out = set()
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if stat[stat.rindex(")") + 2] != "Z":
            out.add(pid)
    return out


def test_prestarted_workers_are_taken_over_only_when_they_fit(models, cohort, serial):
    from allmil_cli.executors import workers
    from allmil_cli.io.discover import discover_patients
    from allmil_cli.types.results import Options
    from allmil_cli.pipeline.runner import Pipeline

    workers.prestart(models.weights_dir, Options(workers=2, cell_size=90.0), 2)  # other options: not taken
    misfit = workers._PRESTARTED[0]
    assert workers.take_prestarted(models.weights_dir, Options(workers=2), 2) is None
    assert misfit._executor is None and not workers._PRESTARTED  # stopped
    workers.prestart(models.weights_dir, Options(workers=2, keep_features=True), 2)
    early = workers._PRESTARTED[0]
    patients, _ = discover_patients(cohort)
    pipe = Pipeline(models, Options(workers=2, keep_features=True))
    used = []
    results = list(pipe.run(patients, on_done=lambda r: used.append(pipe.executor.pool)))
    assert used and all(p is early for p in used) and not workers._PRESTARTED
    assert [_flat(r) for r in results] == [_flat(r) for r in serial]


def test_every_file_goes_to_the_workers_and_this_process_analyses_none(models, cohort, serial):
    from allmil_cli.io.discover import discover_patients
    from allmil_cli.types.results import Options
    from allmil_cli.pipeline.runner import Pipeline

    patients, _ = discover_patients(cohort)
    pipe = Pipeline(models, Options(workers=2, keep_features=True))
    pipe.prefetch(patients)
    files = [f for p in patients for f in p.images]
    assert all(pipe.executor.pool.scheduled(f, "analyse", False) for f in files)
    here: list = []
    local = pipe.executor.local  # what this process would analyse goes through here
    local.analyse_file = lambda *a, f=local.analyse_file: here.append(a) or f(*a)
    try:
        parallel = [pipe.diagnose_patient(p) for p in patients]
    finally:
        pipe.close()
    assert here == []
    assert [_flat(r) for r in parallel] == [_flat(r) for r in serial]


def test_the_schedule_keeps_order_drops_what_is_skipped_and_knows_its_keys():
    from concurrent.futures import Future

    from allmil_cli.executors.parallel import _Ordered

    submitted: list[str] = []

    def submit(key: str) -> Future:
        submitted.append(key)
        fut: Future = Future()
        fut.set_result(key.upper())
        return fut

    q = _Ordered(depth=2)
    q.push(["a", "b", "c", "d", "e"])
    assert all(q.is_upcoming(k) for k in "abcde") and not q.is_upcoming("z")
    assert q.take("z", submit) is None  # never scheduled: the caller analyses it
    assert q.take("c", submit).result() == "C"  # "a" and "b" are dropped, unsubmitted
    assert submitted == ["c"] and not q.is_upcoming("a") and not q.is_upcoming("b")
    q.pending.append((q.pop(), submit("d")))
    assert q.is_pending("d") and not q.is_upcoming("d")
    q.push(["d"], front=True)  # a lost key goes back to the front (a replaced worker pool)
    assert list(q.upcoming) == ["d", "e"] and q.is_upcoming("d")
    q.clear()
    assert not q.upcoming and not q.pending and not q.is_upcoming("e")


def test_the_forkserver_is_started_early_only_when_there_is_more_than_one_file(tmp_path):
    """A command starts the workers' forkserver first thing when its folder holds more than one file; a single field
    is analysed in this process, where the forkserver's imports would only compete with it."""
    from allmil_cli.cli.inputs import more_than_one_file as _more_than_one_file

    assert not _more_than_one_file(tmp_path / "missing")
    assert not _more_than_one_file(tmp_path)
    (tmp_path / ".DS_Store").write_bytes(b"x")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f1.jpg").write_bytes(b"x")
    assert not _more_than_one_file(tmp_path)  # hidden files do not count
    (tmp_path / "a" / "deeper").mkdir()
    (tmp_path / "a" / "deeper" / "f2.jpg").write_bytes(b"x")
    assert not _more_than_one_file(tmp_path)  # two levels only, as patient folders are
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "f3.jpg").write_bytes(b"x")
    assert _more_than_one_file(tmp_path)
