"""The review page (``--html``): one self-contained, offline HTML file a haematologist can open or e-mail.

It holds the run (versions, sha256, date, options, execution provider, the site profile when one is used), a
sortable table of patients (call, blast-like percentage with its 95 % interval, p_all, ...), per patient the
reasoning behind the call (the rule's numbers), the most and least blast-like cells and the fields with the
detected cells boxed, and, when there are labels, the metrics, confusion matrix and ROC curve; for
``stress-test`` the recall per condition (the paper's Fig. 5).

The page is the Jinja2 template ``templates/review.html.j2`` (HTML, editable without reading this module), rendered
with autoescape on: every value is escaped unless :func:`trusted` marked it, and only allmil's own markup is (the
matplotlib SVG plots, the thumbnails' data URIs, the sort script). Images are inline JPEG data URIs, plots inline
SVG (matplotlib, optional), the table sort a few lines of inline JavaScript (``templates/sort.js``). A
Content-Security-Policy forbids any network access and any script but that one (by hash).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from allmil_cli.io import review_plots
from allmil_cli.types.results import PatientResult
from allmil_cli.io.report import write_report
from allmil_cli.io.review_capture import CellThumb, FieldThumb, Gallery

TEMPLATE = "review.html.j2"
SCRIPT = "sort.js"  # inlined as is; the CSP allows it by its sha256
PATIENT_COLUMNS = [("patient", "patient"), ("status", "status"), ("call", "call"), ("p_all", "p_all"),
                   ("images", "images"), ("cells", "cells"), ("blast_like", "blast-like"),
                   ("blast_pct", "blast % (95 % CI)"), ("qc", "QC flags"), ("skipped", "skipped files")]
METRIC_NAMES = ("accuracy", "f1", "sensitivity", "specificity", "precision", "roc_auc")


@functools.lru_cache(maxsize=1)
def _env() -> Environment:
    """The templates ship as package data (``allmil_cli/io/templates``); autoescape is on for every template."""
    return Environment(loader=PackageLoader("allmil_cli.io", "templates"), autoescape=True, undefined=StrictUndefined,
                       trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)


def trusted(markup: str | None) -> Markup | None:
    """The one place the page takes text as markup, unescaped: only what allmil itself generated (matplotlib's SVG,
    base64 data URIs, the sort script). Never pass user text (patient, folder or file names, reasons, profiles)."""
    return None if markup is None else Markup(markup)


def _script() -> str:
    return _env().loader.get_source(_env(), SCRIPT)[0]


def _data_uri(jpeg: bytes) -> Markup:
    return trusted("data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii"))


def _nan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _num(x: float | None, digits: int = 3) -> str:
    return "" if _nan(x) else f"{x:.{digits}f}"


def _pct(x: float | None) -> str:
    """A percentage as the reasons write it: whole percent from 10 % on, one decimal below."""
    return "" if _nan(x) else (f"{x:.0f}" if x >= 10 or x == 0 else f"{x:.1f}")


def _pvalue(p: float | None) -> str:
    return "" if _nan(p) else (f"{p:.3f}" if p >= 0.001 else f"{p:.1e}")


def _text(v: Any) -> str:
    """A site-profile value as one line (numbers compact, nested values as JSON); the template escapes it."""
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True, default=str, ensure_ascii=False)
    return str(v)


def _label(r: PatientResult) -> str:
    """The call when the patient was analysed, else why not (insufficient / failed)."""
    return r.call if r.ok else r.status


def run_versions(models: Any) -> dict[str, Any]:
    """Model versions (``allmil.version`` metadata of each network) and the runtime, for the page's run table."""
    import onnxruntime

    from allmil_cli.stages.models import model_files

    versions = {}
    for name, file in model_files(getattr(models, "precision", "fp32")).items():
        try:
            versions[file] = models.metadata(name).get("allmil.version", "?")
        except Exception:  # noqa: BLE001 - a session without metadata still gets a page
            versions[file] = "?"
    return {"models_version": versions, "runtime": f"onnxruntime {onnxruntime.__version__}"}


