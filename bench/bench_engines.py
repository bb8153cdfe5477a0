"""Ray engine overhead vs the local engine: ``allmil diagnose`` as a whole process on N one-field patients.

Runs, side by side in one session and on the same patients (a temporary folder of N patient folders, each
holding one field linked from the data set; nothing is copied):

- ``local``: ``allmil diagnose DIR --engine local`` (this process's pipeline; default workers);
- ``ray (own cluster)``: ``--engine ray``: the CLI starts a local Ray cluster, runs, and stops it;
- ``ray (join)``: ``--engine ray --ray-address ADDR``: the CLI joins a cluster this script started
  beforehand (what a site with a standing cluster sees).

Each is a fresh process timed wall-clock from start to exit (model loading, cluster start or join,
actor start, reports), repeated ``--repeats`` times in alternation; the best run of each is reported,
with overhead = ray / local - 1. The reports of all engines are checked to be byte-identical.
Appends one row per engine to the "Engines" table of bench/RESULTS.md (unless --no-record).

    flock /tmp/allmil-heavy.lock .venv/bin/python bench/bench_engines.py --patients 60
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
SECTION = "## Engines: Ray vs local (bench/bench_engines.py)"
HEADER = ("| date (UTC) | machine | versions | set | patients x fields | engine | workers | wall s (best of n) | "
          "patients/s | vs local | note |\n|---|---|---|---|---|---|---|---|---|---|---|\n")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip().split(" ")[0] + " " + line.split(":", 1)[1].strip().split(" ")[1]
    except OSError:
        pass
    return platform.processor() or "cpu"


def pick_fields(data: Path, n: int) -> tuple[str, list[Path]]:
    idb = sorted((data / "ALL-IDB1" / "im").glob("*.jpg"))
    if idb:
        return "ALL-IDB1", [idb[i % len(idb)] for i in range(n)]
    examples = sorted((ROOT / "examples" / "patients").rglob("*.jpg"))
    return "BCCD examples (ALL-IDB1 absent)", [examples[i % len(examples)] for i in range(n)]


def record(rows: list[str]) -> None:
    """Add rows to this script's own table, which sits above bench.py's (bench.py appends at the file's end)."""
    text = RESULTS.read_text() if RESULTS.exists() else "# allmil benchmark results\n"
    lines = text.splitlines(keepends=True)
    if SECTION + "\n" not in lines:
        block = (f"{SECTION}\n\nWhole `allmil diagnose` processes, wall clock, best of n (see bench/README.md). "
                 "Target: ray <= +20 % vs local on 60 one-field patients, 2 cores.\n\n" + HEADER + "\n")
        first_table = next((i for i, line in enumerate(lines) if line.startswith("|") or line.startswith("Rows appended by")),
                           len(lines))
        lines[first_table:first_table] = [block]
        lines = "".join(lines).splitlines(keepends=True)
    i = lines.index(SECTION + "\n") + 1
    while i < len(lines) and not lines[i].startswith("|"):
        i += 1
    while i < len(lines) and lines[i].startswith("|"):
        i += 1
    lines[i:i] = rows
    RESULTS.write_text("".join(lines))


def timed(cmd: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode not in (0, 1):
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    return wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--patients", type=int, default=60)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="Ray actors (and the cluster's CPUs)")
    ap.add_argument("--no-record", action="store_true")
    ap.add_argument("--note", default="")
    args = ap.parse_args(argv)

    import ray

    from allmil_cli import __version__

    set_name, fields = pick_fields(args.data, args.patients)
    with tempfile.TemporaryDirectory(prefix="allmil-bench-engines-") as tmp:
        root = Path(tmp) / "patients"
        for i, f in enumerate(fields):
            (root / f"patient_{i:03d}").mkdir(parents=True)
            os.symlink(f, root / f"patient_{i:03d}" / f.name)
        base = [sys.executable, "-m", "allmil_cli", "diagnose", str(root), "--quiet"]
        ray.init(num_cpus=args.workers, include_dashboard=False, object_store_memory=128 * 1024**2, logging_level="WARNING")
        address = ray.get_runtime_context().gcs_address
        # built after ray.init: it carries RAY_AUTH_MODE=token, which a driver joining by address needs
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(ROOT))
        engines = {
            "local": ["--engine", "local"],
            "ray (own cluster)": ["--engine", "ray", "--workers", str(args.workers)],
            "ray (join running cluster)": ["--engine", "ray", "--workers", str(args.workers), "--ray-address", address],
        }
        walls: dict[str, list[float]] = {k: [] for k in engines}
        try:
            for rep in range(args.repeats):
                for name, extra in engines.items():
                    out = Path(tmp) / f"{name.split()[0]}-{rep}"
                    walls[name].append(timed(base + ["--out", f"{out}.csv", "--json", f"{out}.json", *extra], env))
                    print(f"repeat {rep + 1}: {name:28s} {walls[name][-1]:7.2f} s", flush=True)
        finally:
            ray.shutdown()
        journal_kb = (Path(tmp) / "local-0.journal.jsonl").stat().st_size / 1024 / args.patients
        reference = (Path(tmp) / "local-0.csv").read_bytes()
        for name in engines:
            for rep in range(args.repeats):
                if (Path(tmp) / f"{name.split()[0]}-{rep}.csv").read_bytes() != reference:
                    raise SystemExit(f"{name} repeat {rep + 1}: report differs from the local engine's")
    best = {k: min(v) for k, v in walls.items()}
    print(f"\n{args.patients} one-field patients ({set_name}), best of {args.repeats}; reports identical across engines; "
          f"journal {journal_kb:.1f} kB per patient")
    note = "; ".join(x for x in (f"journal {journal_kb:.1f} kB/patient", args.note) if x)
    rows = []
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    machine = f"{cpu_name()}, {os.cpu_count()} cores"
    versions = f"allmil {__version__}, ray {ray.__version__}, python {platform.python_version()}"
    for name, wall in best.items():
        ratio = wall / best["local"]
        print(f"  {name:28s} {wall:7.2f} s  {args.patients / wall:6.2f} patients/s  x{ratio:.3f} vs local "
              f"({(ratio - 1) * 100:+.1f} %)")
        workers = "default" if name == "local" else str(args.workers)
        rows.append(f"| {stamp} | {machine} | {versions} | {set_name} | {args.patients} x 1 | {name} | {workers} | "
                    f"{wall:.2f} ({args.repeats}) | {args.patients / wall:.2f} | {(ratio - 1) * 100:+.1f} % | {note} |\n")
    if not args.no_record:
        record(rows)
        print(f"appended {len(rows)} rows to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
