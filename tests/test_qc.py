"""Quality flags (allmil_cli.stages.qc) on real fields: clean, blurred, shrunk, off-stain; and a flagged patient's call."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from allmil_cli.cli.app import app
from allmil_cli.stages.qc import describe, field_flags, patient_qc
from allmil_cli.stages.scale import measure_field
from allmil_cli.train.shifts import blur, gamma, rescale

from tests.conftest import EXAMPLES, shipped_weights_or_skip


def _fields() -> list[np.ndarray]:
    return [np.asarray(Image.open(p).convert("RGB")) for p in sorted(EXAMPLES.glob("*/*.jpg"))[:4]]


def test_clean_example_fields_raise_no_flag():
    for rgb in _fields():
        flags, info = field_flags(measure_field(rgb))
        assert flags == [], info


def test_blurred_field_is_flagged():
    for rgb in _fields():
        s = measure_field(rgb)
        flags, info = field_flags(measure_field(blur(rgb, 0.08 * s.rbc_px)))
        assert "blur" in flags, info


def test_tiny_magnification_is_flagged():
    rgb = _fields()[0]
    small = rescale(rgb, 8.0 / measure_field(rgb).rbc_px)  # red cells ~8 px: below the tested 12 px
    assert "magnification" in field_flags(measure_field(small))[0]


def test_resolution_flag_for_cells_too_small_to_judge():
    """Red cells of 9 px (an example field shrunk to that known size) are too small to judge: ``resolution`` is raised;
    no example field at its own magnification raises it."""
    from allmil_cli.stages.qc import MIN_RBC_PX

    for rgb in _fields():
        assert "resolution" not in field_flags(measure_field(rgb))[0]
        small = rescale(rgb, 9.0 / measure_field(rgb).rbc_px)
        flags, info = field_flags(measure_field(small))
        assert "resolution" in flags and info["rbc_px"] < MIN_RBC_PX, info
    qc = patient_qc([("a.jpg", measure_field(small))], n_cells=10, min_cells_normal=4)
    assert "resolution" in qc.flags and qc.details["flagged_fields"]["resolution"] == ["a.jpg"]
    assert "too small to judge" in describe(qc)


def test_far_stain_is_flagged():
    rgb = _fields()[0]
    faint = gamma(rgb, 0.15)  # a washed-out stain: densities ~7x lighter than any training field
    flags, info = field_flags(measure_field(faint))
    assert "stain" in flags, info


def test_patient_qc_collects_field_flags_and_few_cells():
    rgb = _fields()[0]
    s = measure_field(rgb)
    qc = patient_qc([("a.jpg", s), ("b.jpg", measure_field(blur(rgb, 0.08 * s.rbc_px)))], n_cells=2, min_cells_normal=4)
    assert qc.flags == ["blur", "few_cells"]
    assert qc.details["flagged_fields"]["blur"] == ["b.jpg"] and qc.details["fields"]["b.jpg"]["sharpness"] < 1.7


def test_blurred_patient_is_never_called_normal(tmp_path):
    """Blurred fields raise the blur flag, and a flagged patient is never called normal."""
    shipped_weights_or_skip()
    src = sorted(p for p in EXAMPLES.iterdir() if p.is_dir())[0]
    pdir = tmp_path / "patients" / "blurred"
    pdir.mkdir(parents=True)
    for f in sorted(src.glob("*.jpg")):
        rgb = np.asarray(Image.open(f).convert("RGB"))
        Image.fromarray(blur(rgb, 0.08 * measure_field(rgb).rbc_px)).save(pdir / f.name, quality=95)
    shutil.copytree(src, tmp_path / "patients" / "clean")
    out, js = tmp_path / "r.csv", tmp_path / "r.json"
    r = CliRunner().invoke(app, ["diagnose", str(tmp_path / "patients"), "--out", str(out), "--json", str(js), "--quiet",
                                 "--workers", "1"])
    assert r.exit_code in (0, 1), r.output
    rows = {row["patient"]: row for row in csv.DictReader(open(out, newline=""))}
    assert "blur" in rows["blurred"]["qc"].split(";")
    assert rows["blurred"]["call"] != "normal"  # the reason may lead with another rule's (e.g. too few cells)
    assert rows["clean"]["qc"] == ""  # (its call is the decision rule's: normal, or review when the cells are too few)
    doc = {p["patient"]: p for p in json.loads(js.read_text())["patients"]}
    assert all(v["sharpness"] < 1.7 for v in doc["blurred"]["qc_details"]["fields"].values())
    # with a rule under which six clean cells are enough to call normal, the clean patient is normal and the blurred
    # one (same cells, none blast-like) is turned to review by its flag, with the reason saying so
    from allmil_cli.types.rule import RuleParams
    from allmil_cli.io.discover import discover_patients
    from allmil_cli.stages.models import load_models
    from allmil_cli.types.results import Options
    from allmil_cli.pipeline.runner import Pipeline

    patients, _ = discover_patients(tmp_path / "patients")
    lenient = Options(rule=RuleParams(background=0.45, all_rate=0.9), cell_threshold=1.01)
    calls = {r.patient: r for r in Pipeline(load_models(device="cpu"), lenient).run(patients)}
    assert calls["clean"].call == "normal" and calls["clean"].qc == []
    assert calls["blurred"].call == "review" and "blur" in calls["blurred"].reason and "Would be called normal" in calls["blurred"].reason


def test_field_without_red_cells_raises_ruler_and_stain():
    """A non-smear image (here a real field's grey levels only: no red cells, no colour) cannot be measured."""
    grey = np.asarray(Image.fromarray(_fields()[0]).convert("L").convert("RGB"))
    flags, info = field_flags(measure_field(grey))
    assert "ruler" in flags and "stain" in flags, info


def test_jpeg_quality_is_read_from_the_quantisation_tables(tmp_path):
    from allmil_cli.stages.images import jpeg_quality, load_fields

    rgb = _fields()[0]
    for q in (50, 70, 75, 90, 95):
        Image.fromarray(rgb).save(tmp_path / f"q{q}.jpg", quality=q)
        with Image.open(tmp_path / f"q{q}.jpg") as im:
            assert abs(jpeg_quality(im) - q) <= 1
        assert abs(load_fields(tmp_path / f"q{q}.jpg")[0][0].jpeg_quality - q) <= 1
    Image.fromarray(rgb).save(tmp_path / "f.png")
    assert load_fields(tmp_path / "f.png")[0][0].jpeg_quality is None
    assert all(abs(jpeg_quality(Image.open(p)) - 75) <= 1 for p in sorted(EXAMPLES.glob("*/*.jpg"))[:3])  # BCCD: 75


def test_compression_flag_where_jpeg_and_low_resolution_meet():
    from allmil_cli.stages.qc import JPEG_FLOORS, MIN_RBC_PX, jpeg_floor
    from allmil_cli.types.field import FieldStats

    def flags(rbc: float, q: int | None) -> list[str]:
        return field_flags(FieldStats(rbc_px=rbc, jpeg_quality=q))[0]

    assert jpeg_floor(None) == MIN_RBC_PX and jpeg_floor(100) == MIN_RBC_PX
    floors = [px for _, px in JPEG_FLOORS]
    assert floors == sorted(floors, reverse=True) and min(floors) > MIN_RBC_PX  # more compression, larger cells needed
    for quality, floor in JPEG_FLOORS:
        assert jpeg_floor(quality) == floor
        assert "compression" in flags(floor - 0.5, quality) and "compression" in flags(MIN_RBC_PX, quality)
        assert "compression" not in flags(floor, quality)  # large enough cells: judged as any field
        assert "compression" not in flags(floor - 0.5, None)  # not a JPEG: PNG, TIFF
    last = JPEG_FLOORS[-1][0]
    assert "compression" not in flags(MIN_RBC_PX + 0.5, last + 1)  # above the last row: only the resolution floor
    below = flags(MIN_RBC_PX - 1, 30)
    assert "resolution" in below and "compression" not in below  # one flag for one cause
    assert field_flags(FieldStats(rbc_px=20.0, jpeg_quality=70))[1]["jpeg_quality"] == 70


def test_compressed_low_resolution_patient_is_flagged_and_never_normal(tmp_path):
    """The example fields shrunk to 20 px red cells: saved as JPEG 70 they raise ``compression`` (and the patient is not
    called normal); the same pixels saved as PNG do not."""
    shipped_weights_or_skip()
    src = sorted(p for p in EXAMPLES.iterdir() if p.is_dir())[0]
    for kind in ("jpeg70", "png"):
        (tmp_path / "patients" / kind).mkdir(parents=True)
    for f in sorted(src.glob("*.jpg")):
        rgb = np.asarray(Image.open(f).convert("RGB"))
        small = Image.fromarray(rescale(rgb, 20.0 / measure_field(rgb).rbc_px))
        small.save(tmp_path / "patients" / "jpeg70" / f.name, quality=70)
        small.save(tmp_path / "patients" / "png" / (f.stem + ".png"))
    out, js = tmp_path / "r.csv", tmp_path / "r.json"
    r = CliRunner().invoke(app, ["diagnose", str(tmp_path / "patients"), "--out", str(out), "--json", str(js), "--quiet",
                                 "--workers", "1"])
    assert r.exit_code in (0, 1), r.output
    rows = {row["patient"]: row for row in csv.DictReader(open(out, newline=""))}
    assert "compression" in rows["jpeg70"]["qc"].split(";") and rows["jpeg70"]["call"] != "normal"
    assert "compression" not in rows["png"]["qc"].split(";")
    # under a rule where these cells would suffice for a normal call, the flag turns it into review, saying why
    from allmil_cli.io.discover import discover_patients
    from allmil_cli.pipeline import Pipeline
    from allmil_cli.stages.models import load_models
    from allmil_cli.types.results import Options
    from allmil_cli.types.rule import RuleParams

    patients, _ = discover_patients(tmp_path / "patients")
    lenient = Options(rule=RuleParams(background=0.45, all_rate=0.9), cell_threshold=1.01, min_cells_normal=1)
    calls = {r.patient: r for r in Pipeline(load_models(device="cpu"), lenient).run(patients)}
    assert calls["jpeg70"].call == "review" and "JPEG compression at low resolution" in calls["jpeg70"].reason
    assert calls["png"].call == "normal" or "compression" not in calls["png"].qc
    doc = {p["patient"]: p for p in json.loads(js.read_text())["patients"]}
    assert {v["jpeg_quality"] for v in doc["jpeg70"]["qc_details"]["fields"].values()} == {70}
    assert all("jpeg_quality" not in v for v in doc["png"]["qc_details"]["fields"].values())