def _run_view(meta: dict[str, Any]) -> dict[str, Any]:
    opts = meta.get("options") or {}
    rows = [("tool", meta.get("tool", "")), ("command", meta.get("command", "")), ("date (UTC)", meta.get("created", "")),
            ("execution provider", meta.get("execution_provider", "")), ("runtime", meta.get("runtime", "")),
            ("detector / embedder", opts.get("precision", "")), ("input", meta.get("input", "")),
            ("weights", meta.get("weights_dir", ""))]
    versions = meta.get("models_version") or {}
    profile = meta.get("site_profile")
    if profile is not None and not isinstance(profile, dict):
        profile = {"profile": profile}
    return {
        "run_rows": [(k, v) for k, v in rows if v not in ("", None)],
        "models": [{"file": name, "sha256": digest, "version": versions.get(name)}
                   for name, digest in sorted((meta.get("models_sha256") or {}).items())],
        "options": ", ".join(f"{k}={v}" for k, v in opts.items() if v is not None),
        "site_profile": [(str(k), _text(v)) for k, v in (profile or {}).items()],
    }


def merged_note(merged: Sequence[float], twins: Sequence[float] = ()) -> str:
    """What a cell's tooltip says of what was counted as the same cell (one box, one count): the weaker detector peaks
    merged into it (their detector scores), and its twin detections counted with it (their blast scores;
    :mod:`allmil_cli.stages.count`)."""
    out = ""
    if merged:
        scores = ", ".join(f"{s:.2f}" for s in merged)
        out += f"; counted once: {len(merged)} weaker detector peak{'s' if len(merged) > 1 else ''} merged into it ({scores})"
    if twins:
        scores = ", ".join(f"{s:.3f}" for s in twins)
        out += (f"; counted once: {len(twins)} twin detection{'s' if len(twins) > 1 else ''} closer than a white cell, "
                f"neither blast-like, counted with it (blast score {scores})")
    return out


def _cells(thumbs: Sequence[CellThumb]) -> list[dict[str, Any]]:
    return [{"uri": _data_uri(c.jpeg), "score": _num(c.score), "blast_like": c.blast_like, "image": c.image,
             "title": f"{c.image} at ({c.x:.0f}, {c.y:.0f}), blast score {c.score:.3f}{merged_note(c.merged, c.twins)}"}
            for c in thumbs]


def _fields(fields: Sequence[FieldThumb]) -> list[dict[str, Any]]:
    return [{"image": f.image, "width": f.width, "height": f.height, "uri": _data_uri(f.jpeg),
             "n_blast": sum(1 for c in f.cells if c[2]), "n_merged": sum(len(c[3]) + len(c[4]) for c in f.cells),
             "boxes": [{"cls": "b" if bl else "c", "x": f"{x0:.0f}", "y": f"{y0:.0f}", "w": f"{x1 - x0:.0f}",
                        "h": f"{y1 - y0:.0f}", "score": _num(s), "merged": merged_note(m, tw)}
                       for (x0, y0, x1, y1), s, bl, m, tw in f.cells]}
            for f in fields]


def _gallery(g: Gallery | None) -> dict[str, Any] | None:
    if g is None:
        return None
    return {"note": g.note, "top": _cells(g.top), "low": _cells(g.low), "fields": _fields(g.fields),
            "more_fields": g.n_fields - len(g.fields), "crops_saved": g.crops_saved,
            "crops_folder": "" if g.crops_folder is None else str(g.crops_folder)}


def _rule(r: PatientResult) -> dict[str, str] | None:
    rule = getattr(r, "rule", None) or {}
    if not rule:
        return None
    return {"name": str(rule.get("rule", "")), "background": _pct(rule.get("background_pct")),
            "all_level": _pct(rule.get("all_pct")), "p": _pvalue(rule.get("p_excess")), "alpha": f"{rule.get('alpha', 0.01):g}",
            "confidence": f"{100 * rule.get('confidence', 0.95):.0f}"}


def _patient_view(i: int, r: PatientResult, g: Gallery | None, conditions: list[str]) -> dict[str, Any]:
    rule = _rule(r)
    pct, lo, hi = getattr(r, "blast_pct", None), getattr(r, "blast_pct_lo", None), getattr(r, "blast_pct_hi", None)
    ci = rule["confidence"] if rule else "95"
    has_pct = not _nan(pct)
    return {
        "i": i, "name": r.patient, "status": r.status, "ok": r.ok, "call": r.call, "label": _label(r),
        "p_all": _num(r.p_all, 4), "p_all_v": _num(r.p_all, 4) or -1, "n_images": r.n_images, "n_cells": r.n_cells,
        "n_blast_like": r.n_blast_like, "blast_v": f"{pct:.4f}" if has_pct else -1,
        "blast_short": f"{_pct(pct)} % ({_pct(lo)}-{_pct(hi)})" if has_pct else "",
        "blast": f"{_pct(pct)} % ({ci} % CI {_pct(lo)}-{_pct(hi)} %)" if has_pct else "",
        "cell_threshold": "" if r.cell_threshold is None else f"{r.cell_threshold:.2f}",
        "reason": r.reason, "rule": rule, "qc": list(getattr(r, "qc", None) or []),
        "problems": [im.reason for im in r.images if im.status != "ok"],
        "skipped": list(getattr(r, "skipped", None) or []), "notes": list(r.notes),
        "conditions": conditions, "gallery": _gallery(g),
    }


