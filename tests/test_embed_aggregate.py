"""Embedder + aggregator ONNX models: shapes, ranges, blast > normal on ALL-IDB2, determinism.

Skips when weights/*.onnx are missing (and the data-dependent checks when ../shared/data is absent).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / "weights"
DATA = ROOT.parent / "shared" / "data"


def _session(name: str):
    p = WEIGHTS / name
    if not p.exists():
        pytest.skip(f"{p} missing")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def models():
    from allmil_cli.stages.aggregate import Aggregator
    from allmil_cli.stages.embed import Embedder

    emb = Embedder(_session("embedder.onnx"))
    agg = Aggregator(_session("aggregator.onnx"), emb.blank_features())
    return emb, agg


def _idb2_crops(label: int, n: int) -> np.ndarray:
    from PIL import Image

    files = sorted((DATA / "ALL-IDB2" / "img").glob(f"*_{label}.tif"))
    if not files:
        pytest.skip("ALL-IDB2 data absent")
    step = max(1, len(files) // n)
    out = []
    for f in files[::step][:n]:
        with Image.open(f) as im:
            out.append(np.asarray(im.convert("RGB").resize((224, 224), Image.BILINEAR)))
    return np.stack(out)


def test_metadata(models):
    emb, agg = models
    assert emb.session.get_modelmeta().custom_metadata_map["allmil.kind"] == "embedder"
    assert agg.meta["allmil.kind"] == "aggregator"
    assert agg.bag_size == 15
    assert 0.0 < agg.threshold < 1.0 and 0.0 < agg.cell_threshold < 1.0
    assert agg.combine in ("max", "mean", "noisy_or", "series")


def test_shapes_and_ranges(models):
    emb, agg = models
    rng = np.random.default_rng(0)
    crops = rng.integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    f = emb.embed(crops, batch_size=2)
    assert f.shape == (3, 256) and f.dtype == np.float32
    assert np.isfinite(f).all() and (f >= 0).all()  # ReLU output
    b = emb.blank_features()
    assert b.shape == (256,)
    s = agg.cell_scores(f)
    assert s.shape == (3,) and ((s >= 0) & (s <= 1)).all()
    p, v = agg.session.run(None, {"features": np.stack([f, f])})
    assert p.shape == (2,) and v.shape == (2, 64)
    assert 0.0 <= agg.patient_probability(f) <= 1.0
    assert 0.0 <= agg.patient_probability(np.zeros((0, 256), np.float32)) <= 1.0


def test_blast_scores_higher_than_normal(models):
    emb, agg = models
    blasts = agg.cell_scores(emb.embed(_idb2_crops(1, 4)))
    normals = agg.cell_scores(emb.embed(_idb2_crops(0, 4)))
    assert blasts.mean() > normals.mean()


def test_patient_probability_deterministic(models):
    emb, agg = models
    rng = np.random.default_rng(1)
    f = emb.embed(rng.integers(0, 256, (2, 224, 224, 3), dtype=np.uint8))
    feats = np.concatenate([f] * 10)  # 20 cells -> two bags
    assert agg.patient_probability(feats, seed=3) == agg.patient_probability(feats, seed=3)


def test_the_cpu_batch_size_does_not_change_a_bit(models):
    """The pipeline embeds one crop per call on the CPU (faster) instead of 32: the same bytes, on real crops."""
    from allmil_cli.stages.images import load_fields
    from allmil_cli.stages.models import load_models
    from allmil_cli.types.results import Options
    from allmil_cli.pipeline.runner import Pipeline

    from tests.conftest import EXAMPLES

    pipe = Pipeline(load_models(WEIGHTS, device="cpu", threads=1), Options())
    assert pipe.batch_size == 1 and Pipeline(pipe.models, Options(batch_size=8)).batch_size == 8
    crops = []
    for path in sorted(EXAMPLES.glob("*/*.jpg")):
        fld = load_fields(path)[0][0]
        cells, stats = pipe.locate_cells(fld)
        crops.append(pipe._crops(fld, cells, stats))
    crops = np.concatenate(crops)
    assert len(crops) >= 12
    one = pipe.embedder.embed(crops, batch_size=1)
    assert one.tobytes() == pipe.embedder.embed(crops, batch_size=32).tobytes() == pipe.embedder.embed(crops, batch_size=5).tobytes()
