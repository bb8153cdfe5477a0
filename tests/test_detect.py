"""WBC detector: heatmap decoding (synthetic) and the shipped ONNX model on a real BCCD field."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from allmil_cli.stages.detect import DECODING, Detection, decode_heatmap, detect_cells, prepare_input

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "weights" / "detector.onnx"
DATA = REPO.parent / "shared" / "data"
BCCD_FIELD = "BloodImage_00007"  # one WBC box, published test split (never trained on)


def _bump(h, w, cx, cy, amp, sigma=1.5):
    yy, xx = np.mgrid[0:h, 0:w]
    return amp * np.exp(-((xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2) / (2 * sigma**2))


def test_decode_peaks_threshold_and_subpixel():
    heat = np.maximum(_bump(40, 50, 10.5, 12.5, 0.9), _bump(40, 50, 35.5, 30.5, 0.5))
    heat = np.maximum(heat, _bump(40, 50, 5.5, 35.5, 0.1))  # below threshold
    p = decode_heatmap(heat, threshold=0.3, min_dist=4.0)
    assert p.shape == (2, 3)
    assert p[0, 2] == pytest.approx(0.9, abs=1e-3) and p[1, 2] == pytest.approx(0.5, abs=1e-3)
    np.testing.assert_allclose(p[0, :2], [10.5, 12.5], atol=0.05)
    np.testing.assert_allclose(p[1, :2], [35.5, 30.5], atol=0.05)
    # sub-cell centre (between cells) is recovered approximately
    q = decode_heatmap(_bump(20, 20, 10.0, 8.0, 0.8), threshold=0.3, min_dist=4.0)
    assert len(q) == 1 and abs(q[0, 0] - 10.0) < 0.45 and abs(q[0, 1] - 8.0) < 0.45


def test_decode_min_distance_suppression():
    heat = np.zeros((30, 30), np.float32)
    heat[10, 10], heat[10, 13], heat[10, 20] = 0.9, 0.8, 0.7  # 3 cells apart -> suppressed, 10 -> kept
    p = decode_heatmap(heat, threshold=0.3, min_dist=4.0)
    assert len(p) == 2
    np.testing.assert_allclose(p[:, 0], [10.5, 20.5])
    assert decode_heatmap(np.zeros((8, 8)), 0.3, 4.0).shape == (0, 3)


def _two_peaks(gap: float, dip: float, sigma: float = 2.0, h: int = 30, w: int = 40) -> np.ndarray:
    """Two heatmap peaks (0.9, 0.8) ``gap`` cells apart; ``dip``: where their profiles cross, the heatmap falls to this
    fraction of the weaker one (a max of two Gaussians of ``sigma`` cells, plus a ridge lifting the saddle)."""
    a, b = _bump(h, w, 15.5, 15.5, 0.9, sigma), _bump(h, w, 15.5 + gap, 15.5, 0.8, sigma)
    heat = np.maximum(a, b)
    yy, xx = np.mgrid[0:h, 0:w]
    ridge = (np.abs(yy + 0.5 - 15.5) < 1.0) & (xx + 0.5 > 15.5) & (xx + 0.5 < 15.5 + gap)
    heat[ridge] = np.maximum(heat[ridge], dip * 0.8)
    return heat.astype(np.float32)


def test_decode_merges_two_maxima_on_one_ridge_but_not_two_cells():
    """A lobed or large cell can give two maxima with no valley between them: one cell. Two touching cells (centres a
    white-cell diameter, ~1.2-1.5 red cells, apart) give two maxima with a valley: two cells. At 3.5 heatmap cells
    (0.7 red cell at the detector's 20 px scale and 4 px stride) the old single radius (3 cells) kept both maxima."""
    one_cell, two_cells = _two_peaks(3.5, 0.9), _two_peaks(6.0, 0.0)
    assert len(decode_heatmap(one_cell, 0.3, 3.0)) == 2  # radius only: one cell counted twice
    peaks, merged = decode_heatmap(one_cell, 0.3, 3.0, merge_dist=5.0, valley=0.7, return_merged=True)
    weaker = float(decode_heatmap(one_cell, 0.3, 3.0)[1, 2])
    assert len(peaks) == 1 and merged == [[pytest.approx(weaker)]]  # the weaker peak's score is kept on the cell
    peaks, merged = decode_heatmap(two_cells, 0.3, 3.0, merge_dist=5.0, valley=0.7, return_merged=True)
    assert len(peaks) == 2 and merged == [[], []]
    far = _two_peaks(7.0, 0.9)  # beyond merge_dist: two cells whatever the ridge
    assert len(decode_heatmap(far, 0.3, 3.0, merge_dist=5.0, valley=0.7)) == 2


def test_detections_carry_what_was_merged():
    from allmil_cli.stages.detect import Decoding, heatmap_detections

    meta = {"threshold": 0.3, "stride": 4.0, "canonical_rbc_px": 20.0}
    heat = _two_peaks(3.5, 0.9)
    before = heatmap_detections(heat, meta, None, 160, 120, 1.0, 1.0, Decoding(0.6, 0.0, 1.0))
    after = heatmap_detections(heat, meta, None, 160, 120, 1.0, 1.0, Decoding(0.6, 1.0, 0.7))
    assert [d.merged_scores for d in before] == [(), ()]
    assert len(after) == 1 and after[0].score == pytest.approx(0.9, abs=0.01)
    assert after[0].merged_scores == (pytest.approx(before[1].score),)
    assert heatmap_detections(heat, meta, None, 160, 120, 1.0, 1.0) == heatmap_detections(
        heat, meta, None, 160, 120, 1.0, 1.0, DECODING)
    close = np.zeros((30, 40), np.float32)
    close[15, 15], close[15, 18], close[15, 28] = 0.9, 0.7, 0.6  # 3 and 13 cells (0.6 and 2.6 rbc) from the first
    close[16, 18] = 0.7  # a flat top of two equal cells: one peak, not a merge
    dets = heatmap_detections(close, meta, None, 160, 120, 1.0, 1.0)
    assert [d.merged_scores for d in dets] == [(), (), ()]  # 3 cells apart is not closer than the 3-cell radius
    close[15, 17], close[16, 17] = 0.7, 0.7
    dets = heatmap_detections(close, meta, None, 160, 120, 1.0, 1.0)
    assert len(dets) == 2 and dets[0].merged_scores == (pytest.approx(0.7),) and dets[1].merged_scores == ()


def test_prepare_input_scale_and_padding():
    rgb = np.full((100, 150, 3), 200, np.uint8)
    x, sx, sy = prepare_input(rgb, rbc_px=40.0, canonical_rbc_px=20.0)
    assert x.dtype == np.float32 and x.shape == (1, 3, 64, 96)
    assert sx == pytest.approx(75 / 150) and sy == pytest.approx(50 / 100)


def _session():
    if not WEIGHTS.exists():
        pytest.skip("weights/detector.onnx not built")
    ort = pytest.importorskip("onnxruntime")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(WEIGHTS), so, providers=["CPUExecutionProvider"])


