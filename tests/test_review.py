"""The --html review page and --crops-dir, on the shipped BCCD example fields with tiny real ONNX models.

The page is parsed (html.parser) and, when Debian's chromium is installed, rendered headless: the
screenshot must show the thumbnails, and the inline table sort must run under the page's CSP.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from allmil_cli.cli.app import app
from allmil_cli.io.discover import discover_patients
from allmil_cli.stages.models import load_models
from allmil_cli.pipeline.runner import Pipeline
from allmil_cli.io.review_capture import CELL_PX, FIELD_PX, ReviewCollector

runner = CliRunner()
XSS = "<img src=x onerror=alert(1)>"
XSS_FILE = "x'\"><svg onload=alert(2)>.jpg"


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


class Page(HTMLParser):
    """Every start tag with its attributes, and the page's text."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.scripts: list[str] = []
        self._in_script = False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        (self.scripts if self._in_script else self.text).append(data)

    def all(self, tag: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.tags if t == tag]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def plain(fragment: str) -> str:
    """The text a reader sees of an HTML fragment: tags dropped, entities decoded, white space collapsed."""
    return " ".join(" ".join(Page(fragment).text).split())


def pct(x: float) -> str:
    """A percentage as allmil_cli.stages.decision writes it in the reasons."""
    return f"{x:.0f}" if x >= 10 or x == 0 else f"{x:.1f}"


def browser(*args: str) -> subprocess.CompletedProcess:
    exe = chromium()
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def labelled_page(tmp_path_factory, tiny_weights):
    """diagnose --html --labels --json on the example patients (once for the module)."""
    from tests.conftest import EXAMPLES

    tmp = tmp_path_factory.mktemp("review")
    labels = tmp / "labels.csv"
    labels.write_text("patient,label\npatient_A,ALL\npatient_B,normal\npatient_C,normal\n")
    r = run("diagnose", EXAMPLES, "--out", tmp / "r.csv", "--json", tmp / "r.json", "--html", tmp / "review.html",
            "--labels", labels, "--weights", tiny_weights, "--quiet", "--min-cells-normal", "0")
    assert r.exit_code == 0, r.output
    return tmp / "review.html", json.loads((tmp / "r.json").read_text())