def _metrics_view(m: dict[str, Any], results: Sequence[PatientResult], labels: dict[str, int]) -> dict[str, Any]:
    labelled = [r for r in results if r.ok and r.patient in labels]
    calls = ["ALL", "review", "normal"]
    confusion = [(name, [sum(1 for r in labelled if labels[r.patient] == y and r.call == c) for c in calls])
                 for name, y in (("ALL", 1), ("normal", 0))]
    views = [("ALL call", m), ("screen (ALL or review)", m.get("screen")), ("p_all alone", m.get("p_all"))]
    views = [(name, v) for name, v in views if v]
    pairs = [(labels[r.patient], r.p_all) for r in labelled]
    svg = review_plots.roc_svg([a for a, _ in pairs], [b for _, b in pairs], m.get("roc_auc", float("nan")), m["threshold"])
    return {
        "n": m["n"], "n_review": m.get("n_review", sum(1 for r in labelled if r.call == "review")),
        "n_not_ok": m.get("n_not_ok", 0), "n_unlabelled": m.get("n_unlabelled", 0), "threshold": f"{m['threshold']:.3f}",
        "columns": [name for name, _ in views],
        "rows": [(k, [_num(v.get(k), 4) for _, v in views]) for k in METRIC_NAMES],
        "calls": calls, "confusion": confusion, "roc_svg": trusted(svg),
        "single_class": svg is None and review_plots.available(),
    }


def _stress_view(rows: Sequence[dict]) -> dict[str, Any]:
    return {"rows": [{"removed": review_plots.CONDITION_NAMES.get(r["removed"], r["removed"]), "recall": _num(r["recall"], 4),
                      "tp": r["tp"], "n_all": r["n_all"], "specificity": _num(r["specificity"], 4),
                      "cells_kept": r["cells_kept"], "by": r.get("by", "")} for r in rows],
            "svg": trusted(review_plots.stress_svg(rows))}


def build_page(results: Sequence[PatientResult], meta: dict[str, Any], galleries: dict[str, Gallery] | None = None,
               metrics: dict[str, Any] | None = None, labels: dict[str, int] | None = None,
               stress_rows: Sequence[dict] | None = None, stress_calls: dict[str, dict[str, str]] | None = None) -> str:
    """The whole page as one string. ``stress_calls``: patient -> {condition: call} for the stress test."""
    galleries = galleries or {}
    cond_cols = list(next(iter(stress_calls.values())).keys()) if stress_calls else []
    counts = [(sum(1 for r in results if r.ok and r.call == c), c) for c in ("ALL", "review", "normal")]
    counts += [(sum(1 for r in results if r.status == s), s) for s in ("insufficient", "failed")]
    script = _script()
    script_hash = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    columns = (PATIENT_COLUMNS + [(f"cond_{c}", f"call, {c} removed") for c in cond_cols]
               + [("reason", "reason")])
    patients = [_patient_view(i, r, galleries.get(r.patient), [(stress_calls or {}).get(r.patient, {}).get(c, "")
                                                                for c in cond_cols])
                for i, r in enumerate(results)]
    return _env().get_template(TEMPLATE).render(
        title=f"allmil review: {meta.get('command', '')}, {len(results)} patient(s)",
        csp=f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'",
        sort_js=trusted(script), counts=counts,
        n_skipped=sum(len(getattr(r, "skipped", None) or []) for r in results),
        plots_missing=review_plots.MISSING if not review_plots.available() and (metrics or stress_rows) else "",
        stress=_stress_view(stress_rows) if stress_rows else None,
        metrics=_metrics_view(metrics, results, labels or {}) if metrics else None,
        columns=columns, patients=patients, **_run_view(meta))


def write_page(path: str | Path, results: Sequence[PatientResult], meta: dict[str, Any], **kwargs: Any) -> int:
    """Build the page and write it atomically (``-``: to stdout); returns its size in bytes."""
    text = build_page(results, meta, **kwargs)
    write_report(path, text)
    return len(text.encode("utf-8"))