def test_onnx_contract():
    sess = _session()
    meta = sess.get_modelmeta().custom_metadata_map
    assert meta["allmil.kind"] == "detector" and meta["allmil.stride"] == "4" and meta["allmil.version"] == "1"
    assert float(meta["allmil.canonical_rbc_px"]) > 0 and 0 < float(meta["allmil.threshold"]) < 1
    out = sess.run(None, {"image": np.full((1, 3, 64, 96), 128.0, np.float32)})[0]
    assert out.shape == (1, 1, 16, 24) and out.min() >= 0 and out.max() <= 1


def test_detects_annotated_bccd_wbc():
    sess = _session()
    from allmil_cli.stages.scale import estimate_rbc_diameter
    from allmil_cli.train.data import load_rgb, read_bccd

    if not (DATA / "BCCD").exists():
        pytest.skip("shared BCCD data absent")
    rec = next((r for r in read_bccd(DATA / "BCCD") if r.name == BCCD_FIELD), None)
    if rec is None:
        pytest.skip(f"{BCCD_FIELD} absent")
    rgb = load_rgb(rec.path)
    rbc = estimate_rbc_diameter(rgb)
    dets = detect_cells(sess, rgb, rbc)
    assert all(isinstance(d, Detection) and 0 <= d.score <= 1 for d in dets)
    for x0, y0, x1, y1 in rec.boxes["WBC"]:
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        assert any(np.hypot(d.x - cx, d.y - cy) < 0.8 * rbc for d in dets), (cx, cy, dets)
    assert len(dets) <= 3


