#!/usr/bin/env python
"""Throughput of allmil's diagnose pipeline against the paper's architecture, and the decode floor.

One process, the same images for every engine (ALL-IDB1 fields and BCCD fields):

1. floor    - a full Pillow decode of each image to an RGB array (the least any tool must do);
2. allmil   - the library's Pipeline, each image its own patient, CSV + JSON report text built too,
              with the per-stage seconds of its StageTimer;
3. baseline - the paper-style PyTorch eager stack: Faster R-CNN ResNet50-FPN on the full field,
              AlexNet fc7 features of 10 crops of 224x224, LSTM(256) + FC (random weights: speed
              does not depend on them), on a subset (``--baseline-images``) because it is slow.

Optional: ``--scaling`` (aggregator/embedder cost vs cells per patient) and ``--memory`` (peak RSS vs
number of patients, each count in a fresh subprocess). A dated row per image set is appended to
``bench/RESULTS.md`` unless ``--no-record``. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from baseline import BASELINE_STAGES, Baseline, run_baseline
from common import (
    DEFAULT_DATA,
    SETS,
    Phase,
    cpu_model,
    decode_draft,
    decode_full,
    gpu_name,
    list_images,
    md_table,
    measured,
    mib,
    peak_rss_mib,
    version_of,
)

# importing common put this checkout first on sys.path: allmil_cli below is this tree's
from allmil_cli import __version__ as ALLMIL_VERSION
from allmil_cli.stages.crops import crop_cells
from allmil_cli.types.field import Patient
from allmil_cli.stages.models import Models, default_weights_dir, load_models
from allmil_cli.types.results import Options, PatientResult, StageTimer
from allmil_cli.pipeline.runner import Pipeline
from allmil_cli.io.report import csv_text, report_json

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
ALLMIL_STAGES = ("decode", "scale", "detect", "crop", "embed", "aggregate", "report")


# ---- 1. the decode floor (the decoders are in common.py) --------------------------------------
def run_floor(paths: list[Path], decoder: Callable[[Path], np.ndarray], name: str) -> Phase:
    decoder(paths[0])  # warm-up
    phase = Phase(name)
    with measured(phase):
        for p in paths:
            t = time.perf_counter()
            decoder(p)
            dt = time.perf_counter() - t
            phase.per_field_s.append(dt)
            phase.per_path_s[p] = dt
    phase.stages = {"decode": phase.total_s}
    return phase


# ---- 2. allmil ----------------------------------------------------------------------------------
def patients_for(paths: list[Path], repeat_to: int | None = None) -> list[Patient]:
    """Each image its own patient (ALL-IDB1 style); ``repeat_to`` cycles the images to that many patients."""
    n = repeat_to or len(paths)
    return [Patient(name=f"{paths[i % len(paths)].stem}#{i}", folder=paths[i % len(paths)].parent, images=[paths[i % len(paths)]])
            for i in range(n)]


def build_reports(results: list[PatientResult], models: Models) -> tuple[str, str]:
    meta = {"tool": f"allmil {ALLMIL_VERSION}", "command": "bench", "execution_provider": models.provider}
    return csv_text(results), report_json(results, meta)


def run_allmil(models: Models, paths: list[Path], name: str, decode_workers: int = 1) -> Phase:
    Pipeline(models, Options()).diagnose_patient(patients_for(paths[:1])[0])  # warm-up on one image
    timer = StageTimer()
    pipeline = Pipeline(models, Options(decode_workers=decode_workers), timer=timer)
    phase = Phase(name)
    results: list[PatientResult] = []
    patients = patients_for(paths)
    with measured(phase):
        pipeline.prefetch(patients)  # as Pipeline.run / the CLI do: decode the next files in a thread
        for patient in patients:
            t = time.perf_counter()
            results.append(pipeline.diagnose_patient(patient))
            dt = time.perf_counter() - t
            phase.per_field_s.append(dt)
            phase.per_path_s[patient.images[0]] = dt
        pipeline.close()
        t = time.perf_counter()
        build_reports(results, models)
        timer.add("report", t)
    phase.cells = sum(r.n_cells for r in results)
    phase.stages = {s: timer.seconds.get(s, 0.0) for s in ALLMIL_STAGES}
    failed = [r for r in results if r.status == "failed"]
    if failed:
        print(f"  note: {len(failed)} patient(s) failed, e.g. {failed[0].reason}")
    return phase


# ---- 3. scaling with cells per patient ----------------------------------------------------------
def real_crops(pipeline: Pipeline, paths: list[Path], want: int = 64) -> np.ndarray:
    """Crops of detected cells from the first fields; topped up with a grid of crops if too few are found."""
    pool: list[np.ndarray] = []
    for p in paths[:4]:
        _, _, crops = pipeline.detect_patient(patients_for([p])[0], with_crops=True)
        pool.extend(c for c in crops if len(c))
        if sum(len(c) for c in pool) >= want:
            break
    have = sum(len(c) for c in pool)
    if have < want:
        rgb = decode_full(paths[0])
        h, w = rgb.shape[:2]
        k = int(np.ceil(np.sqrt(want - have)))
        centres = np.array([((i + 0.5) * w / k, (j + 0.5) * h / k) for i in range(k) for j in range(k)])
        pool.append(crop_cells(rgb, centres, 85.0))
    return np.concatenate(pool)[:want]


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def run_scaling(models: Models, paths: list[Path], counts: list[int]) -> str:
    pipeline = Pipeline(models, Options())
    pool = real_crops(pipeline, paths)
    emb, agg = pipeline.embedder, pipeline.aggregator
    emb.embed(pool[:8])  # warm-up
    rows = []
    for n in counts:
        crops = pool[np.arange(n) % len(pool)]
        repeats = 3 if n <= 100 else 1
        t_embed = best_of(lambda: emb.embed(crops, batch_size=32), repeats)
        feats = emb.embed(crops, batch_size=32)
        agg.patient_probability(feats, seed=0)  # warm-up for this shape
        t_prob = best_of(lambda: agg.patient_probability(feats, seed=0), 5)
        t_scores = best_of(lambda: agg.cell_scores(feats), 5)
        rows.append([n, t_embed * 1e3, t_embed * 1e3 / n, t_prob * 1e3, t_scores * 1e3, (t_prob + t_scores) * 1e3 / n])
    return md_table(["cells/patient", "embed ms", "embed ms/cell", "patient_probability ms", "cell_scores ms", "aggregate ms/cell"], rows)


# ---- 4. memory vs number of patients (one subprocess per count) -------------------------------
def memory_child(args: argparse.Namespace) -> None:
    # the 4 largest files, so every patient count sees the same biggest field and only the count varies
    paths = sorted(list_images(args.data, args.sets[0], args.images), key=lambda p: -p.stat().st_size)[:4]
    if args.device == "cuda":
        import onnxruntime as ort

        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()
    models = load_models(args.weights, device=args.device, threads=args.threads)
    pipeline = Pipeline(models, Options())
    pipeline.diagnose_patient(patients_for(paths[:1])[0])
    after_load = peak_rss_mib()
    t = time.perf_counter()
    results = [pipeline.diagnose_patient(p) for p in patients_for(paths, repeat_to=args.memory_child)]
    build_reports(results, models)
    print(json.dumps({"patients": args.memory_child, "peak_after_warmup_mib": after_load, "peak_mib": peak_rss_mib(),
                      "ru_maxrss_mib": mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss),
                      "seconds": time.perf_counter() - t}))


def run_memory(args: argparse.Namespace, counts: list[int]) -> str:
    rows = []
    for n in counts:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", str(n), "--data", str(args.data),
               "--weights", str(args.weights), "--threads", str(args.threads), "--device", args.device,
               "--sets", args.sets[0]] + (["--images", str(args.images)] if args.images else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"memory child for {n} patients failed:\n{proc.stderr[-2000:]}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append([n, r["peak_after_warmup_mib"], r["peak_mib"], r["peak_mib"] - r["peak_after_warmup_mib"], r["seconds"]])
    return md_table(["patients", "peak RSS after load+warm-up MiB", "peak RSS at end MiB", "growth MiB", "seconds"], rows)


# ---- output -------------------------------------------------------------------------------------
def stage_table(phases: list[Phase], stages: tuple[str, ...]) -> str:
    rows = []
    for ph in phases:
        tot = sum(ph.stages.values()) or float("nan")
        rows.append([ph.name, ph.n] + [f"{ph.stages.get(s, 0.0) / ph.n * 1e3:.1f} ({100 * ph.stages.get(s, 0.0) / tot:.0f}%)"
                                       for s in stages])
    return md_table(["engine / set", "fields"] + [f"{s} ms/field" for s in stages], rows)


def append_results(rows: list[list[Any]]) -> None:
    header = ["date (UTC)", "machine", "versions", "device/threads", "weights", "set", "fields allmil/baseline",
              "floor ms/field", "allmil ms/field mean/p50/p95", "allmil fields/s", "allmil cells/s", "baseline ms/field",
              "speedup vs baseline", "allmil/floor", "peak RSS MiB floor/allmil/baseline", "note"]
    table = md_table(header, rows)
    if not RESULTS.exists():
        RESULTS.write_text("# allmil benchmark results\n\nRows appended by `bench/bench.py` (see bench/README.md).\n\n"
                           + table + "\n")
    else:
        with RESULTS.open("a") as f:
            f.write("\n".join(table.splitlines()[2:]) + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder holding ALL-IDB1/im and BCCD/JPEGImages")
    ap.add_argument("--weights", type=Path, default=None, help="ONNX weights folder (default: the shipped weights)")
    ap.add_argument("--tiny-weights", action="store_true", help="use the tiny test models (smoke runs only; marked in RESULTS)")
    ap.add_argument("--sets", type=lambda s: [x.strip().lower() for x in s.split(",")], default=list(SETS),
                    help="comma list of image sets: all-idb1,bccd (default both)")
    ap.add_argument("--images", type=int, default=None, help="first N images of each set (default: all)")
    ap.add_argument("--baseline-images", type=int, default=5, help="first N of those for the slow baseline (0 = skip)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch and onnxruntime intra-op threads")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--decode-workers", type=int, default=1, help="allmil decode look-ahead threads (raise on a GPU machine)")
    ap.add_argument("--scaling", action="store_true", help="also time embed/aggregate vs cells per patient")
    ap.add_argument("--scaling-cells", default="1,10,100,1000")
    ap.add_argument("--memory", action="store_true", help="also measure peak RSS vs number of patients (subprocesses)")
    ap.add_argument("--memory-patients", default="1,4,16,64")
    ap.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    ap.add_argument("--note", default="", help="free text for the RESULTS.md row")
    ap.add_argument("--memory-child", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    unknown = [s for s in args.sets if s not in SETS]
    if unknown:
        ap.error(f"--sets: unknown {unknown}; use {','.join(SETS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    tmp: tempfile.TemporaryDirectory[str] | None = None
    if args.tiny_weights:
        from tests.onnx_fixtures import make_weights

        tmp = tempfile.TemporaryDirectory(prefix="allmil-bench-")
        args.weights = make_weights(Path(tmp.name))
    args.weights = Path(args.weights or default_weights_dir()).resolve()
    if args.memory_child:
        memory_child(args)
        return
    if args.device == "cuda" and args.baseline_images > 0:
        import torch  # noqa: F401 - loads the CUDA libraries before onnxruntime looks for them

    import onnxruntime as ort

    if args.device == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise SystemExit("--device cuda: onnxruntime here has no CUDAExecutionProvider; install onnxruntime-gpu (bench/README.md).")
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* pip packages, when they are there

    images = {k: list_images(args.data, k, args.images) for k in args.sets}
    for ps in images.values():  # warm the page cache so no engine pays the first disk read
        for p in ps:
            p.read_bytes()
    t = time.perf_counter()
    models = load_models(args.weights, device=args.device, threads=args.threads)
    load_s = time.perf_counter() - t
    if args.device == "cuda" and models.provider != "CUDAExecutionProvider":
        raise SystemExit(f"--device cuda: the sessions fell back to {models.provider}; check the CUDA/cuDNN libraries.")
    tiny = models.metadata("embedder").get("allmil.backbone") == "tiny"
    torch_v = version_of("torch")
    machine = f"{cpu_model()}, {os.cpu_count()} cores"
    print(f"allmil {ALLMIL_VERSION} | onnxruntime {ort.__version__} ({models.provider}) | torch {torch_v} | "
          f"{platform.python_implementation()} {platform.python_version()}")
    print(f"machine: {machine} | device {args.device} | threads {args.threads}")
    print(f"weights: {args.weights}{'  (TINY TEST MODELS: timings say nothing about the real networks)' if tiny else ''}")
    print(f"models loaded (sha256 check + 3 sessions) in {load_s:.2f} s")
    print("reduced-size decode used by the pipeline: none (every field is fully decoded once; "
          "the 'draft 1/4' row is a reference for what JPEG DCT scaling would cost)")

    floor: dict[str, Phase] = {}
    draft: dict[str, Phase] = {}
    ours: dict[str, Phase] = {}
    base: dict[str, Phase] = {}
    for key, paths in images.items():
        label = SETS[key][0]
        print(f"\n== {label}: {len(paths)} image(s) ==")
        floor[key] = run_floor(paths, decode_full, f"floor (full decode) {label}")
        draft[key] = run_floor(paths, decode_draft, f"draft 1/4 decode {label}")
        ours[key] = run_allmil(models, paths, f"allmil {label}", args.decode_workers)
        print(f"  floor {floor[key].ms():.1f} ms/field, allmil {ours[key].ms():.1f} ms/field")
    baseline = None
    if args.baseline_images > 0:
        import torch

        torch.set_num_threads(args.threads)
        baseline = Baseline(args.device)
        for key, paths in images.items():
            sub = paths[: args.baseline_images]
            label = SETS[key][0]
            print(f"\n== baseline {label}: first {len(sub)} of {len(paths)} image(s) (it is slow; --baseline-images) ==")
            base[key] = run_baseline(baseline, sub, f"baseline {label}")
            print(f"  baseline {base[key].ms():.1f} ms/field")

    print("\n## Throughput\n")
    rows = []
    for key in images:
        for ph in (floor[key], draft[key], ours[key], base.get(key)):
            if ph is None:
                continue
            rows.append([ph.name, ph.n, ph.ms(), ph.ms(50), ph.ms(95), ph.fields_per_s(), ph.cells_per_s() if ph.cells else "",
                         ph.rss_start_mib, ph.rss_peak_mib])
    print(md_table(["engine / set", "fields", "ms/field mean", "p50", "p95", "fields/s", "cells/s", "RSS at start MiB",
                    "peak RSS MiB"], rows))
    print("\nPeak RSS is per phase (VmHWM reset before each phase; it includes what earlier phases left loaded,"
          " e.g. the ONNX sessions during the baseline).")
    print("\n## Where the time goes (ms per field, share of the engine's total)\n")
    print(stage_table([ours[k] for k in images], ALLMIL_STAGES))
    if base:
        print()
        print(stage_table([base[k] for k in base], BASELINE_STAGES))

    print("\n## Ratios\n")
    ratio_rows = []
    record_rows = []
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M")
    versions = f"allmil {ALLMIL_VERSION}, ort {ort.__version__}, torch {torch_v}"
    device = f"{args.device} ({models.provider})" if args.device == "cpu" else f"{args.device}: {gpu_name()}"
    for key in images:
        label = SETS[key][0]
        o, fl = ours[key], floor[key]
        b = base.get(key)
        if b:
            same = [o.per_path_s[p] for p in b.per_path_s]
            speedup = b.ms() / (float(np.mean(same)) * 1e3)
        else:
            speedup = float("nan")
        vs_floor = o.ms() / fl.ms()
        ratio_rows.append([label, speedup, vs_floor, o.fields_per_s()])
        record_rows.append([
            date, machine, versions, f"{device}/{args.threads}", "tiny test models" if tiny else args.weights.name,
            label, f"{o.n}/{b.n if b else 0}", fl.ms(), f"{o.ms():.1f}/{o.ms(50):.1f}/{o.ms(95):.1f}", o.fields_per_s(),
            o.cells_per_s(), b.ms() if b else float("nan"), speedup, vs_floor,
            f"{fl.rss_peak_mib:.0f}/{o.rss_peak_mib:.0f}/{b.rss_peak_mib:.0f}" if b else f"{fl.rss_peak_mib:.0f}/{o.rss_peak_mib:.0f}/-",
            args.note,
        ])
    print(md_table(["set", "speedup allmil vs baseline (same images)", "allmil / full-decode floor", "allmil fields/s"],
                   ratio_rows))
    print("\nTargets: >= 20x faster than the baseline per field (CPU); within 3x of the full-decode floor; "
          ">= 100 ALL-IDB1 fields/s end to end on a GPU.")
    if any(base[k].n < ours[k].n for k in base):
        print(f"Note: the baseline ran on the first {args.baseline_images} image(s) of each set only; "
              "the speedup compares allmil's times on those same images.")

    if args.scaling:
        key = "all-idb1" if "all-idb1" in images else next(iter(images))
        print("\n## Scaling with cells per patient (real crops, embedded once, tiled to N; best of repeats)\n")
        print(run_scaling(models, images[key], [int(x) for x in args.scaling_cells.split(",")]))
    if args.memory:
        print("\n## Peak RSS vs patients (each count in a fresh process; patients cycle the 4 largest images of the first set)\n")
        print(run_memory(args, [int(x) for x in args.memory_patients.split(",")]))

    if not args.no_record:
        append_results(record_rows)
        print(f"\nappended {len(record_rows)} row(s) to {RESULTS}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
