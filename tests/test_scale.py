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