def test_page_is_self_contained_and_complete(labelled_page):
    path, doc = labelled_page
    text = path.read_text(encoding="utf-8")
    page = Page(text)
    # nothing is fetched: every image is a data URI, no stylesheet or script file, a CSP that forbids the network
    imgs = page.all("img")
    assert imgs and all(a["src"].startswith("data:image/jpeg;base64,") for a in imgs)
    assert all(a["href"].startswith("data:image/jpeg;base64,") for a in page.all("image"))
    assert not page.all("link") and all("src" not in a for a in page.all("script")) and len(page.all("script")) == 1
    assert not re.search(r"""(src|href)=['"]?(https?:|//)""", text)
    csp = next(a["content"] for a in page.all("meta") if a.get("http-equiv") == "Content-Security-Policy")
    assert "default-src 'none'" in csp and "img-src data:" in csp
    digest = base64.b64encode(hashlib.sha256(page.scripts[0].encode()).digest()).decode()
    assert f"'sha256-{digest}'" in csp  # the one inline script is allowed by hash, nothing else is
    # run information
    body = " ".join(page.text)
    for name, sha in doc["models_sha256"].items():
        assert sha in body and f"{name} (version 1)" in body  # tiny models carry allmil.version 1
    assert "onnxruntime " in body
    assert doc["execution_provider"] in body and doc["version"] in body and "min_cells_normal=0" in body
    # the patient table: one row per patient, sortable, with the calls of the JSON
    assert [a["data-key"] for a in page.all("th") if a.get("data-key")][:10] == ["patient", "status", "call", "p_all", "images", "cells",
                                                              "blast_like", "blast_pct", "qc", "skipped"]
    rows = re.findall(r"<tr>\s*<td data-v='([^']*)'><a href='#p-(\d+)'>", text)
    assert [name for name, _ in rows] == [p["patient"] for p in doc["patients"]]
    counts = {c: sum(1 for p in doc["patients"] if p["status"] == "ok" and p["call"] == c) for c in ("ALL", "review", "normal")}
    assert f"{counts['ALL']} ALL, {counts['review']} review, {counts['normal']} normal, 0 insufficient, 0 failed" in body
    assert "indeterminate" not in text
    # per patient: cell thumbnails (top 12, with scores) and every shown field with one box per detected cell
    for i, p in enumerate(doc["patients"]):
        section = text[text.index(f"<section id='p-{i}'>"):]
        section = section[: section.index("</section>")]
        words = plain(section)
        # the blast-like percentage with its 95 % interval (the JSON's numbers), the reason and the rule's numbers
        assert f"{pct(p['blast_pct'])} % (95 % CI {pct(p['blast_pct_lo'])}-{pct(p['blast_pct_hi'])} %) blast-like" in words
        assert p["reason"] in words and p["reason"].startswith(f"{pct(p['blast_pct'])} % blast-like (95 % CI")
        assert f"normal blood (background) {pct(p['rule']['background_pct'])} % blast-like" in words
        assert f"ALL level {pct(p['rule']['all_pct'])} % blast-like" in words
        shown_p = float(re.search(r"more blast-like than normal blood\? p = ([0-9.e+-]+) ", words).group(1))
        assert shown_p == pytest.approx(p["rule"]["p_excess"], rel=0.05, abs=5e-4)
        row = plain(re.search(rf"<tr>\s*<td data-v='{p['patient']}'>.*?</tr>", text, flags=re.S).group(0))
        assert f"{pct(p['blast_pct'])} % ({pct(p['blast_pct_lo'])}-{pct(p['blast_pct_hi'])})" in row and p["call"] in row
        n_thumbs = section.count("<figure class='cell")
        assert n_thumbs == min(len(p["cells"]), 12 + 4)
        top_scores = sorted((c["blast_score"] for c in p["cells"]), reverse=True)[:12]
        shown = [float(s) for s in re.findall(r"<figcaption>([0-9.]+)", section)][: len(top_scores)]
        assert shown == pytest.approx(top_scores, abs=6e-4)
        for svg in re.findall(r"<svg viewBox='0 0 640 480'.*?</svg>", section, flags=re.S):
            label = re.search(r"aria-label='([^']*)'", svg).group(1)
            assert svg.count("<rect") == sum(1 for c in p["cells"] if c["image"] == label)
    # labels: metrics, confusion matrix, ROC curve as inline SVG
    m = doc["metrics"]
    assert "Confusion matrix" in body and f"{m['accuracy']:.4f}" in body
    cm = re.search(r"<tr><th>ALL</th><td class='num'>(\d+)</td><td class='num'>(\d+)</td><td class='num'>(\d+)</td></tr>\s*"
                   r"<tr><th>normal</th><td class='num'>(\d+)</td><td class='num'>(\d+)</td><td class='num'>(\d+)</td>", text)
    a_all, a_review, a_normal, n_all, n_review, n_normal = (int(x) for x in cm.groups())
    assert (a_all, a_review + a_normal, n_all, n_review + n_normal) == (m["tp"], m["fn"], m["fp"], m["tn"])
    assert (a_review + n_review, a_normal + n_normal) == (m["n_review"], m["screen"]["tn"] + m["screen"]["fn"])
    assert "ROC, 3 labelled patients" in text and f"AUC {m['roc_auc']:.3f}" in text


def test_thumbnails_are_small_jpegs(labelled_page):
    path, doc = labelled_page
    text = path.read_text()
    sizes = []
    for b64 in re.findall(r"data:image/jpeg;base64,([A-Za-z0-9+/=]+)", text):
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            assert im.format == "JPEG"
            sizes.append(im.size)
    assert (CELL_PX, CELL_PX) in sizes and max(max(s) for s in sizes) <= FIELD_PX
    # small enough to e-mail for 20 patients: well under 150 kB per patient with 5 fields each
    assert path.stat().st_size / len(doc["patients"]) < 150_000


