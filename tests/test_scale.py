import numpy as np
from PIL import Image

from allmil_cli.stages.scale import estimate_rbc_diameter

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
    from allmil_cli.stages.scale import DEFAULT_RBC_PX

    assert estimate_rbc_diameter(np.full((300, 400, 3), 200, np.uint8)) == DEFAULT_RBC_PX


def _example_field(scale: float = 1.0) -> np.ndarray:
    with Image.open(sorted(EXAMPLES.rglob("*.jpg"))[0]) as im:
        rgb = im.convert("RGB")
        if scale != 1.0:  # a bigger field, like a 5-Mpx camera's, and an odd size (partial reduce blocks)
            rgb = rgb.resize((round(rgb.width * scale), round(rgb.height * scale)), Image.BICUBIC)
        return np.asarray(rgb)


def test_shared_shrinker_is_pillows_own_resize():
    """Shrinker.resize must be Image.resize(BILINEAR, reducing_gap) pixel for pixel, reductions shared or not."""
    from allmil_cli.types.resample import Shrinker

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
    from allmil_cli.stages.detect import prepare_input
    from allmil_cli.types.resample import Shrinker
    from allmil_cli.stages.scale import measure_field

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

    from allmil_cli.stages.scale import fill_holes, open_cross

    rng = np.random.default_rng(0)
    for _ in range(150):
        m = rng.random((int(rng.integers(1, 90)), int(rng.integers(1, 90)))) < rng.random()
        if rng.random() < 0.5:
            m = ndi.binary_dilation(m)  # blobs with holes, as red cells with their pallor
        assert np.array_equal(open_cross(m), ndi.binary_opening(m, iterations=1))
        assert np.array_equal(fill_holes(m), ndi.binary_fill_holes(m))


def _redness_ruler(rgb: np.ndarray) -> float | None:
    """The ruler as every model was calibrated on it: the redness mask of the 512-px thumbnail, nothing else."""
    from allmil_cli.stages.scale import _otsu, _ruler, fill_holes, open_cross, thumbnail

    a, factor = thumbnail(rgb)
    redness = np.clip((a[..., 0] - a[..., 1]) * 2.0 + 128.0, 0.0, 255.0)
    return _ruler(fill_holes(open_cross(redness > _otsu(redness))), factor)


def test_full_resolution_fields_read_as_the_models_were_calibrated():
    """The low-end fixes (luminance check, finer thumbnail) never touch a full-resolution field: same reading, bit for bit."""
    for path in sorted(EXAMPLES.rglob("*.jpg")):
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        assert estimate_rbc_diameter(rgb) == _redness_ruler(rgb), path.name


def _shrunk(scale_to: float, quality: int | None = None) -> tuple[np.ndarray, float]:
    """An example field resized so its red cells are ``scale_to`` px (its full-resolution reading x the factor)."""
    from allmil_cli.train.shifts import jpeg, rescale

    with Image.open(sorted(EXAMPLES.rglob("*.jpg"))[2]) as im:  # BloodImage_00021: red cells apart, some touching
        rgb = np.asarray(im.convert("RGB"))
    small = rescale(rgb, scale_to / estimate_rbc_diameter(rgb))
    return (jpeg(small, quality) if quality else small), scale_to


def test_ruler_on_a_field_shrunk_to_a_known_size():
    """9 px red cells read 9 px (it read 16-17 px on some BCCD fields shrunk 12x: docs/ruler.md), 14 px after JPEG 70."""
    for size, quality in ((9.0, None), (12.0, None), (14.0, 70), (20.0, 70)):
        rgb, known = _shrunk(size, quality)
        assert abs(estimate_rbc_diameter(rgb) / known - 1.0) <= 0.15, (size, quality, estimate_rbc_diameter(rgb))


def test_pale_field_after_jpeg_is_measured_on_luminance():
    """A pale field at 14 px red cells and JPEG 70 loses its redness to chroma quantisation (the redness ruler read it
    ~6x too large, or nothing); the luminance mask still sees the red cells."""
    from allmil_cli.train.shifts import gamma, jpeg, rescale

    with Image.open(sorted(EXAMPLES.rglob("*.jpg"))[2]) as im:
        rgb = np.asarray(im.convert("RGB"))
    known = 14.0
    pale = jpeg(gamma(rescale(rgb, known / estimate_rbc_diameter(rgb)), 0.45), 70)  # washed-out stain, then JPEG
    assert abs(estimate_rbc_diameter(pale) / known - 1.0) <= 0.2, estimate_rbc_diameter(pale)


def test_wide_field_with_small_cells_is_measured_on_a_finer_thumbnail():
    """A 2592 x 1944 field whose red cells are 12 px (a low magnification on a large sensor: here a mosaic of the example
    fields shrunk to 12 px red cells, background between them) shows them ~2.4 px wide on the 512 px thumbnail, where
    they merge: that reading is ~1.8x too large. The ruler measures such a field again on finer thumbnails."""
    from allmil_cli.stages.scale import _estimate, thumbnail
    from allmil_cli.train.shifts import rescale

    tiles = []
    for path in sorted(EXAMPLES.rglob("*.jpg")):
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
        small = rescale(rgb, 12.0 / estimate_rbc_diameter(rgb))[:48, :64]
        tile = np.empty((48, 64, 3), np.uint8)
        tile[:] = np.median(small.reshape(-1, 3), axis=0).astype(np.uint8)
        tile[: small.shape[0], : small.shape[1]] = small
        tiles.append(tile)
    rows = [np.concatenate([tiles[(7 * i + j) % len(tiles)] for j in range(41)], axis=1) for i in range(41)]
    wide = np.ascontiguousarray(np.concatenate(rows, axis=0)[:1944, :2592])
    assert _estimate(*thumbnail(wide)) / 12.0 > 1.5  # the 512 px thumbnail alone
    assert abs(estimate_rbc_diameter(wide) / 12.0 - 1.0) <= 0.15, estimate_rbc_diameter(wide)
    from allmil_cli.stages.scale import measure_field

    assert measure_field(wide).rbc_px == estimate_rbc_diameter(wide)  # the pipeline's measure takes the same second look
