"""Loading the three ONNX models once per run: integrity check, execution provider, metadata.

``weights/manifest.json`` records the sha256 of each shipped model; a model whose bytes differ is
refused (a tampered or half-copied file must never produce a diagnosis). A user who trains their own
models points ``--weights`` at a folder with its own manifest (``allmil train`` writes one).
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MODEL_FILES = {"detector": "detector.onnx", "embedder": "embedder.onnx", "aggregator": "aggregator.onnx"}
#: int8 copies of the two convolutional networks, for the CPU (``allmil_cli.train.quantize`` writes them)
INT8_FILES = {"detector": "detector_int8.onnx", "embedder": "embedder_int8.onnx"}
#: "fp32" (the default) or "int8". int8 shifts calls toward normal (protocol 3: README, "Speed"), so it is never
#: chosen for the user.
PRECISIONS = ("fp32", "int8")
MANIFEST = "manifest.json"
#: ``allmil_cli/weights`` of an installed package (pyproject maps the repository's ``weights/`` there).
DEFAULT_WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


class ModelError(Exception):
    """A model file is missing, tampered with, or cannot be loaded; the message is for the user."""


def default_weights_dir() -> Path:
    """Shipped weights: inside the installed package, else the repository's ``weights/`` folder."""
    if (DEFAULT_WEIGHTS / MANIFEST).exists():
        return DEFAULT_WEIGHTS
    return Path(__file__).resolve().parents[2] / "weights"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(weights_dir: Path) -> dict[str, str]:
    """(Re)write ``manifest.json`` with the sha256 of every model present in ``weights_dir``."""
    names = [*MODEL_FILES.values(), *INT8_FILES.values()]
    digests = {name: sha256_of(weights_dir / name) for name in names if (weights_dir / name).exists()}
    (weights_dir / MANIFEST).write_text(json.dumps({"sha256": digests}, indent=2) + "\n")
    return digests