def test_user_strings_are_escaped(patients_dir, tiny_weights, tmp_path):
    evil = patients_dir / XSS
    (patients_dir / "patient_A").rename(evil)
    (evil / "BloodImage_00007.jpg").rename(evil / XSS_FILE)
    html_path = tmp_path / "review.html"
    r = run("diagnose", patients_dir, "--out", tmp_path / "r.csv", "--html", html_path, "--weights", tiny_weights, "--quiet")
    assert r.exit_code == 0, r.output
    text = html_path.read_text(encoding="utf-8")
    page = Page(text)
    assert not any(k.startswith("on") for _, attrs in page.tags for k in attrs)  # no event handler got in
    assert all(a["src"].startswith("data:") for a in page.all("img"))  # no <img src=x>
    assert not page.all("svg") or all(a.get("viewbox") or a.get("viewBox") for a in page.all("svg"))
    body = "".join(page.text)
    assert XSS in body and XSS_FILE in body  # shown as text
    if chromium():
        dom = browser("--virtual-time-budget=2000", "--dump-dom", html_path.as_uri()).stdout
        assert "<img src=\"x\"" not in dom and "onerror" not in dom.replace("onerror=alert(1)&gt;", "")


def test_page_renders_in_headless_chromium_and_sorts(labelled_page, tmp_path):
    path, doc = labelled_page
    shot = tmp_path / "shot.png"
    p = browser("--window-size=1200,4000", f"--screenshot={shot}", path.as_uri())
    assert shot.exists(), p.stderr[-2000:]
    a = np.asarray(Image.open(shot).convert("RGB")).astype(np.int16)
    assert a.shape[:2] == (4000, 1200)
    not_white = (a.min(axis=2) < 235).mean()
    assert not_white > 0.05, f"screenshot nearly blank ({not_white:.3f} non-white)"
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    stain = ((b - g > 25) & (r - g > 10)).mean()  # purple/pink smear pixels: the thumbnails were drawn
    assert stain > 0.005, f"no smear colours on screen ({stain:.4f})"
    # the inline sort runs (allowed by the CSP hash): #sort=patient-desc reverses the table
    dom = browser("--virtual-time-budget=3000", "--dump-dom", path.as_uri() + "#sort=patient-desc").stdout
    order = re.findall(r'href="#p-\d+">([^<]+)</a>', dom)
    assert order == sorted((p["patient"] for p in doc["patients"]), reverse=True)
    assert 'aria-sort="descending"' in dom


def rule_results():
    """Four patients through the real patient rule: ALL, normal, review and a failed one, with user text in the way."""
    from allmil_cli.types.rule import RuleParams
    from allmil_cli.stages.decision import decide
    from allmil_cli.types.results import PatientResult

    rule = RuleParams(background=0.10, all_rate=0.20)
    out = []
    for name, k, n in ((XSS, 27, 86), ("p_five", 2, 200), ("p_fifteen", 15, 100)):
        d = decide(k, n, rule)
        out.append(PatientResult(patient=name, status="ok", call=d.call, p_all=0.5, n_images=2, n_cells=n, n_blast_like=k,
                                 blast_fraction=k / n, reason=d.reason, blast_pct=d.blast_pct, blast_pct_lo=d.blast_pct_lo,
                                 blast_pct_hi=d.blast_pct_hi, rule=d.evidence(rule), qc=[XSS]))
    out.append(PatientResult(patient="p_failed", status="failed", call="review", p_all=float("nan"), n_images=0, n_cells=0,
                             n_blast_like=0, blast_fraction=float("nan"), reason=f"no readable image: {XSS_FILE}"))
    return out


PROFILE = {"path": "/labs/<b>ours</b>.json", "sha256": "ab" * 32, "lab": XSS, "background": 0.0834, "n_cells": 1200}


