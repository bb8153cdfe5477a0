#!/usr/bin/env python
"""Cost of each embedder of the ablation (``allmil_cli.train.embedder_ablation.VARIANTS``): its ONNX export at its input
size, one crop per call (as the product runs it on the CPU), one onnxruntime thread, this process pinned to one core.

All variants run in one process, alternated: each round times ``--crops`` calls of every variant in turn (the order
rotates every round); the host's speed drifts, so the per-round ratio to ``in224`` (the shipped embedder's shape)
compares neighbours in time, and the median round counts. The cost does not depend on the weights: the FC256 head
is untrained here (same shapes as a trained one). Multiply-adds are counted on the exported graph (every Conv,
Gemm and MatMul, at N = 1).

    flock /tmp/allmil-heavy.lock .venv/bin/python bench/bench_embedder.py

Writes ``.cache/protocol4/embedder_cost.json`` (read by ``embedder_ablation summary``); records nothing else.
Linux only (``os.sched_setaffinity``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import REPO, cpu_model, version_of  # noqa: E402

import numpy as np  # noqa: E402

CELLS_PER_FIELD = 12.4


def export(name: str, out: Path) -> Path:
    import torch

    from allmil_cli.train.backbones import feature_dim
    from allmil_cli.train.embedder_ablation import variant
    from allmil_cli.train.export import export_onnx
    from allmil_cli.train.mil import make_modules

    backbone, size = variant(name)
    torch.manual_seed(0)
    head, agg = make_modules(feature_dim(backbone))
    emb, _ = export_onnx(backbone, head.eval(), agg.eval(), out / name, 0.5, 0.5, "max", input_size=size)
    return emb


def mult_adds(path: Path, size: int) -> float:
    """Multiply-adds of one crop (N = 1) over Conv, Gemm and MatMul nodes; tensor shapes from one onnxruntime run with
    every such node's inputs and outputs exposed (static shape inference stops at EfficientNet's dynamic padding)."""
    import onnx
    import onnxruntime as ort

    m = onnx.load(str(path))
    init = {t.name: list(t.dims) for t in m.graph.initializer}
    nodes = [n for n in m.graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    names = {x for n in nodes for x in (n.input[0], n.output[0]) if x not in init}
    have = {o.name for o in m.graph.output}
    for x in sorted(names - have):
        m.graph.output.append(onnx.helper.make_empty_tensor_value_info(x))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    outs = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"crops": np.zeros((1, 3, size, size), np.float32)})))
    shape = {**{k: list(v.shape) for k, v in outs.items()}, **init}
    total = 0.0
    for n in nodes:
        if n.op_type == "Conv":
            w, y = shape[n.input[1]], shape[n.output[0]]
            total += float(np.prod(y)) * w[1] * float(np.prod(w[2:]))  # out elements x (Cin/groups) x k x k
        else:  # out elements x the reduced dimension
            a = shape[n.input[0]]
            total += float(np.prod(shape[n.output[0]])) * a[-1]
    return total


def main(argv: list[str] | None = None) -> None:
    from allmil_cli.train.embedder_ablation import BASELINE, VARIANTS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--crops", type=int, default=60, help="calls (one crop each) per variant and round")
    ap.add_argument("--core", type=int, default=0)
    ap.add_argument("--out", type=Path, default=REPO / ".cache" / "protocol4" / "embedder_cost.json")
    args = ap.parse_args(argv)
    import onnxruntime as ort

    os.sched_setaffinity(0, {args.core})
    names = [BASELINE] + [v for v in args.variants if v != BASELINE]
    sessions, inputs, info = {}, {}, {}
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="allmil-embcost-") as tmp:
        for name in names:
            size = VARIANTS[name][1]
            path = export(name, Path(tmp))
            info[name] = {"backbone": VARIANTS[name][0], "input": size, "mmac": mult_adds(path, size) / 1e6,
                          "onnx_mb": path.stat().st_size / 1e6}
            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            so.intra_op_num_threads = 1
            so.log_severity_level = 3
            sessions[name] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            inputs[name] = [rng.integers(0, 256, (1, 3, size, size)).astype(np.float32) for _ in range(8)]
            for x in inputs[name]:  # warm-up
                sessions[name].run(None, {"crops": x})
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            s, xs = sessions[name], inputs[name]
            t = time.perf_counter()
            for i in range(args.crops):
                s.run(None, {"crops": xs[i % len(xs)]})
            times[name].append((time.perf_counter() - t) / args.crops * 1e3)
        print(f"round {r}: " + ", ".join(f"{n} {times[n][-1]:.2f}" for n in names) + " ms/crop", flush=True)
    base = times[BASELINE]
    for name in names:
        ratios = [a / b for a, b in zip(times[name], base)]
        info[name].update(ms_crop=statistics.median(times[name]), ms_rounds=times[name], ratio_to_224=statistics.median(ratios),
                          ms_field=statistics.median(times[name]) * CELLS_PER_FIELD)
    print(f"\n{cpu_model()}, core {args.core}, 1 onnxruntime thread, onnxruntime {version_of('onnxruntime')}; "
          f"{args.rounds} rounds x {args.crops} crops, alternated")
    print("| variant | input | M mult-adds | ms/crop (median round) | x in224 (median of round ratios) | ms/field at 12.4 cells |")
    print("|---|---|---|---|---|---|")
    for name in names:
        i = info[name]
        print(f"| {name} | {i['backbone']} {i['input']} | {i['mmac']:.0f} | {i['ms_crop']:.2f} | {i['ratio_to_224']:.3f} | {i['ms_field']:.1f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu_model(),
                                    "rounds": args.rounds, "crops": args.crops, "variants": info}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
