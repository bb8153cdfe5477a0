"""The GPU path's fallbacks, and the GPU front end's own code run on CPU tensors (no GPU in CI).

- torch present but no CUDA device (this machine), or torch absent: a one-line notice, JPEGs decoded on the CPU.
- networks "on a GPU" (the embedder embeds here, batched across fields) without nvJPEG: the CPU path's results,
  bit for bit, with and without worker processes.
- ``Pipeline.use_gpu("cpu")`` runs allmil_cli.executors.gpu (torchvision decode, torch resizing and crops, IOBinding) on
  CPU tensors: close to the CPU path (other resampling and IDCT), never wildly off.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import asdict, replace

import numpy as np
import pytest

from tests.conftest import EXAMPLES, ROOT, shipped_weights_or_skip


@pytest.fixture(scope="module")
def models():
    from allmil_cli.stages.models import load_models

    return load_models(shipped_weights_or_skip(), device="cpu")


@pytest.fixture(scope="module")
def patients():
    from allmil_cli.io.discover import discover_patients

    return discover_patients(EXAMPLES)[0]


@pytest.fixture(scope="module")
def cpu_results(models, patients):
    from allmil_cli.types.results import Options
    from allmil_cli.pipeline.runner import Pipeline

    return list(Pipeline(models, Options(keep_features=True)).run(patients))


def _flat(r) -> str:
    d = asdict(r)
    d["features"] = r.features.tobytes()
    return repr(d)


def test_no_cuda_means_cpu_decode_with_a_one_line_notice():
    pytest.importorskip("torch")
    import torch

    from allmil_cli.stages.models import decode_status

    ok, notice = decode_status()
    if torch.cuda.is_available():
        assert ok and notice is None
    else:
        assert not ok and "decoded on the CPU" in notice and "\n" not in notice


def test_no_torch_means_cpu_decode_with_an_install_hint(monkeypatch):
    from allmil_cli.stages.models import decode_status

    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    ok, notice = decode_status()
    assert not ok and "not installed" in notice and "pip install torch torchvision" in notice


@pytest.mark.parametrize("workers", [1, 2])
def test_gpu_networks_without_nvjpeg_give_the_cpu_results(models, patients, cpu_results, workers):
    """Provider CUDA (faked: the sessions stay on the CPU) and no nvJPEG: crops come back and are embedded here."""
    from allmil_cli.types.results import Options
    from allmil_cli.pipeline.runner import Pipeline

    cuda_like = replace(models, provider="CUDAExecutionProvider", gpu_decode=False)
    pipe = Pipeline(cuda_like, Options(keep_features=True, workers=workers))
    assert pipe.embed_here and pipe.executor.gpu is None
    results = list(pipe.run(patients))
    assert [_flat(r) for r in results] == [_flat(r) for r in cpu_results]


def test_device_cuda_without_a_cuda_build_is_a_model_error(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    proc = subprocess.run([sys.executable, "-m", "allmil_cli", "diagnose", str(EXAMPLES), "--out", str(tmp_path / "r.csv"),
                           "--device", "cuda", "-q"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 3
    assert "pip install 'allmil[gpu]'" in proc.stderr.replace("\n", " ")


def test_gpu_front_end_code_on_cpu_tensors_is_close_to_the_cpu_path(models, patients, cpu_results):
    pytest.importorskip("torchvision")
    from allmil_cli.types.results import Options
    from allmil_cli.pipeline.runner import Pipeline

    seen = []
    pipe = Pipeline(models, Options(keep_features=True), on_field=lambda p, f, c, r: seen.append((f.label, f.rgb.shape, len(c))))
    pipe.use_gpu("cpu")
    results = list(pipe.run(patients))
    assert len(seen) == sum(r.n_images for r in results) == sum(r.n_images for r in cpu_results)
    for g, c in zip(results, cpu_results):
        assert g.patient == c.patient and g.status == c.status
        for gi, ci in zip(g.images, c.images):
            assert (gi.image, gi.width, gi.height) == (ci.image, ci.width, ci.height)
            assert abs(gi.rbc_px - ci.rbc_px) <= 0.03 * ci.rbc_px  # torch's resampling, not Pillow's
        assert abs(g.n_cells - c.n_cells) <= 1
        matched = [min(np.hypot(gc.x - cc.x, gc.y - cc.y) for cc in c.cells) for gc in g.cells]
        assert np.median(matched) < 3.0  # the same cells, to a few pixels
        assert g.features.shape[1] == 256 and np.isfinite(g.features).all()
        assert abs(g.p_all - c.p_all) < 0.05
