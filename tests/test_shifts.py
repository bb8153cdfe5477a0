"""Protocol-3 domain shifts (allmil_cli.train.shifts): deterministic, and the resolution shifts hit their red-cell size."""

from __future__ import annotations

import numpy as np
from PIL import Image

from allmil_cli.stages.scale import estimate_rbc_diameter
from allmil_cli.train.shifts import PROTOCOL3, hed_perturb, random_stain

from tests.conftest import EXAMPLES


def _field() -> np.ndarray:
    return np.asarray(Image.open(sorted(EXAMPLES.glob("*/*.jpg"))[0]).convert("RGB"))


def test_shifts_are_deterministic_and_change_the_field():
    rgb = _field()
    rbc = estimate_rbc_diameter(rgb)
    for s in PROTOCOL3:
        a, fa = s.apply(rgb, rbc)
        b, fb = s.apply(rgb, rbc)
        assert fa == fb and np.array_equal(a, b), s.name
        if s.name != "none":
            assert a.shape != rgb.shape or np.abs(a.astype(int) - rgb).mean() > 1.0, s.name


def test_resolution_shifts_reach_their_red_cell_size():
    rgb = _field()
    rbc = estimate_rbc_diameter(rgb)
    for s in PROTOCOL3:
        if s.name.startswith("res"):
            a, f = s.apply(rgb, rbc)
            target = float(s.name[3:5])
            assert abs(rbc * f - target) < 0.5
            assert abs(estimate_rbc_diameter(a) - target) / target < 0.35, (s.name, estimate_rbc_diameter(a))


def test_hed_identity_and_random_stain_seeded():
    rgb = _field()
    assert np.abs(hed_perturb(rgb, (1, 1, 1), (0, 0, 0)).astype(int) - rgb).max() <= 2
    a = random_stain(np.random.default_rng(3), p=1.0)(rgb)
    b = random_stain(np.random.default_rng(3), p=1.0)(rgb)
    assert np.array_equal(a, b)
