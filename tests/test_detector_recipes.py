"""The detector's training recipes of issue 17: the shift family on a crop, and PBC images as one-cell samples."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from allmil_cli.train.detector_labels import CACHE_RBC_PX, PBC_LABELLED_RBC, pbc_samples
from allmil_cli.train.detector_model import shift_crop
from tests.conftest import EXAMPLES


def _detail(a: np.ndarray) -> float:
    g = a.astype(np.float64).mean(axis=2)
    return float(np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean())


def test_shift_crop_keeps_the_crop_and_degrades_it_like_another_camera():
    field = np.asarray(Image.open(sorted((EXAMPLES / "patient_A").iterdir())[0]).convert("RGB"))
    crop = np.ascontiguousarray(field[100:292, 200:392])
    outs = [shift_crop(crop, 20.0, np.random.default_rng(seed)) for seed in range(40)]
    assert all(o.shape == crop.shape and o.dtype == np.uint8 for o in outs)
    again = shift_crop(crop, 20.0, np.random.default_rng(3))
    assert np.array_equal(again, outs[3])  # reproducible from the generator
    changed = [o for o in outs if not np.array_equal(o, crop)]
    assert len(changed) >= 20
    # a coarser camera loses fine detail: the least detailed draws are well below the crop's own detail
    assert min(_detail(o) for o in outs) < 0.7 * _detail(crop)


def test_pbc_images_are_one_centred_cell_with_the_rest_ignored(data_root):
    paths = sorted((data_root / "PBC" / "eosinophil").glob("*.jpg"))[:3]
    if not paths:
        pytest.skip("PBC is absent")
    rbc = 67.6
    for p, s in zip(paths, pbc_samples(paths, rbc)):
        w0, h0 = Image.open(p).size
        h, w = s.image.shape[:2]
        assert abs(w - w0 * CACHE_RBC_PX / rbc) <= 1 and abs(h - h0 * CACHE_RBC_PX / rbc) <= 1
        assert s.source == "pbc" and s.centres.tolist() == [[w / 2.0, h / 2.0]]
        r = PBC_LABELLED_RBC * CACHE_RBC_PX
        assert not s.ignore[int(h / 2), int(w / 2)] and not s.ignore[int(h / 2), int(w / 2 + r - 2)]
        assert s.ignore[0, 0] and s.ignore[h - 1, w - 1]  # the corners: another cell could lie there, unlabelled
