"""Tiny ONNX models with the exact interfaces of the shipped ones, built with onnx.helper (no torch).

They are real models run by real onnxruntime sessions: the detector responds to purple (stained
nuclei) pixels, the embedder averages colour, the aggregator averages features. Tests use them to
exercise the whole pipeline deterministically and quickly, independent of the trained weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _save(graph, path: Path, meta: dict[str, str]) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="allmil-tests")
    model.ir_version = 8
    for k, v in meta.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def make_detector(path: Path, canonical_rbc_px: float = 20.0, threshold: float = 0.5) -> Path:
    # purple-ness = (B - G) / 32 - 1.5 per pixel; 4x4 average pool -> stride-4 heatmap; sigmoid.
    w = numpy_helper.from_array(np.array([0.0, -1.0, 1.0], np.float32).reshape(1, 3, 1, 1) / 32.0, "w")
    b = numpy_helper.from_array(np.array([-1.5], np.float32), "b")
    nodes = [
        helper.make_node("Conv", ["image", "w", "b"], ["purple"]),
        helper.make_node("AveragePool", ["purple"], ["pooled"], kernel_shape=[4, 4], strides=[4, 4]),
        helper.make_node("Sigmoid", ["pooled"], ["heatmap"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_detector",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [1, 3, "H", "W"])],
        [helper.make_tensor_value_info("heatmap", TensorProto.FLOAT, [1, 1, "h", "w"])],
        [w, b],
    )
    return _save(graph, path, {"allmil.kind": "detector", "allmil.stride": "4", "allmil.canonical_rbc_px": str(canonical_rbc_px),
                               "allmil.threshold": str(threshold), "allmil.version": "1"})


def make_embedder(path: Path, dim: int = 256) -> Path:
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.05, (3, dim)).astype(np.float32), "w")
    nodes = [
        helper.make_node("GlobalAveragePool", ["crops"], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "w"], ["lin"]),
        helper.make_node("Relu", ["lin"], ["features"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_embedder",
        [helper.make_tensor_value_info("crops", TensorProto.FLOAT, ["N", 3, 224, 224])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", dim])],
        [w],
    )
    return _save(graph, path, {"allmil.kind": "embedder", "allmil.backbone": "tiny", "allmil.input_size": "224", "allmil.version": "1"})


def make_aggregator(path: Path, dim: int = 256, threshold: float = 0.5) -> Path:
    rng = np.random.default_rng(1)
    w2 = numpy_helper.from_array(rng.normal(0, 0.3, (dim, 2)).astype(np.float32), "w2")
    w64 = numpy_helper.from_array(rng.normal(0, 0.1, (dim, 64)).astype(np.float32), "w64")
    idx = numpy_helper.from_array(np.array(1, np.int64), "idx")
    nodes = [
        helper.make_node("ReduceMean", ["features"], ["mean"], axes=[1], keepdims=0),
        helper.make_node("MatMul", ["mean", "w2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
        helper.make_node("Gather", ["prob", "idx"], ["p_all"], axis=1),
        helper.make_node("MatMul", ["mean", "w64"], ["patient_vector"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_aggregator",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["B", "T", dim])],
        [helper.make_tensor_value_info("p_all", TensorProto.FLOAT, ["B"]),
         helper.make_tensor_value_info("patient_vector", TensorProto.FLOAT, ["B", 64])],
        [w2, w64, idx],
    )
    return _save(graph, path, {"allmil.kind": "aggregator", "allmil.bag_size": "15", "allmil.threshold": str(threshold),
                               "allmil.cell_threshold": "0.5", "allmil.combine": "max", "allmil.version": "1"})


def make_weights(folder: Path) -> Path:
    """A complete weights folder (three models + manifest) of tiny models."""
    from allmil_cli.stages.models import write_manifest

    folder.mkdir(parents=True, exist_ok=True)
    make_detector(folder / "detector.onnx")
    make_embedder(folder / "embedder.onnx")
    make_aggregator(folder / "aggregator.onnx")
    write_manifest(folder)
    return folder
