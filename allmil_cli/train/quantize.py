"""int8 copies of the detector and the embedder, for faster CPU inference (opt-in: ``--precision int8``).

The two convolutional networks are about half of allmil's CPU time per field (132 of 244 ms on one core,
``bench/bench_budget.py``). On a CPU with int8
dot-product instructions (x86 VNNI/AMX, ARM dot-product) onnxruntime runs int8 convolutions 1.3-2x faster.
:func:`quantize_weights` writes ``detector_int8.onnx`` and ``embedder_int8.onnx`` beside the float models:

- static quantisation (QDQ format): int8 weights per output channel, uint8 activations, ranges calibrated
  (:data:`CALIBRATION`) on real inputs made by the product path (:func:`calibration_inputs`: ruler, detector input,
  crops, stain map) from calibration fields that must not be test fields;
- only the convolutions (and the residual additions between them) are quantised: the embedder's input
  normalisation, its pooling and its FC(256) stay float, and so does the aggregator (small);
- the model metadata (``allmil.*``) is kept, plus ``allmil.precision = int8`` and ``allmil.quantized_from`` (the
  float model's sha256: a copy left over from other float weights is refused, not silently used).

Whether int8 changes the calls is measured by ``python -m allmil_cli.train.variant_check int8`` (protocol 3 with
the fold models, float and int8, each fold's int8 copy calibrated on its own training fields). It does not hold:
int8 lowers the blast scores (cell logits by ~0.4 on average, fold 0) and so shifts calls toward normal, with
sensitivity 4-10 points lower under several shifts (README, "Speed"). So the product runs int8 only when asked
(``--precision int8``). Leaving the late blocks (15-18) float did not remove the shift; leaving the early blocks
(0-7) float halved it but also removed most of the speed-up.

``allmil train quantize [--weights DIR] [--calibration DIR]`` (or ``python -m allmil_cli.train.quantize``): int8
copies of the models in DIR (default: the shipped ``weights/``) and the manifest rewritten; calibrated on the
images under ``--calibration`` (e.g. your training fields; never your test fields), by default the shipped
models' training data (ALL-IDB1 and BCCD fields under ``../shared/data``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

from allmil_cli.stages.detect import model_meta, prepare_input
from allmil_cli.stages.images import ImageError, load_fields
from allmil_cli.stages.models import INT8_FILES, sha256_of

#: op types quantised (everything else stays float). The activations (Clip = ReLU6, Relu) must be among them, or
#: each convolution is wrapped in float conversions and the int8 graph runs slower than the float one.
QUANTISED_OPS = ["Conv", "Add", "Clip", "Relu"]
#: embedder calibration crops at most: percentile calibration keeps every activation of every crop in memory
#: (~27 MB per crop)
MAX_CROPS = 128
#: activation ranges: the embedder's from the 99.99th percentile of each activation's histogram (MinMax let rare
#: outliers stretch the ranges: embeddings' cosine to the float ones median 0.989 vs 0.994, cell blast-like calls
#: changed 5 vs 3 of 235 held-out cells, fold 0); the detector's from MinMax (its inputs are whole fields, too big
#: for histograms of every activation)
CALIBRATION = {"embedder": ("Percentile", 99.99), "detector": ("MinMax", None)}


def calibration_inputs(pipe, paths: list[Path]) -> tuple[list[np.ndarray], np.ndarray]:
    """Detector inputs (one [1,3,H,W] float32 per field) and embedder crops ([N,224,224,3] uint8, stain-mapped)
    of ``paths``, made by ``pipe`` (an :class:`allmil_cli.pipeline.runner.Pipeline` with the float models) exactly as
    the product makes them. An unreadable image is left out, with a note on stderr."""
    det_inputs: list[np.ndarray] = []
    crops: list[np.ndarray] = []
    canonical = model_meta(pipe.models.detector)["canonical_rbc_px"]
    for path in paths:
        try:
            fields = load_fields(path)[0]
        except ImageError as exc:
            print(f"calibration: skipped {exc}", file=sys.stderr)
            continue
        for fld in fields:
            stats = pipe.measure(fld.rgb, fld.shrinker())
            det_inputs.append(prepare_input(fld.rgb, stats.rbc_px, canonical, shrinker=fld.shrinker())[0])
            cells, stats = pipe.locate_cells(fld, stats)
            if cells:
                crops.append(pipe._crops(fld, cells, stats))
    all_crops = np.concatenate(crops) if crops else np.zeros((0, 224, 224, 3), np.uint8)
    if len(all_crops) > MAX_CROPS:  # evenly spread over the fields, deterministic
        all_crops = all_crops[np.linspace(0, len(all_crops) - 1, MAX_CROPS).round().astype(int)]
    return det_inputs, all_crops


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a list of input arrays."""

    def __init__(self, name: str, arrays: list[np.ndarray]) -> None:
        self._it = iter([{name: a} for a in arrays])

    def get_next(self) -> dict | None:
        return next(self._it, None)


