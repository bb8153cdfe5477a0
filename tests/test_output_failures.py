"""Outputs that fail cleanly: a read-only folder, a full disk, two runs on one journal (exit 4 / exit 2, one line).

Real file systems where the test may mount them (a read-only tmpfs, a 64 KiB tmpfs filled up: needs root with
CAP_SYS_ADMIN, else those tests skip), and the same errors raised at the write calls (always run), so the code path is
exercised either way. Tiny ONNX weights, one field per patient, ``--workers 1``."""

from __future__ import annotations

import errno
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from allmil_cli.io import journal_lock
from allmil_cli.cli.app import app
from allmil_cli.io.journal import Journal, read_journal

from tests.conftest import EXAMPLES, ROOT

runner = CliRunner()
FAST = ("--workers", "1", "--quiet")


def allmil(*args: object, wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    cmd = [sys.executable, "-m", "allmil_cli", *(str(a) for a in args)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_error_line(text: str) -> str:
    """The run's only output line: an error, no traceback."""
    assert "Traceback" not in text, text
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert lines[0].startswith("error: "), text
    return lines[0]


def stray_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith((".tmp", ".probe")))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    """12 one-field patients (real BCCD example fields, each used twice)."""
    root = tmp_path_factory.mktemp("cohort")
    fields = sorted(EXAMPLES.rglob("*.jpg"))
    for i in range(12):
        (root / f"p{i:02d}").mkdir()
        shutil.copy(fields[i % len(fields)], root / f"p{i:02d}" / fields[i % len(fields)].name)
    return root


@pytest.fixture(scope="module")
def small(cohort, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("small")
    for name in ("p00", "p01", "p02"):
        shutil.copytree(cohort / name, root / name)
    return root


@pytest.fixture(scope="module")
def reference(small, tiny_weights, tmp_path_factory) -> Path:
    """A clean run over ``small``: its reports and journal."""
    out = tmp_path_factory.mktemp("reference")
    r = invoke("diagnose", small, "--out", out / "r.csv", "--json", out / "r.json", "--weights", tiny_weights, *FAST)
    assert r.exit_code in (0, 1), r.output
    return out


@contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``path`` for the block; skips the test where this process may not mount."""
    path.mkdir(exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no mount command: the simulated-failure tests cover this path")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({p.stderr.strip()}): the simulated-failure tests cover this path")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path, leave_pages: int) -> Path:
    """Fill ``folder``'s file system up to ``leave_pages`` free blocks."""
    st = os.statvfs(folder)
    assert st.f_bavail >= leave_pages
    filler = folder / "filler"
    filler.write_bytes(b"x" * st.f_frsize * (st.f_bavail - leave_pages))
    assert os.statvfs(folder).f_bavail == leave_pages
    return filler


# -- 1. a read-only output folder ---------------------------------------------------------------------------------
@contextmanager
def read_only_folder(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody may write to: a read-only tmpfs for root (root ignores permission bits), chmod 555 otherwise."""
    ro = tmp_path / "ro"
    if os.geteuid() == 0:
        with tmpfs(ro, "ro,size=1m"):
            yield ro
    else:
        ro.mkdir()
        ro.chmod(0o555)
        try:
            yield ro
        finally:
            ro.chmod(0o755)


def test_read_only_output_folder_ends_every_command_before_the_run_with_one_line(small, reference, tiny_weights, tmp_path):
    ok = tmp_path / "ok"
    ok.mkdir()
    with read_only_folder(tmp_path) as ro:
        reason = "read-only file system (EROFS)" if os.geteuid() == 0 else "permission denied (EACCES)"
        cases = [
            (["diagnose", small, "--out", ro / "report.csv"], ro / "report.csv", "--out"),
            (["diagnose", small, "--out", ok / "r.csv", "--json", ro / "r.json"], ro / "r.json", "--json"),
            (["diagnose", small, "--out", ok / "r.csv", "--html", ro / "r.html"], ro / "r.html", "--html"),
            (["diagnose", small, "--out", ok / "r.csv", "--crops-dir", ro / "crops"], ro / "crops", "--crops-dir"),
            (["diagnose", small, "--out", ok / "r.csv", "--journal", ro / "j.jsonl"], ro / "j.jsonl", "--journal"),
            (["detect", small, "--out", ro / "d.csv"], ro / "d.csv", "--out"),
            (["detect", small, "--out", ok / "d.csv", "--crops", ro / "crops"], ro / "crops", "--crops"),
            (["embed", small, "--out", ro / "c.npz"], ro / "c.npz", "--out"),
            (["stress-test", small, "--out", ro / "s.csv"], ro / "s.csv", "--out"),
            (["merge", reference / "r.journal.jsonl", "--out", ro / "m.csv"], ro / "m.csv", "--out"),
        ]
        for args, named, flag in cases:
            extra = () if args[0] == "merge" else ("--weights", tiny_weights, *FAST)
            start = time.monotonic()
            p = allmil(*args, *extra)
            assert p.returncode == 4, (args, p.stderr)
            line = one_error_line(p.stderr)
            assert f"cannot write {named}: {reason}; " in line and f"choose another {flag} folder" in line, line
            assert time.monotonic() - start < 30  # ended before any analysis (no model was loaded)
            assert list(ro.iterdir()) == []
        assert [p.name for p in ok.iterdir()] == []  # the writable outputs' checks left nothing behind (no probe file)


def test_stdout_outputs_are_not_checked(small, tiny_weights, tmp_path, monkeypatch):
    import allmil_cli.cli.outputs as cli_outputs

    probed: list[Path] = []
    real = cli_outputs.probe
    monkeypatch.setattr(cli_outputs, "probe", lambda path, folder=None: (probed.append(Path(path)), real(path, folder))[1])
    r = invoke("diagnose", small, "--out", "-", "--json", tmp_path / "r.json", "--weights", tiny_weights, *FAST)
    assert r.exit_code in (0, 1) and r.output.startswith("patient,status,call")
    assert probed == [tmp_path / "r.json", tmp_path / "r.journal.jsonl"]


# -- 1b/2. EACCES and EROFS raised at the write calls themselves (always run) --------------------------------------
def test_permission_denied_found_by_the_check_exits_4_before_the_run(small, tiny_weights, tmp_path, monkeypatch):
    real = tempfile.mkstemp

    def denied(*args, **kwargs):
        if Path(kwargs.get("dir") or ".") == tmp_path:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", denied)
    r = invoke("diagnose", small, "--out", tmp_path / "report.csv", "--weights", tiny_weights, *FAST)
    assert r.exit_code == 4
    line = one_error_line(r.output)
    assert f"cannot write {tmp_path / 'report.csv'}: permission denied (EACCES); make {tmp_path} writable" in line
    assert "--resume" not in line and list(tmp_path.iterdir()) == []  # nothing ran, nothing written


def test_read_only_at_the_report_write_after_the_run_exits_4_and_keeps_the_journal(small, reference, tiny_weights, tmp_path,
                                                                                    monkeypatch):
    real = tempfile.mkstemp

    def read_only_json(*args, **kwargs):
        if str(kwargs.get("prefix", "")).startswith(".r.json.") and kwargs.get("suffix") == ".tmp":  # atomic_write's
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only_json)
    r = invoke("diagnose", small, "--out", tmp_path / "r.csv", "--json", tmp_path / "r.json", "--weights", tiny_weights, *FAST)
    assert r.exit_code == 4
    line = one_error_line(r.output)
    assert f"cannot write {tmp_path / 'r.json'}: read-only file system (EROFS); choose another --json folder" in line
    assert "rerun with --resume" in line
    assert len(read_journal(tmp_path / "r.journal.jsonl").patients) == 3 and not (tmp_path / "r.json").exists()
    assert stray_files(tmp_path) == []


# -- 2. a full disk -------------------------------------------------------------------------------------------------
def journal_sizes(journal: Path) -> list[int]:
    """Bytes of the journal after its header and plan, then after each patient line."""
    lines = journal.read_bytes().splitlines(keepends=True)
    sizes = [len(lines[0]) + len(lines[1])]
    for line in lines[2:]:
        sizes.append(sizes[-1] + len(line))
    return sizes


def test_disk_full_during_the_run_keeps_the_finished_patients_and_resume_finishes(small, reference, tiny_weights, tmp_path):
    sizes, margin = journal_sizes(reference / "r.journal.jsonl"), 32  # margin: the plan line's pid may be longer
    page = os.statvfs(tmp_path).f_frsize
    # the first k such that k patients fit in whole pages and the next one does not
    k = next(k for k in range(1, len(sizes) - 1)
             if sizes[k] + margin <= math.ceil(sizes[k] / page) * page < sizes[k + 1] - margin)
    args = ("diagnose", small, "--out", tmp_path / "full" / "r.csv", "--json", tmp_path / "full" / "r.json",
            "--weights", tiny_weights, *FAST)
    with tmpfs(tmp_path / "full", "size=64k") as full:
        filler = fill(full, math.ceil(sizes[k] / page))
        p = allmil(*args)
        assert p.returncode == 4, p.stderr
        line = one_error_line(p.stderr)
        journal = full / "r.journal.jsonl"
        assert f"cannot write {journal}: no space left on device (ENOSPC); free space on that disk" in line
        assert "rerun with --resume" in line
        assert journal.read_bytes().endswith(b"\n")  # the line that did not fit was cut back off
        kept = read_journal(journal)
        assert len(kept.patients) == k and kept.dropped == 0
        assert stray_files(full) == [] and not (full / "r.csv").exists()
        filler.unlink()
        p = allmil(*args[:-1], "--resume")
        assert p.returncode in (0, 1), p.stderr
        assert f"resumed {k} of 3 patient(s)" in p.stderr
        assert (full / "r.csv").read_bytes() == (reference / "r.csv").read_bytes()


def test_disk_full_at_the_json_report_leaves_no_temp_file(small, reference, tiny_weights, tmp_path):
    page = os.statvfs(tmp_path).f_frsize
    journal_pages = math.ceil((journal_sizes(reference / "r.journal.jsonl")[-1] + 32) / page)
    csv_pages = math.ceil((reference / "r.csv").stat().st_size / page)
    args = ("diagnose", small, "--out", tmp_path / "full" / "r.csv", "--json", tmp_path / "full" / "r.json",
            "--weights", tiny_weights, *FAST)
    with tmpfs(tmp_path / "full", "size=64k") as full:
        filler = fill(full, journal_pages + csv_pages)
        p = allmil(*args)
        assert p.returncode == 4, p.stderr
        line = one_error_line(p.stderr)
        assert f"cannot write {full / 'r.json'}: no space left on device (ENOSPC)" in line and "--json" in line
        assert stray_files(full) == [] and not (full / "r.json").exists()
        assert len(read_journal(full / "r.journal.jsonl").patients) == 3
        filler.unlink()
        p = allmil(*args[:-1], "--resume")
        assert p.returncode in (0, 1) and "resumed 3 of 3" in p.stderr, p.stderr
        assert (full / "r.json").exists()


def test_disk_full_at_a_journal_line_cuts_it_off_and_resume_goes_on(small, reference, tiny_weights, tmp_path, monkeypatch):
    """ENOSPC raised half-way through writing the second patient's line (always runs, no mount needed)."""
    import allmil_cli.io.journal as journal_mod

    real, calls = journal_mod.write_all, []

    def fills_up(fd: int, data: bytes) -> None:
        calls.append(len(data))
        if len(calls) == 3:  # header + plan, patient 1, then patient 2: half of it fits
            os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(journal_mod, "write_all", fills_up)
    args = ("diagnose", small, "--out", tmp_path / "r.csv", "--weights", tiny_weights, *FAST)
    r = invoke(*args)
    assert r.exit_code == 4
    journal = tmp_path / "r.journal.jsonl"
    assert f"cannot write {journal}: no space left on device (ENOSPC)" in one_error_line(r.output)
    assert journal.read_bytes().endswith(b"\n") and read_journal(journal).dropped == 0
    assert len(read_journal(journal).patients) == 1
    monkeypatch.setattr(journal_mod, "write_all", real)
    r = invoke(*args[:-1], "--resume")
    assert r.exit_code in (0, 1) and "resumed 1 of 3" in r.output, r.output
    assert (tmp_path / "r.csv").read_bytes() == (reference / "r.csv").read_bytes()


def test_a_torn_line_left_by_a_failed_append_is_dropped_on_resume(reference, tmp_path, monkeypatch):
    """When even cutting the failed line off fails, the part left has no newline and resume drops it."""
    import allmil_cli.io.journal as journal_mod

    src = read_journal(reference / "r.journal.jsonl")
    fp, results = src.header["fingerprint"], src.results
    path = tmp_path / "j.jsonl"
    with Journal.create(path, fp, src.header["meta"], 3) as j:
        j.append(results[0], "a")

        def torn(fd: int, data: bytes) -> None:
            os.write(fd, data[:100])
            raise OSError(errno.EDQUOT, "Disk quota exceeded")

        monkeypatch.setattr(journal_mod, "write_all", torn)
        monkeypatch.setattr(journal_mod.os, "ftruncate", lambda fd, n: (_ for _ in ()).throw(OSError(errno.EIO, "I/O")))
        with pytest.raises(journal_mod.OutputError, match=r"disk quota exceeded \(EDQUOT\)"):
            j.append(results[1], "b")
    monkeypatch.undo()
    c = read_journal(path)
    assert c.dropped == 1 and list(c.patients) == [results[0].patient]
    j, c = Journal.resume(path, fp, 3)
    j.close()
    assert path.read_bytes().endswith(b"\n") and read_journal(path).dropped == 0 and len(c.patients) == 1


# -- 3. one run per journal -----------------------------------------------------------------------------------------
def started(proc: subprocess.Popen, journal: Path) -> None:
    """Wait until ``proc`` has written its journal's header (it holds the lock), then stop it there (SIGSTOP)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if journal.exists() and journal.stat().st_size > 0:
            proc.send_signal(signal.SIGSTOP)
            return
        time.sleep(0.005)
    raise AssertionError(f"the first run never started its journal: {proc.communicate()}")


def test_a_second_run_on_a_journal_in_use_is_refused_and_a_killed_run_releases_it(cohort, tiny_weights, tmp_path):
    out, journal = tmp_path / "r.csv", tmp_path / "r.journal.jsonl"
    args = ("diagnose", cohort, "--out", out, "--weights", tiny_weights, *FAST)
    first = allmil(*args, wait=False)
    try:
        started(first, journal)
        before = journal.read_bytes()
        for extra in ((), ("--resume",)):
            p = allmil(*args, *extra)
            assert p.returncode == 2, p.stderr
            line = one_error_line(p.stderr)
            assert f"{journal}: another allmil run (pid {first.pid} on this host" in line, line
        assert journal.read_bytes() == before  # the second run touched nothing
        first.kill()  # a killed run releases its lock (the kernel does)
        first.wait(timeout=30)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    done = len(read_journal(journal).patients)
    p = allmil(*args[:-1], "--resume")  # without --quiet: it says how many were resumed
    assert p.returncode in (0, 1), p.stderr
    assert f"resumed {done} of 12" in p.stderr and len(read_journal(journal).patients) == 12


def test_the_lock_names_the_holder_and_is_released_when_the_run_ends(reference, small, tiny_weights, tmp_path):
    shutil.copy(reference / "r.journal.jsonl", tmp_path / "r.journal.jsonl")
    args = ("diagnose", small, "--out", tmp_path / "r.csv", "--weights", tiny_weights, "--workers", "1", "--resume")
    with journal_lock.hold(tmp_path / "r.journal.jsonl"):  # the helper the CLI uses, held by this process
        p = allmil(*args)
        assert p.returncode == 2 and f"pid {os.getpid()} on this host" in one_error_line(p.stderr)
    p = allmil(*args)
    assert p.returncode in (0, 1) and "resumed 3 of 3" in p.stderr, p.stderr


def test_shards_with_their_own_journals_run_side_by_side(cohort, tiny_weights, tmp_path):
    def shard(i: int) -> tuple[str, ...]:
        return ("diagnose", cohort, "--out", tmp_path / f"s{i}.csv", "--shard", f"{i}/2", "--weights", tiny_weights, *FAST)

    first = allmil(*shard(1), wait=False)
    try:
        started(first, tmp_path / "s1.journal.jsonl")  # shard 1 holds its journal...
        p = allmil(*shard(2))  # ...while shard 2 runs to the end
        assert p.returncode in (0, 1), p.stderr
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=120) in (0, 1), first.communicate()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    p = allmil("merge", tmp_path / "s1.csv", tmp_path / "s2.csv", "--out", tmp_path / "all.csv", "--quiet")
    assert p.returncode in (0, 1), p.stderr
    assert len((tmp_path / "all.csv").read_text().splitlines()) == 13


def test_without_proc_locks_the_message_names_the_run_its_plan_line_records(reference, tmp_path, monkeypatch):
    journal = tmp_path / "r.journal.jsonl"
    shutil.copy(reference / "r.journal.jsonl", journal)
    assert read_journal(journal).n_planned == 3  # the reference ran in this process: its plan records this pid
    monkeypatch.setattr(journal_lock, "_lock_owner", lambda path: None)  # e.g. a network file system
    with journal_lock.hold(journal):
        with pytest.raises(journal_lock.JournalBusy) as busy:
            journal_lock.lock(journal, create=False)  # a second lock, even from this process, is refused
    assert f"(pid {os.getpid()} on host {os.uname().nodename}, as its journal records)" in str(busy.value)
    assert str(journal) in str(busy.value)
    os.close(journal_lock.lock(journal, create=False))  # released when the holder is done
