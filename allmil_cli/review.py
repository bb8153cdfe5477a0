"""The review page (``--html``): one self-contained, offline HTML file a haematologist can open or e-mail.

It holds the run (versions, sha256, date, options, execution provider), a sortable table of patients,
per patient the most and least blast-like cells and the fields with the detected cells boxed, and,
when there are labels, the metrics, confusion matrix and ROC curve; for ``stress-test`` the recall per
condition (the paper's Fig. 5). Images are inline JPEG data URIs, plots inline SVG (matplotlib,
optional), the table sort a few lines of inline JavaScript. A Content-Security-Policy forbids any
network access and any script but that one (by hash), and every user string (patient, folder and file
names, reasons) is escaped.
"""

from __future__ import annotations

import base64
import hashlib
import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from allmil_cli import review_plots
from allmil_cli.pipeline import PatientResult
from allmil_cli.report import write_report
from allmil_cli.review_capture import CellThumb, FieldThumb, Gallery

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1180px;padding:16px;color:#1d1d1f;background:#fff}
h1{font-size:22px;margin:4px 0}h2{font-size:18px;margin:28px 0 6px;border-top:1px solid #ddd;padding-top:14px}h3{font-size:14px;margin:12px 0 4px;color:#444}
.warn{background:#fff4e5;border:1px solid #f0b429;padding:6px 10px;border-radius:4px}
table{border-collapse:collapse;margin:6px 0}th,td{border:1px solid #ddd;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f3f5}table.sortable th{cursor:pointer;user-select:none}table.sortable th:after{content:" \\2195";color:#aaa}
th[aria-sort=ascending]:after{content:" \\2191";color:#333}th[aria-sort=descending]:after{content:" \\2193";color:#333}
td.num{text-align:right;font-variant-numeric:tabular-nums}td.reason{max-width:420px;font-size:12px;color:#555}
.call{font-weight:600;padding:1px 6px;border-radius:3px}.call-ALL{background:#fde0dd;color:#a50f15}.call-normal{background:#e5f5e0;color:#006d2c}
.call-indeterminate,.call-insufficient,.call-failed{background:#fff7bc;color:#8c6d00}
.gallery,.fields{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0;font-size:11px;color:#444}
.cell img{width:96px;height:96px;display:block;border:3px solid #bbb;border-radius:3px}.cell.blast img{border-color:#d7301f}
.fields svg{width:320px;height:auto;display:block;border:1px solid #ccc}
rect.c{fill:none;stroke:#1a9850;stroke-width:2}rect.b{fill:none;stroke:#d7301f;stroke-width:3}
.kv td:first-child{color:#555;white-space:nowrap}code{font-size:12px;word-break:break-all}
.plots{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}.plots svg{width:380px;height:auto}
.qc{color:#8c2d04}.small{font-size:12px;color:#666}
"""

SORT_JS = """(function(){
function key(td){var v=td.getAttribute('data-v');return v===null?td.textContent.trim():v;}
function sortBy(th,desc){var t=th.closest('table'),b=t.tBodies[0],i=Array.prototype.indexOf.call(th.parentNode.children,th);
var rows=Array.prototype.slice.call(b.rows);rows.sort(function(r,s){var x=key(r.cells[i]),y=key(s.cells[i]),nx=parseFloat(x),ny=parseFloat(y);
var c=(!isNaN(nx)&&!isNaN(ny))?nx-ny:(isNaN(nx)!==isNaN(ny)?(isNaN(nx)?1:-1):x.localeCompare(y));return desc?-c:c;});
rows.forEach(function(r){b.appendChild(r);});t.querySelectorAll('th').forEach(function(h){h.removeAttribute('aria-sort');});
th.setAttribute('aria-sort',desc?'descending':'ascending');}
document.querySelectorAll('table.sortable th').forEach(function(th){th.addEventListener('click',function(){
sortBy(th,th.getAttribute('aria-sort')==='ascending');});});
var m=/^#sort=([a-z_]+)(-desc)?$/.exec(location.hash);if(m){var th=document.querySelector('table.sortable th[data-key="'+m[1]+'"]');if(th)sortBy(th,!!m[2]);}
})();"""


def e(x: Any) -> str:
    """Escape user text for HTML content and attributes."""
    return html.escape(str(x), quote=True)


def _num(x: float | None, digits: int = 3) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def _label(r: PatientResult) -> str:
    return r.call if r.ok else r.status


def run_versions(models: Any) -> dict[str, Any]:
    """Model versions (``allmil.version`` metadata of each network) and the runtime, for the page's run table."""
    import onnxruntime

    from allmil_cli.models import model_files

    versions = {}
    for name, file in model_files(getattr(models, "precision", "fp32")).items():
        try:
            versions[file] = models.metadata(name).get("allmil.version", "?")
        except Exception:  # noqa: BLE001 - a session without metadata still gets a page
            versions[file] = "?"
    return {"models_version": versions, "runtime": f"onnxruntime {onnxruntime.__version__}"}


def _run_info(meta: dict[str, Any]) -> str:
    rows = [("tool", meta.get("tool", "")), ("command", meta.get("command", "")), ("date (UTC)", meta.get("created", "")),
            ("execution provider", meta.get("execution_provider", "")), ("runtime", meta.get("runtime", "")),
            ("detector / embedder", (meta.get("options") or {}).get("precision", "")),
            ("input", meta.get("input", "")),
            ("weights", meta.get("weights_dir", ""))]
    out = ["<table class='kv'>"]
    out += [f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in rows if v not in ("", None)]
    versions = meta.get("models_version") or {}
    for name, digest in sorted((meta.get("models_sha256") or {}).items()):
        v = f" (version {versions[name]})" if name in versions else ""
        out.append(f"<tr><td>{e(name)}{e(v)}</td><td>sha256 <code>{e(digest)}</code></td></tr>")
    opts = meta.get("options") or {}
    shown = ", ".join(f"{k}={v}" for k, v in opts.items() if v is not None)
    out.append(f"<tr><td>options</td><td><code>{e(shown)}</code></td></tr></table>")
    return "\n".join(out)


def _patient_table(results: Sequence[PatientResult], extra: dict[str, dict[str, str]] | None) -> str:
    cond_cols = list(next(iter(extra.values())).keys()) if extra else []
    head = [("patient", "patient"), ("status", "status"), ("call", "call"), ("p_all", "p_all"), ("images", "images"),
            ("cells", "cells"), ("blast_like", "blast-like"), ("blast_fraction", "blast fraction"), ("qc", "QC flags"),
            ("skipped", "skipped files")] + [(f"cond_{c}", f"call, {c} removed") for c in cond_cols] + [("reason", "reason")]
    out = ["<table class='sortable' id='patients'><thead><tr>"]
    out += [f"<th data-key='{k}'>{e(t)}</th>" for k, t in head]
    out.append("</tr></thead><tbody>")
    for i, r in enumerate(results):
        qc = list(getattr(r, "qc", None) or [])
        skipped = getattr(r, "skipped", None) or []
        p = _num(r.p_all, 4)
        cells = [
            f"<td data-v='{e(r.patient)}'><a href='#p-{i}'>{e(r.patient)}</a></td>",
            f"<td>{e(r.status)}</td>",
            f"<td><span class='call call-{e(_label(r))}'>{e(_label(r))}</span></td>",
            f"<td class='num' data-v='{p or -1}'>{p}</td>",
            f"<td class='num'>{r.n_images}</td>", f"<td class='num'>{r.n_cells}</td>", f"<td class='num'>{r.n_blast_like}</td>",
            f"<td class='num' data-v='{_num(r.blast_fraction) or -1}'>{_num(r.blast_fraction)}</td>",
            f"<td class='qc' data-v='{len(qc)}'>{e(', '.join(qc))}</td>",
            f"<td class='num'>{len(skipped)}</td>",
        ]
        cells += [f"<td>{e(v)}</td>" for v in (extra or {}).get(r.patient, {c: "" for c in cond_cols}).values()]
        cells.append(f"<td class='reason'>{e(r.reason)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _cell_figures(thumbs: Sequence[CellThumb]) -> str:
    figs = []
    for c in thumbs:
        cls = "cell blast" if c.blast_like else "cell"
        title = f"{c.image} at ({c.x:.0f}, {c.y:.0f}), blast score {c.score:.3f}"
        figs.append(f"<figure class='{cls}' title='{e(title)}'><img src='{_data_uri(c.jpeg)}' alt='{e(title)}'>"
                    f"<figcaption>{_num(c.score)}{' blast-like' if c.blast_like else ''}<br>{e(c.image)}</figcaption></figure>")
    return "<div class='gallery'>" + "".join(figs) + "</div>"


def _field_figures(fields: Sequence[FieldThumb]) -> str:
    figs = []
    for f in fields:
        rects = "".join(
            f"<rect class='{'b' if bl else 'c'}' x='{x0:.0f}' y='{y0:.0f}' width='{x1 - x0:.0f}' height='{y1 - y0:.0f}' "
            f"vector-effect='non-scaling-stroke'><title>blast score {_num(s)}</title></rect>"
            for (x0, y0, x1, y1), s, bl in f.cells
        )
        figs.append(f"<figure><svg viewBox='0 0 {f.width} {f.height}' role='img' aria-label='{e(f.image)}'>"
                    f"<image href='{_data_uri(f.jpeg)}' width='{f.width}' height='{f.height}'/>{rects}</svg>"
                    f"<figcaption>{e(f.image)}: {len(f.cells)} cell(s), {sum(1 for c in f.cells if c[2])} blast-like</figcaption></figure>")
    return "<div class='fields'>" + "".join(figs) + "</div>"


def _patient_section(i: int, r: PatientResult, g: Gallery | None) -> str:
    thr = f" (cell threshold {r.cell_threshold:.2f})" if r.cell_threshold is not None else ""
    out = [f"<section id='p-{i}'><h2>{e(r.patient)} <span class='call call-{e(_label(r))}'>{e(_label(r))}</span></h2>",
           f"<p>p_all {_num(r.p_all, 4) or 'n/a'} &middot; {r.n_cells} cell(s) in {r.n_images} usable image(s) &middot; "
           f"{r.n_blast_like} blast-like{e(thr)}</p>"]
    if r.reason:
        out.append(f"<p class='warn'>{e(r.reason)}</p>")
    qc = list(getattr(r, "qc", None) or [])
    if qc:
        out.append(f"<p class='qc'>QC: {e(', '.join(qc))}</p>")
    failed = [im for im in r.images if im.status != "ok"]
    skipped = getattr(r, "skipped", None) or []
    if failed or skipped or r.notes:
        items = [f"<li>{e(im.reason)}</li>" for im in failed] + [f"<li>{e(s['file'])}: {e(s['reason'])}</li>" for s in skipped]
        items += [f"<li>{e(n)}</li>" for n in r.notes]
        out.append(f"<details><summary>{len(failed)} unusable image(s), {len(skipped)} skipped file(s), {len(r.notes)} note(s)"
                   f"</summary><ul>{''.join(items)}</ul></details>")
    if g is not None:
        if g.note:
            out.append(f"<p class='small'>{e(g.note)}</p>")
        if g.top:
            out.append(f"<h3>Most blast-like cells (top {len(g.top)} of {r.n_cells})</h3>" + _cell_figures(g.top))
        if g.low:
            out.append("<h3>Least blast-like cells, for contrast</h3>" + _cell_figures(g.low))
        if g.fields:
            more = g.n_fields - len(g.fields)
            tail = f" ({more} more not shown; the JSON report lists every cell)" if more > 0 else ""
            out.append(f"<h3>Fields with the detected cells boxed (red: blast-like){e(tail)}</h3>" + _field_figures(g.fields))
        if g.crops_folder is not None:
            out.append(f"<p class='small'>{g.crops_saved} crop(s) saved in {e(g.crops_folder)}</p>")
    out.append("</section>")
    return "\n".join(out)


def _metrics_block(metrics: dict[str, Any], results: Sequence[PatientResult], labels: dict[str, int]) -> str:
    m = metrics
    out = ["<h2>Metrics against the labels</h2>",
           f"<p>{m['n']} labelled patient(s) with a call, threshold {m['threshold']:.3f}; "
           f"{m.get('n_not_ok', 0)} failed/insufficient and {m.get('n_unlabelled', 0)} unlabelled patient(s) left out.</p>",
           "<table class='kv'>"]
    for k in ("accuracy", "f1", "sensitivity", "specificity", "precision", "roc_auc"):
        out.append(f"<tr><td>{e(k)}</td><td>{_num(m.get(k), 4)}</td></tr>")
    out.append("</table><h3>Confusion matrix</h3><table><tr><th></th><th>called ALL</th><th>called normal</th></tr>"
               f"<tr><th>ALL</th><td class='num'>{m['tp']}</td><td class='num'>{m['fn']}</td></tr>"
               f"<tr><th>normal</th><td class='num'>{m['fp']}</td><td class='num'>{m['tn']}</td></tr></table>")
    pairs = [(labels[r.patient], r.p_all) for r in results if r.ok and r.patient in labels]
    svg = review_plots.roc_svg([a for a, _ in pairs], [b for _, b in pairs], m.get("roc_auc", float("nan")), m["threshold"])
    if svg:
        out.append(f"<div class='plots'>{svg}</div>")
    elif review_plots.available():
        out.append("<p class='small'>No ROC curve: the labelled patients hold a single class.</p>")
    return "\n".join(out)


def _stress_block(rows: Sequence[dict]) -> str:
    out = ["<h2>Stress test: recall on ALL patients per condition</h2><table><tr><th>removed</th><th>recall</th>"
           "<th>ALL called</th><th>ALL patients</th><th>specificity</th><th>cells kept</th><th>cells classed by</th></tr>"]
    for r in rows:
        out.append(f"<tr><td>{e(review_plots.CONDITION_NAMES.get(r['removed'], r['removed']))}</td><td class='num'>{_num(r['recall'], 4)}</td>"
                   f"<td class='num'>{r['tp']}</td><td class='num'>{r['n_all']}</td><td class='num'>{_num(r['specificity'], 4)}</td>"
                   f"<td class='num'>{r['cells_kept']}</td><td>{e(r.get('by', ''))}</td></tr>")
    out.append("</table>")
    svg = review_plots.stress_svg(rows)
    if svg:
        out.append(f"<div class='plots'>{svg}</div>")
    out.append("<p class='small'>A model that looks at the blasts loses recall when they are removed and keeps it when "
               "normal cells are removed.</p>")
    return "\n".join(out)


def build_page(results: Sequence[PatientResult], meta: dict[str, Any], galleries: dict[str, Gallery] | None = None,
               metrics: dict[str, Any] | None = None, labels: dict[str, int] | None = None,
               stress_rows: Sequence[dict] | None = None, stress_calls: dict[str, dict[str, str]] | None = None) -> str:
    """The whole page as one string. ``stress_calls``: patient -> {condition: call} for the stress test."""
    galleries = galleries or {}
    counts = {k: sum(1 for r in results if _label(r) == k) for k in ("ALL", "normal", "indeterminate", "insufficient", "failed")}
    n_skipped = sum(len(getattr(r, "skipped", None) or []) for r in results)
    script_hash = base64.b64encode(hashlib.sha256(SORT_JS.encode()).digest()).decode()
    csp = f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'sha256-{script_hash}'"
    title = f"allmil review: {meta.get('command', '')}, {len(results)} patient(s)"
    body = [f"<h1>{e(title)}</h1>",
            "<p class='warn'>Research use only: allmil is not a medical device. Every call needs review by a haematologist.</p>",
            "<p>" + ", ".join(f"{v} {e(k)}" for k, v in counts.items() if v) + (f"; {n_skipped} file(s) skipped" if n_skipped else "") + "</p>",
            "<h2>Run</h2>", _run_info(meta)]
    if not review_plots.available() and (metrics or stress_rows):
        body.append(f"<p class='warn'>{e(review_plots.MISSING)}</p>")
    if stress_rows:
        body.append(_stress_block(stress_rows))
    if metrics:
        body.append(_metrics_block(metrics, results, labels or {}))
    body += ["<h2>Patients</h2><p class='small'>Click a column to sort; click a patient to see its cells.</p>",
             _patient_table(results, stress_calls)]
    body += [_patient_section(i, r, galleries.get(r.patient)) for i, r in enumerate(results)]
    return ("<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{csp}\">"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{e(title)}</title><style>{CSS}</style></head><body>\n" + "\n".join(body)
            + f"\n<script>{SORT_JS}</script>\n</body></html>\n")


def write_page(path: str | Path, results: Sequence[PatientResult], meta: dict[str, Any], **kwargs: Any) -> int:
    """Build the page and write it atomically (``-``: to stdout); returns its size in bytes."""
    text = build_page(results, meta, **kwargs)
    write_report(path, text)
    return len(text.encode("utf-8"))

