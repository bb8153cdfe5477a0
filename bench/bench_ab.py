#!/usr/bin/env python
"""Two versions of allmil side by side: per-field decode + analysis, both at once, each pinned to its own core.

On a shared host whose speed drifts by up to 2x within minutes, runs made one after the other cannot resolve a
10-20 % change. Here both versions run at the same moment on the same fields (one process each, pinned with
``taskset`` to cores 0 and 1, one onnxruntime thread each), then again with the cores swapped; each reports
the best of ``--passes`` passes over the fields (``images.load_fields`` + ``Pipeline.analyse_field``, no
worker processes, no start-up).

    git worktree add /tmp/allmil-old <commit>
    python bench/bench_ab.py /tmp/allmil-old . --fields 24
    python bench/bench_ab.py . .:int8            # one tree, ``--precision`` fp32 against int8 (TREE:PRECISION)

Linux only (``taskset``); needs 2 cores. Prints ms/field per version and round, and each version's ms/field per stage
(its last round); records nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import DEFAULT_DATA, first_fields  # noqa: E402

_CHILD = r"""
import sys, time
tree, folder, n, passes, precision = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
sys.path.insert(0, tree)
from pathlib import Path
try:  # the layer folders (0.2.1 and later)
    from allmil_cli.pipeline import Pipeline
    from allmil_cli.stages import images
    from allmil_cli.stages.models import load_models
    from allmil_cli.types.results import Options
except ImportError:  # the flat package of earlier versions
    from allmil_cli import images
    from allmil_cli.models import load_models
    from allmil_cli.pipeline import Options, Pipeline
load_fields = images.load_fields
if hasattr(images, "keep_freed_buffers"):  # absent in older versions
    images.keep_freed_buffers()
paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))[:n]
pipe = Pipeline(load_models(None, device="cpu", threads=1, **({"precision": precision} if precision else {})), Options())
pipe.analyse_field(load_fields(paths[0])[0][0])  # warm-up
best = float("inf")
for _ in range(passes):
    pipe.timer.seconds.clear()
    t = time.perf_counter()
    for p in paths:
        pipe.analyse_field(load_fields(p)[0][0])
    best = min(best, (time.perf_counter() - t) / len(paths))
print(" ".join(f"{k}={v / len(paths) * 1e3:.1f}" for k, v in pipe.timer.seconds.items()))
print(f"{best * 1e3:.1f}")
"""


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", help="source tree of version A (a git worktree), optionally :PRECISION (fp32 or int8)")
    ap.add_argument("b", help="source tree of version B, optionally :PRECISION")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--fields", type=int, default=24, help="first N 2592x1944 ALL-IDB1 fields")
    ap.add_argument("--passes", type=int, default=3)
    args = ap.parse_args(argv)
    import tempfile

    fields = first_fields(args.data, args.fields)
    with tempfile.TemporaryDirectory(prefix="allmil-ab-") as tmp:
        for p in fields:
            (Path(tmp) / p.name).symlink_to(p)
        if args.a == args.b:
            raise SystemExit("A and B are the same version")
        results: dict[str, list[float]] = {args.a: [], args.b: []}
        stages: dict[str, str] = {}
        for cores in ((0, 1), (1, 0)):
            procs = {}
            for version, core in zip(results, cores):
                tree, _, precision = version.partition(":")
                procs[version] = subprocess.Popen(["taskset", "-c", str(core), sys.executable, "-c", _CHILD, str(Path(tree).resolve()),
                                                   tmp, str(args.fields), str(args.passes), precision], stdout=subprocess.PIPE, text=True)
            for version, proc in procs.items():
                out, _ = proc.communicate()
                if proc.returncode:
                    raise SystemExit(f"{version}: the run failed ({proc.returncode})")
                lines = out.strip().splitlines()
                results[version].append(float(lines[-1]))
                stages[version] = lines[-2]
    (ta, ra), (tb, rb) = results.items()
    for version, r in results.items():
        print(f"{version}: {' / '.join(f'{v:.1f}' for v in r)} ms/field (two rounds, cores swapped); ms/field by stage: "
              f"{stages[version]}")
    print(f"B vs A: {sum(rb) / sum(ra):.3f}x the time per field ({ta} -> {tb})")


if __name__ == "__main__":
    main()