def test_page_shows_the_rule_calls_and_site_profile_escaped(tmp_path):
    from allmil_cli.io.review import build_page

    results = rule_results()
    assert [r.call for r in results] == ["ALL", "normal", "review", "review"]
    text = build_page(results, {"command": "diagnose", "site_profile": PROFILE})
    page = Page(text)
    body = plain(text)
    assert "3 review" not in body and "1 ALL, 1 review, 1 normal, 0 insufficient, 1 failed" in body
    assert "indeterminate" not in text
    # user text stays text: no tag or handler from a name, a reason, a QC flag or the site profile got in
    assert {t for t, _ in page.tags} <= {"html", "head", "meta", "title", "style", "body", "h1", "h2", "h3", "p", "table", "tr",
                                         "td", "th", "thead", "tbody", "a", "span", "section", "strong", "code", "em",
                                         "details", "summary", "ul", "li", "script"}
    assert not any(k.startswith("on") for _, attrs in page.tags for k in attrs)
    assert body.count(XSS) >= 4 and XSS_FILE in body and "<b>" not in text
    # the site profile, every key and value, in the run information
    block = plain(re.search(r"<h3>Site profile</h3>.*?</table>", text, flags=re.S).group(0))
    for key, value in (("path", "/labs/<b>ours</b>.json"), ("sha256", "ab" * 32), ("lab", XSS), ("background", "0.0834"),
                       ("n_cells", "1200")):
        assert f"{key} {value}" in block
    assert "Site profile" not in build_page(results, {"command": "diagnose"})
    # per patient: the call's reasoning, the blast-like percentage and its interval as the reason states them
    for i, r in enumerate(results):
        section = plain(text[text.index(f"<section id='p-{i}'>"): text.index("</section>", text.index(f"<section id='p-{i}'>"))])
        assert r.reason in section and f"{r.call}" in section
        if r.ok:
            m = re.match(r"([0-9.]+) % blast-like \(95 % CI ([0-9.]+)-([0-9.]+) %\) of (\d+) cells", r.reason)
            assert f"{m[1]} % (95 % CI {m[2]}-{m[3]} %) blast-like" in section
            assert "normal blood (background) 10 % blast-like" in section and "ALL level 20 % blast-like" in section
            assert f"p = {r.rule['p_excess']:.1e}" in section or f"p = {r.rule['p_excess']:.3f}" in section
        else:
            assert "failed" in section and "normal blood (background)" not in section
    # the table: call badges (review amber, as styled), blast % cells sortable by the number
    cells = re.findall(r"<td class='num' data-v='([^']*)'>([^<]*)</td>\s*<td class='qc'", text)
    assert [float(v) for v, _ in cells] == pytest.approx([r.blast_pct if r.ok else -1 for r in results], abs=1e-3)
    want = [re.sub(r"^([0-9.]+) % blast-like \(95 % CI ([0-9.]+)-([0-9.]+) %\).*", r"\1 % (\2-\3)", r.reason) if r.ok else ""
            for r in results]
    assert [shown for _, shown in cells] == want and want[0] == "31 % (23-42)"
    assert ".call-review{" in text and text.count("class='call call-review'") == 4


def test_blast_percentage_sorts_as_a_number_in_chromium(tmp_path):
    from allmil_cli.io.review import write_page

    path = tmp_path / "rule.html"
    write_page(path, rule_results(), {"command": "diagnose", "site_profile": PROFILE})
    dom = browser("--virtual-time-budget=3000", "--dump-dom", path.as_uri() + "#sort=blast_pct-desc").stdout
    assert [int(i) for i in re.findall(r'href="#p-(\d+)"', dom)] == [0, 2, 1, 3]  # 31 %, 15 %, 5.0 %, no cells
    assert "<img src=\"x\"" not in dom and 'aria-sort="descending"' in dom