def quantize(src: Path, dst: Path, arrays: list[np.ndarray], method: str = "MinMax", percentile: float | None = None) -> None:
    """Static int8 (QDQ) copy of the ONNX model ``src`` at ``dst``, calibrated on ``arrays`` (model inputs) with
    ``method`` (onnxruntime's ``CalibrationMethod``: MinMax, Percentile with ``percentile``, Entropy)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source = onnx.load(str(src), load_external_data=False)
    name = source.graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp:
        pre = Path(tmp) / "pre.onnx"
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        out = Path(tmp) / "int8.onnx"
        quantize_static(str(pre), str(out), _Reader(name, arrays), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        op_types_to_quantize=QUANTISED_OPS, calibrate_method=CalibrationMethod[method],
                        extra_options={"CalibPercentile": percentile} if percentile else {})
        model = onnx.load(str(out))
        meta = {p.key: p.value for p in source.metadata_props}
        meta["allmil.precision"] = "int8"
        meta["allmil.quantized_from"] = sha256_of(src)  # load_models refuses a copy of another float model
        del model.metadata_props[:]
        for k, v in sorted(meta.items()):
            model.metadata_props.add(key=k, value=v)
        tmp_dst = dst.with_name(dst.name + ".tmp")
        onnx.save(model, str(tmp_dst))
        tmp_dst.replace(dst)


def quantize_weights(weights: Path, calibration: list[Path], networks: tuple[str, ...] = ("detector", "embedder"),
                     out: Path | None = None) -> dict[str, Path]:
    """int8 copies of ``networks`` of the float models in ``weights``, written to ``out`` (default: ``weights``),
    calibrated on the fields ``calibration``; the manifest of ``out`` is rewritten. Returns the files written."""
    from allmil_cli.stages.models import load_models, write_manifest
    from allmil_cli.pipeline.runner import Pipeline

    out = Path(out) if out else Path(weights)
    if out != Path(weights):
        out.mkdir(parents=True, exist_ok=True)
        for f in Path(weights).glob("*.onnx"):
            if f.name not in INT8_FILES.values():
                shutil.copy(f, out / f.name)
    pipe = Pipeline(load_models(Path(weights), device="cpu", threads=1, verify=False, precision="fp32"))
    det_inputs, crops = calibration_inputs(pipe, calibration)
    written = {}
    for net in networks:
        arrays = det_inputs if net == "detector" else [
            np.ascontiguousarray(crops[i : i + 32].transpose(0, 3, 1, 2), dtype=np.float32) for i in range(0, len(crops), 32)]
        quantize(Path(weights) / f"{net}.onnx", out / INT8_FILES[net], arrays, *CALIBRATION[net])
        written[net] = out / INT8_FILES[net]
    write_manifest(out)
    return written


def bccd_calibration_fields(n: int = 16) -> list[Path]:
    """The first ``n`` BCCD fields of its train split (never its test split, where the shipped examples come from)."""
    from allmil_cli.train.data import read_bccd

    return [b.path for b in read_bccd() if b.split != "test"][:n]


def shipped_calibration_fields() -> list[Path]:
    """Calibration fields of the shipped weights: every 2nd ALL-IDB1 field (the shipped models train on all of them)
    and 16 BCCD train fields. Protocol 3's fold copies use their fold's training fields instead
    (:func:`allmil_cli.train.protocol3.calibration_fields`)."""
    from allmil_cli.train.data import read_all_idb1

    return [r.path for r in read_all_idb1()][::2] + bccd_calibration_fields()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m allmil_cli.train.quantize", description=__doc__.split("\n")[0])
    ap.add_argument("--weights", type=Path, default=Path(__file__).resolve().parents[2] / "weights")
    ap.add_argument("--calibration", type=Path, default=None,
                    help="folder of calibration images (searched recursively; training images, never test images) "
                         "[default: the shipped models' ALL-IDB1 and BCCD training fields]")
    ap.add_argument("--networks", nargs="+", default=["detector", "embedder"], choices=sorted(INT8_FILES))
    a = ap.parse_args(argv)
    if a.calibration is not None:
        from allmil_cli.io.discover import IMAGE_SUFFIXES

        fields = sorted(p for p in a.calibration.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    else:
        fields = shipped_calibration_fields()
    if not fields:
        ap.error(f"no calibration images found{f' under {a.calibration}' if a.calibration else ' (../shared/data absent?)'}")
    for net, f in quantize_weights(a.weights, fields, tuple(a.networks)).items():
        print(f"{net}: {f} ({f.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
