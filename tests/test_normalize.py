"""Stain normalisation anchored on background and red cells (allmil_cli.stages.normalize), on real fields."""

from __future__ import annotations

import numpy as np
from PIL import Image

from allmil_cli.stages.normalize import REFERENCE_BACKGROUND, REFERENCE_RBC, meta_for, reference_from_meta, stain_map
from allmil_cli.types.field import FieldStats
from allmil_cli.stages.scale import measure_field
from allmil_cli.train.shifts import cast, gamma

from tests.conftest import EXAMPLES


def _field() -> np.ndarray:
    return np.asarray(Image.open(sorted(EXAMPLES.glob("*/*.jpg"))[0]).convert("RGB"))


def test_reference_field_maps_to_itself():
    stats = FieldStats(80.0, background_rgb=REFERENCE_BACKGROUND, rbc_rgb=REFERENCE_RBC)
    smap = stain_map(stats)
    assert abs(smap.gain - 1.0) < 1e-9 and not smap.clamped
    assert np.abs(smap.lut.astype(int) - np.arange(256)[None, :]).max() <= 1


def test_lamp_cast_and_gamma_are_undone():
    """A camera colour cast and a gamma change are removed up to rounding: the normalised shifted field matches
    the normalised original far better than the raw shifted field matches the raw original."""
    rgb = _field()
    shifted = gamma(cast(rgb, (1.08, 0.9, 1.05)), 1.35)
    a = stain_map(measure_field(rgb)).apply(rgb).astype(float)
    b = stain_map(measure_field(shifted)).apply(shifted).astype(float)
    raw_err = np.abs(shifted.astype(float) - rgb.astype(float)).mean()
    norm_err = np.abs(a - b).mean()
    assert norm_err < 0.35 * raw_err, (norm_err, raw_err)


def test_anchor_colours_are_background_and_red_cells():
    s = measure_field(_field())
    bg, rbc = np.asarray(s.background_rgb), np.asarray(s.rbc_rgb)
    assert s.measured and bg.mean() > rbc.mean()  # plasma is brighter than red cells
    assert rbc[0] > rbc[1] and rbc[0] > rbc[2]  # red cells are red


def test_metadata_switch():
    assert reference_from_meta({}) is None  # models trained on raw crops see raw crops
    bg, rbc = reference_from_meta(meta_for())
    assert np.allclose(bg, REFERENCE_BACKGROUND, atol=0.05) and np.allclose(rbc, REFERENCE_RBC, atol=0.05)


def test_apply_is_the_per_channel_lookup_for_every_shape():
    """StainMap.apply (Pillow's Image.point on the stacked crops) gives numpy's lut[c][x[..., c]] byte for byte."""
    from allmil_cli.stages.normalize import StainMap

    rng = np.random.default_rng(3)
    for shape in [(6, 224, 224, 3), (224, 224, 3), (1, 7, 9, 3), (2, 1, 1, 3), (0, 224, 224, 3), (10, 3)]:
        lut = rng.integers(0, 256, (3, 256)).astype(np.uint8)
        x = rng.integers(0, 256, shape).astype(np.uint8)
        want = np.stack([lut[c][x[..., c]] for c in range(3)], axis=-1)
        got = StainMap(lut=lut, gain=1.0, clamped=False).apply(x)
        assert got.shape == want.shape and got.dtype == np.uint8 and np.array_equal(got, want)
        assert got.flags.writeable