def test_template_ships_with_autoescape_and_one_trusted_place():
    from importlib.resources import files

    from allmil_cli.io import review

    template = files("allmil_cli.io").joinpath("templates", review.TEMPLATE).read_text(encoding="utf-8")
    code = re.sub(r"\{#.*?#\}", "", template, flags=re.S).replace(" ", "")  # the template without its comments
    assert review._env().autoescape is True and "|safe" not in code and "autoescapefalse" not in code
    source = (files("allmil_cli.io") / "review.py").read_text(encoding="utf-8")
    assert source.count("Markup(") == 1  # only trusted() marks markup safe


def test_page_without_matplotlib_has_tables_and_a_note(patients_dir, tiny_weights, tmp_path, monkeypatch):
    from allmil_cli.io import review_plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert not review_plots.available()
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_A,ALL\npatient_B,normal\npatient_C,normal\n")
    r = run("diagnose", patients_dir, "--out", tmp_path / "r.csv", "--html", tmp_path / "p.html", "--labels", labels,
            "--weights", tiny_weights, "--quiet")
    assert r.exit_code == 0, r.output
    text = (tmp_path / "p.html").read_text()
    assert review_plots.MISSING.split(":")[0] in text and "Confusion matrix" in text
    assert "ROC, " not in text and "<figure class='cell" in text


def test_stress_test_page_draws_recall_per_condition(patients_dir, tiny_weights, tmp_path):
    labels = tmp_path / "labels.csv"
    labels.write_text("patient_A,ALL\npatient_B,ALL\npatient_C,normal\n")
    out, page_path = tmp_path / "stress.csv", tmp_path / "stress.html"
    r = run("stress-test", patients_dir, "--labels", labels, "--out", out, "--html", page_path, "--weights", tiny_weights,
            "--quiet")
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(out)))
    text = page_path.read_text()
    assert "Stress test: does the call depend on the blasts?" in text  # the plot's title (matplotlib SVG)
    for row in rows:
        tp, n_all = int(row["tp"]), int(row["n_all"])
        assert f"{100 * float(row['recall']):.1f} %" in text and f"({tp}/{n_all})" in text
    assert [a.get("data-key") for a in Page(text).all("th") if (a.get("data-key") or "").startswith("cond_")] == \
        ["cond_none", "cond_blasts", "cond_normals"]
    assert text.count("<section id='p-") == 3


def test_crops_dir_saves_top_cells_as_png(patients_dir, tiny_weights, tmp_path):
    crops = tmp_path / "crops" / "new"
    r = run("diagnose", patients_dir, "--out", tmp_path / "r.csv", "--json", tmp_path / "r.json", "--crops-dir", crops,
            "--weights", tiny_weights, "--quiet")
    assert r.exit_code == 0, r.output
    doc = json.loads((tmp_path / "r.json").read_text())
    for p in doc["patients"]:
        index = list(csv.DictReader(open(crops / p["patient"] / "cells.csv")))
        assert len(index) == min(12, len(p["cells"]))
        want = sorted((c["blast_score"] for c in p["cells"]), reverse=True)[: len(index)]
        assert [float(row["blast_score"]) for row in index] == pytest.approx(want, abs=1e-4)
        for row in index:
            with Image.open(crops / p["patient"] / row["file"]) as im:
                assert im.format == "PNG" and im.size == (224, 224)
                assert np.asarray(im).std() > 10  # a real smear crop, not a blank
    assert not (tmp_path / "review.html").exists()


def test_results_analysed_elsewhere_are_captured_by_reading_again(tiny_weights):
    """A result from a Ray actor or a resumed journal has no captured fields: the collector reads them again."""
    from tests.conftest import EXAMPLES

    patients, _ = discover_patients(EXAMPLES)
    live = ReviewCollector(review=True)
    results = list(Pipeline(load_models(tiny_weights, device="cpu"), on_field=live.on_field).run(patients, on_done=live.finish))
    later = ReviewCollector(review=True, patients=patients)
    for r in results:
        later.finish(r)
    assert later.n_reread == len(patients) and live.n_reread == 0
    for r in results:
        a, b = live.galleries[r.patient], later.galleries[r.patient]
        assert [c.index for c in a.top] == [c.index for c in b.top] and len(a.top) == min(12, r.n_cells)
        for x, y in zip(a.top, b.top):  # the same cells, cut from the same pixels (the JSON's ruler is rounded to 0.1 px)
            ix, iy = (np.asarray(Image.open(io.BytesIO(c.jpeg))).astype(np.float64) for c in (x, y))
            assert np.abs(ix - iy).mean() < 6.0
        assert [f.jpeg for f in a.fields] == [f.jpeg for f in b.fields] and a.fields