def _stain_extent_reference(rgb, x, y, rbc_px, t=30.0):
    """stain_extent as first written: every labelled pixel of the window, then the blobs near (x, y)."""
    from scipy import ndimage as ndi

    from allmil_cli.stages.detect import WBC_RBC_RATIO
    from allmil_cli.stages.scale import open_cross

    r = int(1.3 * rbc_px)
    x0, y0 = max(int(x) - r, 0), max(int(y) - r, 0)
    win = rgb[y0 : int(y) + r, x0 : int(x) + r]
    fallback = (WBC_RBC_RATIO * rbc_px, WBC_RBC_RATIO * rbc_px)
    if win.size == 0:
        return fallback
    lab, n = ndi.label(open_cross(win[..., 2].astype(np.int16) - win[..., 1] > t))
    if n == 0:
        return fallback
    yy, xx = np.nonzero(lab)
    ids = lab[yy, xx]
    sel = np.isin(ids, np.unique(ids[np.hypot(xx + x0 - x, yy + y0 - y) < 0.5 * rbc_px]))
    if not sel.any():
        return fallback
    return float(xx[sel].max() - xx[sel].min() + 1), float(yy[sel].max() - yy[sel].min() + 1)


def test_stain_extent_matches_its_first_version_on_real_and_random_fields():
    from allmil_cli.stages.detect import stain_extent
    from allmil_cli.stages.images import load_fields

    from tests.conftest import EXAMPLES

    rng = np.random.default_rng(7)
    fields = [load_fields(p)[0][0].rgb for p in sorted(EXAMPLES.glob("patient_B/*.jpg"))[:2]]
    blobs = np.full((300, 400, 3), 200, np.uint8)
    for _ in range(40):  # random purple blobs of every size, some touching the border
        cy, cx, rr = rng.integers(0, 300), rng.integers(0, 400), rng.integers(2, 30)
        yy, xx = np.ogrid[:300, :400]
        blobs[(yy - cy) ** 2 + (xx - cx) ** 2 < rr ** 2] = (120, 60, 160)
    checked = 0
    for rgb in [*fields, blobs]:
        h, w = rgb.shape[:2]
        for _ in range(150):
            x, y, rbc = rng.uniform(-5, w + 5), rng.uniform(-5, h + 5), rng.uniform(8, 90)
            assert stain_extent(rgb, x, y, rbc) == _stain_extent_reference(rgb, x, y, rbc), (x, y, rbc)
            checked += 1
    assert checked == 450


def _shrunk(rgb: np.ndarray, size: float, quality: int | None = None) -> np.ndarray:
    from allmil_cli.stages.scale import estimate_rbc_diameter
    from allmil_cli.train.shifts import jpeg, rescale

    small = rescale(rgb, size / estimate_rbc_diameter(rgb))
    return jpeg(small, quality) if quality else small


def test_example_fields_shrunk_to_20_px_count_each_cell_once():
    """Every example field (BCCD), shrunk so its red cells are 20 px (and 14 px after JPEG 70), through the product
    path (its ruler, the shipped detector): the same number of cells as at full size, none two closer than 0.7 red
    cell (half a white cell)."""
    sess = _session()
    from allmil_cli.stages.images import load_fields
    from allmil_cli.stages.scale import estimate_rbc_diameter, measure_field

    from tests.conftest import EXAMPLES

    for path in sorted(EXAMPLES.rglob("*.jpg")):
        rgb = load_fields(path)[0][0].rgb
        n_full = len(detect_cells(sess, rgb, estimate_rbc_diameter(rgb)))
        for size, quality in ((20.0, None), (20.0, 70), (14.0, 70)):
            small = _shrunk(rgb, size, quality)
            dets = detect_cells(sess, small, measure_field(small).rbc_px)
            assert len(dets) == n_full, (path.name, size, quality)
            xy = np.asarray([(d.x, d.y) for d in dets]).reshape(-1, 2)
            gaps = np.hypot(xy[:, None, 0] - xy[None, :, 0], xy[:, None, 1] - xy[None, :, 1]) + np.eye(len(xy)) * 1e9
            assert gaps.min(initial=1e9) > 0.7 * size, (path.name, size, quality)