def resolve_providers(device: str) -> tuple[list[str], str | None]:
    """onnxruntime providers for ``auto|cpu|cuda`` and an optional one-line notice for the user."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return ["CPUExecutionProvider"], None
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise ModelError(
                "--device cuda: this onnxruntime has no CUDA support "
                f"(providers: {', '.join(available)}); install the GPU build with: pip install 'allmil[gpu]'."
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], None
    if device != "auto":
        raise ModelError(f"--device {device!r}: use auto, cpu or cuda.")
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"], None
    return ["CPUExecutionProvider"], None


def model_files(precision: str) -> dict[str, str]:
    """Role -> file name of the models a run with ``precision`` (``fp32`` or ``int8``) loads."""
    if precision not in PRECISIONS:
        raise ModelError(f"--precision {precision!r}: use fp32 or int8.")
    return {**MODEL_FILES, **INT8_FILES} if precision == "int8" else dict(MODEL_FILES)


@dataclass
class Models:
    """The three inference sessions of one run, with what the reports need to say about them."""

    detector: Any
    embedder: Any
    aggregator: Any
    weights_dir: Path
    sha256: dict[str, str] = field(default_factory=dict)
    provider: str = "CPUExecutionProvider"
    notice: str | None = None
    gpu_decode: bool = False  # JPEGs decoded and cropped on the GPU (allmil_cli.executors.gpu): CUDA provider + torch with CUDA
    precision: str = "fp32"  # "int8": the detector and embedder are the int8 copies (INT8_FILES)

    def metadata(self, which: str) -> dict[str, str]:
        return dict(getattr(self, which).get_modelmeta().custom_metadata_map)


def decode_status() -> tuple[bool, str | None]:
    """Whether JPEGs can be decoded on the GPU here (torch + torchvision + a CUDA device), and a one-line notice if not."""
    try:
        import torch
        import torchvision  # noqa: F401
    except ImportError:
        return False, ("torch/torchvision are not installed, so JPEGs are decoded on the CPU "
                       "(pip install torch torchvision to decode them on the GPU with nvJPEG).")
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device, so JPEGs are decoded on the CPU."
    return True, None


def _session(path: Path, providers: list[str], threads: int | None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises several private exception types
        raise ModelError(f"{path}: onnxruntime cannot load this model ({exc}); re-install or re-export the weights.") from exc


def _check_int8_source(session: Any, path: Path, float_path: Path) -> None:
    """An int8 copy must have been made from the float model beside it (e.g. not left over from before retraining)."""
    source = session.get_modelmeta().custom_metadata_map.get("allmil.quantized_from")
    if source is not None and (not float_path.is_file() or sha256_of(float_path) != source):
        raise ModelError(f"{path}: made from another {float_path.name} than the one beside it; re-make the int8 copies "
                         "('python -m allmil_cli.train.quantize --weights DIR') or run with --precision fp32.")


def load_models(
    weights_dir: Path | None = None, device: str = "auto", threads: int | None = None, verify: bool = True,
    precision: str = "fp32",
) -> Models:
    """Verify and open the detector, embedder and aggregator in ``weights_dir`` (``precision="int8"``: the int8
    copies of the detector and embedder, :data:`INT8_FILES`)."""
    weights_dir = Path(weights_dir) if weights_dir else default_weights_dir()
    if not weights_dir.is_dir():
        raise ModelError(f"{weights_dir}: weights folder not found; pass --weights DIR or re-install allmil.")
    manifest_path = weights_dir / MANIFEST
    expected: dict[str, str] = {}
    if verify:
        if not manifest_path.exists():
            raise ModelError(
                f"{manifest_path}: missing, so the models cannot be verified; restore it, or run "
                "'allmil train manifest --weights DIR' for models you trained yourself."
            )
        try:
            expected = dict(json.loads(manifest_path.read_text())["sha256"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{manifest_path}: not a valid manifest ({exc}); restore it from the release.") from exc
    files = model_files(precision)
    providers, notice = resolve_providers(device)
    if providers[0] == "CUDAExecutionProvider":
        import onnxruntime as ort

        try:  # CUDA/cuDNN from the nvidia-* pip packages, when they are there
            ort.preload_dlls()
        except Exception:  # noqa: BLE001 - absent (old onnxruntime) or nothing to preload: the session says what is missing
            pass
    sessions: dict[str, Any] = {}
    digests: dict[str, str] = {}
    for role, name in files.items():
        path = weights_dir / name
        if not path.is_file():
            hint = (" (int8 copies: 'python -m allmil_cli.train.quantize --weights DIR', or --precision fp32)"
                    if name in INT8_FILES.values() else "")
            raise ModelError(f"{path}: model file missing; re-install allmil or pass --weights DIR holding {name}{hint}.")
        digest = sha256_of(path)
        if verify:
            if name not in expected:
                raise ModelError(f"{manifest_path}: has no sha256 for {name}; restore the manifest from the release.")
            if digest != expected[name]:
                raise ModelError(
                    f"{path}: sha256 {digest[:12]}... does not match the manifest ({expected[name][:12]}...); "
                    "the file is corrupt or was modified. Re-install allmil or restore the file."
                )
        digests[name] = digest
        sessions[role] = _session(path, providers, threads)
        if name in INT8_FILES.values():
            _check_int8_source(sessions[role], path, weights_dir / MODEL_FILES[role])
    used = sessions["embedder"].get_providers()[0]
    if device == "auto" and providers[0] == "CUDAExecutionProvider" and used != "CUDAExecutionProvider":
        notice = "no usable GPU found by onnxruntime-gpu; running on the CPU."
    gpu_decode = False
    if used == "CUDAExecutionProvider":  # the networks run on the GPU: decode and crop there too when torch can
        gpu_decode, why = decode_status()
        notice = " ".join(x for x in (notice, why) if x) or None
    return Models(weights_dir=weights_dir, sha256=digests, provider=used, notice=notice, gpu_decode=gpu_decode,
                  precision=precision, **sessions)


def tool_version() -> str:
    from allmil_cli import __version__

    return f"allmil {__version__} (python {sys.version.split()[0]})"