def test_cells_counted_once_show_their_merged_peaks(tiny_weights):
    """One box per cell; a box whose cell took in weaker heatmap peaks says so, with their scores (issue 17)."""
    from allmil_cli.io.review import build_page
    from tests.conftest import EXAMPLES

    patients, _ = discover_patients(EXAMPLES)
    collector = ReviewCollector(review=True)
    results = list(Pipeline(load_models(tiny_weights, device="cpu"), on_field=collector.on_field).run(patients[:1]))
    r = results[0]
    r.cells[0].merged_scores = (0.41, 0.33)
    collector.finish(r)
    text = build_page(results, {"command": "diagnose"}, galleries=collector.galleries)
    note = "counted once: 2 weaker detector peaks merged into it (0.41, 0.33)"
    boxes = re.findall(r"<rect [^>]*><title>([^<]*)</title></rect>", text)
    shown = collector.galleries[r.patient].fields
    assert len(boxes) == sum(len(f.cells) for f in shown) > 0  # one box per counted cell of the fields shown
    assert sum(note in b for b in boxes) == 1
    per_field = [sum(len(c[3]) + len(c[4]) for c in f.cells) for f in shown]
    assert max(per_field) >= 2
    for f, n in zip(shown, per_field):
        caption = re.search(rf"<figcaption>{re.escape(f.image)}: [^<]*</figcaption>", text).group(0)
        assert (f"({n} weaker detector peak(s) or twin detection(s) counted once with their cells)" in caption) == (n > 0)
    assert sum(note in t for t in re.findall(r"<figure class='cell[^']*' title='([^']*)'", text)) == 1


def test_a_twin_counted_once_gets_no_box_of_its_own(tiny_weights):
    """A detection counted with its twin (Cell.merged, allmil_cli.stages.count) is not boxed or shown on its own: the
    twin's box says what was counted with it."""
    from allmil_cli.io.review import build_page
    from tests.conftest import EXAMPLES

    patients, _ = discover_patients(EXAMPLES)
    collector = ReviewCollector(review=True)
    results = list(Pipeline(load_models(tiny_weights, device="cpu"), on_field=collector.on_field).run(patients[:1]))
    r = results[0]
    images = [c.image for c in r.cells]
    k = next(i for i in range(1, len(images)) if images[i] == images[i - 1])  # the second cell of a field
    start = images.index(images[k])
    r.cells[k].same_as, r.cells[k].merged = k - 1 - start, True
    collector.finish(r)
    text = build_page(results, {"command": "diagnose"}, galleries=collector.galleries)
    gallery = collector.galleries[r.patient]
    shown = [f for f in gallery.fields if f.image == images[k]]
    assert len(shown) == 1  # that field is among the thumbnails (the example's fields with the most blast-like cells)
    for f in shown:
        assert len(f.cells) == images.count(images[k]) - 1  # one box for the pair
        assert [len(c[4]) for c in f.cells].count(1) == 1
    note = f"twin detection closer than a white cell, neither blast-like, counted with it (blast score {r.cells[k].blast_score:.3f})"
    boxes = re.findall(r"<rect [^>]*><title>([^<]*)</title></rect>", text)
    assert len(boxes) == sum(len(f.cells) for f in gallery.fields) > 0
    assert sum(note in b for b in boxes) == len(shown)
    assert k not in [c.index for c in gallery.top + gallery.low]  # never shown as a cell of its own