def test_lobed_cell_of_another_lab_shrunk_to_20_px():
    """A PBC eosinophil (another hospital; the detector never saw PBC) shrunk so its red cells are 20 px gives two
    heatmap maxima 0.6-1.0 red cell apart with no valley between them. The shipped decoding (one 0.6 red-cell radius)
    keeps both; the valley test (``Decoding(merge_dist_rbc=1.0, valley=0.5, valley_far=1.0)``, measured but not shipped:
    on held-out ALL-IDB1 it also merged touching blasts) makes them one cell that keeps the weaker one's score."""
    sess = _session()
    from allmil_cli.stages.detect import Decoding, heatmap_detections, model_meta
    from allmil_cli.stages.scale import measure_field
    from allmil_cli.train.data import load_rgb

    path = DATA / "PBC" / "eosinophil" / "EO_114903.jpg"
    if not path.exists():
        pytest.skip("shared PBC data absent")
    small = _shrunk(load_rgb(path), 20.0)
    rbc = measure_field(small).rbc_px
    x, sx, sy = prepare_input(small, rbc, 20.0)
    heat = sess.run(None, {"image": x})[0][0, 0]
    meta = model_meta(sess)
    h, w = small.shape[:2]
    shipped = heatmap_detections(heat, meta, None, w, h, sx, sy)
    assert detect_cells(sess, small, rbc) == shipped and len(shipped) == 2
    valley = heatmap_detections(heat, meta, None, w, h, sx, sy, Decoding(0.6, 1.0, 0.5, 1.0))
    assert len(valley) == 1 and valley[0].score == max(d.score for d in shipped)
    assert valley[0].merged_scores == (pytest.approx(min(d.score for d in shipped)),)
    assert np.hypot(valley[0].x - w / 2, valley[0].y - h / 2) < 0.8 * rbc  # the centred cell
    assert [d.same_as for d in shipped] == [-1, 0]  # the shipped decoding names the weaker one the stronger's twin


def test_lobed_cell_of_another_lab_is_counted_once(tmp_path):
    """The same eosinophil, shrunk to 20 px and saved as a patient's field, through ``Pipeline`` with the shipped
    models: two detections, and one white cell counted (neither is blast-like: ``allmil_cli.stages.count``)."""
    from PIL import Image

    from allmil_cli.io.discover import discover_patients
    from allmil_cli.io.report import patient_json
    from allmil_cli.pipeline import Pipeline
    from allmil_cli.stages.models import load_models
    from allmil_cli.train.data import load_rgb

    path = DATA / "PBC" / "eosinophil" / "EO_114903.jpg"
    if not path.exists():
        pytest.skip("shared PBC data absent")
    (tmp_path / "p1").mkdir()
    Image.fromarray(_shrunk(load_rgb(path), 20.0)).save(tmp_path / "p1" / "eo.png")
    patients, _ = discover_patients(tmp_path)
    r = next(iter(Pipeline(load_models(REPO / "weights", device="cpu")).run(patients)))
    cells = patient_json(r)["cells"]
    assert len(cells) == 2 and [c["same_as"] for c in cells] == [-1, 0]
    assert not any(c["blast_like"] for c in cells) and [c["merged"] for c in cells] == [False, True]
    assert r.n_cells == 1 and r.n_blast_like == 0
    # `allmil detect` lists both detections and names the twin
    from typer.testing import CliRunner

    from allmil_cli.cli.app import app

    out = tmp_path / "d.csv"
    res = CliRunner().invoke(app, ["detect", str(tmp_path), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    import csv

    assert [row["same_as"] for row in csv.DictReader(out.open())] == ["-1", "0"]
