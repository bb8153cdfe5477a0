from __future__ import annotations

import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
EXAMPLES = ROOT / "examples" / "patients"
SHIPPED = ROOT / "weights"


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    from tests.onnx_fixtures import make_weights

    return make_weights(tmp_path_factory.mktemp("tiny_weights"))


@pytest.fixture()
def patients_dir(tmp_path) -> Path:
    """A writable copy of the shipped example patients (real BCCD fields)."""
    dst = tmp_path / "patients"
    shutil.copytree(EXAMPLES, dst)
    return dst


@pytest.fixture(scope="session")
def data_root() -> Path:
    if not (DATA / "ALL-IDB1").is_dir():
        pytest.skip("../shared/data is absent")
    return DATA


def shipped_weights_or_skip() -> Path:
    if not all((SHIPPED / f).exists() for f in ("detector.onnx", "embedder.onnx", "aggregator.onnx", "manifest.json")):
        pytest.skip("shipped weights not present")
    return SHIPPED
