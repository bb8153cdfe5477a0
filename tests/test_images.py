"""Decoding: every odd or broken input either yields a usable RGB field or a clear ImageError."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from allmil_cli.stages.images import ImageError, load_fields
from allmil_cli.io.discover import discover_patients

from tests.conftest import EXAMPLES

REAL = sorted(EXAMPLES.rglob("*.jpg"))[0]


def _rgb() -> np.ndarray:
    with Image.open(REAL) as im:
        return np.asarray(im.convert("RGB"))


def test_real_jpeg_decodes_to_rgb_uint8():
    fields, notes = load_fields(REAL)
    assert len(fields) == 1 and notes == []
    assert fields[0].rgb.shape == (480, 640, 3) and fields[0].rgb.dtype == np.uint8


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "I;16", "CMYK"])
def test_modes_are_converted_to_rgb(tmp_path, mode):
    im = Image.fromarray(_rgb())
    if mode == "I;16":
        a = (np.asarray(im.convert("L")).astype(np.uint16) * 257)
        im = Image.fromarray(a)  # 16-bit grayscale
        path = tmp_path / "x16.png"
    else:
        im = im.convert(mode)
        path = tmp_path / f"x_{mode}.{'png' if mode != 'CMYK' else 'tif'}"
    im.save(path)
    fields, _ = load_fields(path)
    rgb = fields[0].rgb
    assert rgb.shape == (480, 640, 3) and rgb.dtype == np.uint8
    assert rgb.std() > 10  # real content survived, not a blank conversion


def test_rgba_transparency_is_composited_on_white(tmp_path):
    a = np.zeros((64, 64, 4), np.uint8)
    a[..., 0] = 200
    Image.fromarray(a, "RGBA").save(tmp_path / "t.png")  # fully transparent
    rgb = load_fields(tmp_path / "t.png")[0][0].rgb
    assert (rgb == 255).all()


def test_multipage_tiff_yields_every_usable_page(tmp_path):
    pages = [Image.fromarray(_rgb()), Image.fromarray(_rgb()[::-1].copy()), Image.new("RGB", (8, 8))]
    pages[0].save(tmp_path / "m.tif", save_all=True, append_images=pages[1:])
    fields, notes = load_fields(tmp_path / "m.tif")
    assert [f.page for f in fields] == [0, 1]
    assert any("too small" in n for n in notes)
    assert fields[1].label == "m.tif#1"


def test_exif_orientation_is_honoured(tmp_path):
    im = Image.fromarray(_rgb())
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    im.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    rgb = load_fields(tmp_path / "rot.jpg")[0][0].rgb
    assert rgb.shape == (640, 480, 3)


@pytest.mark.parametrize(
    "name,content,expect",
    [
        ("empty.jpg", b"", "empty"),
        ("text.jpg", b"this is not an image\n", "not a readable image"),
        ("random.png", os.urandom(4096), "not a readable image"),
    ],
)
def test_broken_files_raise_actionable_errors(tmp_path, name, content, expect):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(ImageError) as info:
        load_fields(p)
    msg = str(info.value)
    assert str(p) in msg and expect in msg


def test_truncated_jpeg(tmp_path):
    data = REAL.read_bytes()
    p = tmp_path / "trunc.jpg"
    p.write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_fields(p)


def test_corrupt_jpeg_body(tmp_path):
    data = bytearray(REAL.read_bytes())
    data[600:] = os.urandom(len(data) - 600)
    p = tmp_path / "corrupt.jpg"
    p.write_bytes(bytes(data))
    try:
        fields, _ = load_fields(p)
    except ImageError as exc:  # most corruptions are detected...
        assert str(p) in str(exc)
    else:  # ...some decode to garbage pixels, which is still a valid RGB field
        assert fields[0].rgb.dtype == np.uint8


def test_decompression_bomb_is_refused_without_decoding(tmp_path):
    p = tmp_path / "bomb.png"
    Image.new("L", (12000, 12000)).save(p, optimize=True)  # 144 Mpx, a few hundred kB on disk
    assert p.stat().st_size < 2_000_000
    with pytest.raises(ImageError, match="cap|decompression bomb"):
        load_fields(p, max_pixels=80_000_000)


def test_unreadable_file(tmp_path):
    p = tmp_path / "gone.jpg"
    p.symlink_to(tmp_path / "does-not-exist.jpg")
    with pytest.raises(ImageError, match="cannot be read"):
        load_fields(p)


def test_discover_patients_layouts(tmp_path):
    (tmp_path / "Ünïcode patient 1" / "day 2").mkdir(parents=True)
    (tmp_path / "Ünïcode patient 1" / "day 2" / "a.JPG").write_bytes(REAL.read_bytes())
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "loose.jpg").write_bytes(REAL.read_bytes())
    patients, notes = discover_patients(tmp_path)
    assert [p.name for p in patients] == ["empty", "Ünïcode patient 1"]
    assert patients[0].images == [] and len(patients[1].images) == 1
    assert any("--per-image" in n for n in notes)
    per_image, _ = discover_patients(tmp_path, per_image=True)
    assert sorted(p.name for p in per_image) == ["loose", str(Path("Ünïcode patient 1/day 2/a"))]


def test_discover_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        discover_patients(tmp_path / "nope")


@pytest.mark.parametrize("subsampling", [0, 1, 2])  # 4:4:4, 4:2:2, 4:2:0: what microscope cameras write
def test_fast_jpeg_decode_gives_pillows_pixels(tmp_path, subsampling):
    """JPEGs go through libjpeg-turbo straight to numpy (simplejpeg) when installed: the same pixels as Pillow."""
    from allmil_cli.stages import images

    if images._simplejpeg is None:
        pytest.skip("simplejpeg is not installed: Pillow decodes every JPEG")
    p = tmp_path / f"field_{subsampling}.jpg"
    Image.fromarray(_rgb()[:301, :397]).save(p, quality=88, subsampling=subsampling)  # odd sizes: partial blocks
    for path in (p, REAL):
        with Image.open(path) as im:
            assert images._fast_jpeg(im, path) is not None  # the fast path is taken...
            want = np.asarray(im.convert("RGB"))
        assert np.array_equal(load_fields(path)[0][0].rgb, want)  # ...and gives Pillow's pixels
    data = p.read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with Image.open(tmp_path / "cut.jpg") as im:
        assert images._fast_jpeg(im, tmp_path / "cut.jpg") is None  # refused: Pillow reports it (test_truncated_jpeg)


def test_kept_buffers_spare_the_page_faults_of_every_field(tmp_path):
    """keep_freed_buffers: a decoded field's memory serves the next field (glibc), instead of ~10,000 fresh pages each."""
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only; elsewhere keep_freed_buffers is a no-op")
    big = tmp_path / "field.tif"  # a 2592x1944 field through Pillow's own decoder (TIFF: no simplejpeg)
    Image.fromarray(_rgb()).resize((2592, 1944), Image.BILINEAR).save(big)
    code = (
        "import resource, sys\n"
        "from allmil_cli.stages.images import keep_freed_buffers, load_fields\n"
        "if sys.argv[2] == 'keep': assert keep_freed_buffers()\n"
        "load_fields(sys.argv[1])\n"
        "r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "for _ in range(3): load_fields(sys.argv[1])\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0) / 3)\n"
    )
    faults = {how: float(subprocess.run([sys.executable, "-c", code, str(big), how], capture_output=True, text=True,
                                        check=True).stdout) for how in ("default", "keep")}
    assert faults["keep"] < 0.25 * faults["default"], faults
