"""``allmil train all``: rebuild every shipped model and every reported number, in order.

1. detector: cache, 5-fold models + held-out recall, threshold, final model, BCCD AP50
   (``python -m allmil_cli.train.detector all``, ~24 min); magnification: held-out detection across scales/colours;
2. idb2_map: where each ALL-IDB2 crop was cut from in ALL-IDB1 (~5 min);
3. inventory: the training cells; combine: protocol-2 fold models of the shipped recipe, bag rule, operating
   point (~25 min with a cold feature cache);
4. cells: embedder (frozen backbone + FC256) and LSTM aggregator on all data (~3 min); heldout: every fold model's
   scores of the cells it never saw (~8 min once the fold models exist); rule: the patient rule fitted on them and
   written into the aggregator (``allmil_cli.train.rule``); quantize: int8 copies for the CPU (~2 min);
5. evaluate: protocols 1 and 2, stress test (``python -m allmil_cli.train.evaluate all``, ~5 min);
6. protocol3: cross-domain protocol for the shipped recipe and its PBC-free twin (leave-source-out), ~30 min;
   protocol4: composition and scale (seconds); site_protocol: lab calibration under protocol 3's shifts (seconds);
   int8_check: protocol 3 with the fold models' int8 copies against the float ones (``variant_check int8``, ~25 min);
7. ``weights/manifest.json`` (sha256 of each model).
``--ablations`` adds the section-5 ablations and the v1 baseline of protocol 3 (~1 h more).

Each step runs in its own Python process, so a failure names its step. ``--skip`` leaves steps out.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STEPS = {
    "detector": ["-m", "allmil_cli.train.detector", "all"],
    "magnification": ["-m", "allmil_cli.train.magnification", "--stains"],
    "idb2_map": ["-m", "allmil_cli.train.idb2_map"],
    "inventory": ["-m", "allmil_cli.train.cells", "inventory"],
    "combine": ["-m", "allmil_cli.train.evaluate", "combine"],
    "cells": ["-m", "allmil_cli.train.cells", "train"],
    "heldout": ["-m", "allmil_cli.train.heldout"],
    "rule": ["-m", "allmil_cli.train.rule"],
    "quantize": ["-m", "allmil_cli.train.quantize"],
    "evaluate": ["-m", "allmil_cli.train.evaluate", "all"],
    "protocol3": ["-m", "allmil_cli.train.protocol3", "all", "--recipes", "v2pbc", "v2"],
    "protocol4": ["-m", "allmil_cli.train.protocol4"],
    "site_protocol": ["-m", "allmil_cli.train.site_protocol"],
    "int8_check": ["-m", "allmil_cli.train.variant_check", "int8", "--shifts", "none", "res20+jpeg70", "res14+jpeg70",
                   "hue+20", "hed", "gamma1.5", "blur", "hed+res20"],
}
EXTRA = {
    "ablations": ["-m", "allmil_cli.train.evaluate", "ablations"],
    "protocol3_baseline": ["-m", "allmil_cli.train.protocol3", "all", "--recipes", "v1", "norm", "aug"],
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="allmil train all", description=__doc__.split("\n")[0])
    ap.add_argument("--skip", nargs="*", default=[], choices=sorted(STEPS), help="steps to leave out")
    ap.add_argument("--ablations", action="store_true", help="also the ablations and protocol 3 of the other recipes")
    a = ap.parse_args(argv)
    t0 = time.time()
    for name, args in {**STEPS, **(EXTRA if a.ablations else {})}.items():
        if name in a.skip:
            continue
        print(f"== {name}: {sys.executable} {' '.join(args)}", flush=True)
        t = time.time()
        code = subprocess.call([sys.executable, *args], cwd=REPO)
        if code != 0:
            print(f"step {name} failed with exit code {code}", file=sys.stderr)
            return code
        print(f"== {name} done in {time.time() - t:.0f}s", flush=True)
    from allmil_cli.stages.models import write_manifest

    for model, digest in write_manifest(REPO / "weights").items():
        print(f"{digest}  {model}")
    print(f"all done in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
