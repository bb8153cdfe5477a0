import numpy as np
from PIL import Image

from allmil_cli.scale import estimate_rbc_diameter

from tests.conftest import EXAMPLES


def test_estimate_follows_magnification():
    """Halving the image must roughly halve the red-cell estimate (it is a ruler, not a constant)."""
    with Image.open(sorted(EXAMPLES.rglob("*.jpg"))[0]) as im:
        full = np.asarray(im.convert("RGB"))
        half = np.asarray(im.convert("RGB").resize((320, 240), Image.BILINEAR))
    d_full, d_half = estimate_rbc_diameter(full), estimate_rbc_diameter(half)
    assert 60 < d_full < 200  # BCCD red cells are ~80-120 px across at 640x480
    assert 0.4 < d_half / d_full < 0.6


def test_blank_field_falls_back_to_default():
    from allmil_cli.scale import DEFAULT_RBC_PX

    assert estimate_rbc_diameter(np.full((300, 400, 3), 200, np.uint8)) == DEFAULT_RBC_PX


def _example_field(scale: float = 1.0) -> np.ndarray:
    with Image.open(sorted(EXAMPLES.rglob("*.jpg"))[0]) as im:
        rgb = im.convert("RGB")
        if scale != 1.0:  # a bigger field, like a 5-Mpx camera's, and an odd size (partial reduce blocks)
            rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.BICUBIC)
        return np.asarray(rgb)


def test_shared_shrinker_is_pillows_own_resize():
    """Shrinker.resize must be Image.resize(BILINEAR, reducing_gap) pixel for pixel, reductions shared or not."""
    from allmil_cli.resample import Shrinker

    for scale in (1.0, 3.37):
        rgb = _example_field(scale)
        h, w = rgb.shape[:2]
        shared = Shrinker(rgb)
        for size in ((w // 5, h // 5), (round(w / 4.3), round(h / 4.3)), (w // 2 + 1, h // 3)):
            for gap in (None, 1.0, 1.25, 2.0):
                want = np.asarray(Image.fromarray(rgb).resize(size, Image.BILINEAR, reducing_gap=gap))
                assert np.array_equal(shared.resize(size, gap), want), (scale, size, gap)
        assert shared._reduced, "the box reductions were kept for reuse"


def test_detector_input_is_the_same_with_or_without_the_ruler_shrinker():
    from allmil_cli.detect import prepare_input
    from allmil_cli.resample import Shrinker
    from allmil_cli.scale import measure_field

    rgb = _example_field(3.37)
    shared = Shrinker(rgb)
    stats = measure_field(rgb, shrinker=shared)
    assert stats == measure_field(rgb)
    a, sx, sy = prepare_input(rgb, stats.rbc_px, 20.0, shrinker=shared)
    b, tx, ty = prepare_input(rgb, stats.rbc_px, 20.0)
    assert np.array_equal(a, b) and (sx, sy) == (tx, ty)


def test_fast_morphology_matches_scipy():
    """The ruler's and the boxes' opening and hole filling are scipy's, pixel for pixel (they are only faster)."""
    from scipy import ndimage as ndi

    from allmil_cli.scale import fill_holes, open_cross

    rng = np.random.default_rng(0)
    for _ in range(150):
        m = rng.random((int(rng.integers(1, 90)), int(rng.integers(1, 90)))) < rng.random()
        if rng.random() < 0.5:
            m = ndi.binary_dilation(m)  # blobs with holes, as red cells with their pallor
        assert np.array_equal(open_cross(m), ndi.binary_opening(m, iterations=1))
        assert np.array_equal(fill_holes(m), ndi.binary_fill_holes(m))
