"""Plots for the review page, drawn by matplotlib as inline SVG (optional: ``pip install 'allmil[review]'``).

Every function returns the SVG text, or None when matplotlib is not installed; the page then says so
and shows the same numbers as tables.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence

import numpy as np

MISSING = "Plots are left out: matplotlib is not installed (pip install 'allmil[review]'); the numbers are in the tables."
CONDITION_NAMES = {"none": "nothing removed", "blasts": "blast cells removed", "normals": "normal cells removed"}


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _svg(fig) -> str:
    from matplotlib.backends.backend_svg import FigureCanvasSVG

    buf = io.StringIO()
    FigureCanvasSVG(fig).print_svg(buf)
    text = buf.getvalue()
    text = text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: the SVG sits inside HTML
    return re.sub(r'<svg ([^>]*?)width="[^"]*" height="[^"]*"', r'<svg \1', text, count=1)  # scale with the page


def _figure(width_in: float, height_in: float):
    import matplotlib
    from matplotlib.figure import Figure

    matplotlib.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "allmil", "font.size": 9})
    return Figure(figsize=(width_in, height_in))


def roc_points(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates over every threshold (ties step together)."""
    y = np.asarray(labels, dtype=int)
    s = np.asarray(scores, dtype=np.float64)
    thresholds = np.unique(s)[::-1]
    n_pos, n_neg = max(1, int((y == 1).sum())), max(1, int((y == 0).sum()))
    fpr, tpr = [0.0], [0.0]
    for t in thresholds:
        pred = s >= t
        tpr.append(float((pred & (y == 1)).sum()) / n_pos)
        fpr.append(float((pred & (y == 0)).sum()) / n_neg)
    return np.asarray(fpr), np.asarray(tpr)


def roc_svg(labels: Sequence[int], scores: Sequence[float], auc: float, threshold: float) -> str | None:
    if not available() or len(set(labels)) < 2:
        return None
    fpr, tpr = roc_points(labels, scores)
    fig = _figure(3.6, 3.4)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, color="#b2182b", lw=2, label=f"allmil (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="#999999", lw=1, ls="--", label="chance")
    y, s = np.asarray(labels), np.asarray(scores)
    op_fpr = float(((s >= threshold) & (y == 0)).sum()) / max(1, int((y == 0).sum()))
    op_tpr = float(((s >= threshold) & (y == 1)).sum()) / max(1, int((y == 1).sum()))
    ax.plot([op_fpr], [op_tpr], "o", color="#2166ac", label=f"threshold {threshold:.2f}")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"ROC, {len(y)} labelled patients")
    ax.legend(loc="lower right", frameon=False)
    fig.tight_layout()
    return _svg(fig)


def stress_svg(rows: Sequence[dict]) -> str | None:
    """Recall on ALL patients per condition, as bars (the paper's Fig. 5)."""
    if not available() or not rows:
        return None
    fig = _figure(4.2, 3.2)
    ax = fig.add_subplot()
    names = [CONDITION_NAMES.get(r["removed"], r["removed"]).replace(" removed", "\nremoved") for r in rows]
    recall = [100.0 * float(r["recall"]) for r in rows]
    colours = {"none": "#4d4d4d", "blasts": "#b2182b", "normals": "#2166ac"}
    bars = ax.bar(range(len(rows)), recall, color=[colours.get(r["removed"], "#777777") for r in rows], width=0.6)
    for bar, v, r in zip(bars, recall, rows):
        ax.text(bar.get_x() + bar.get_width() / 2, v + 1.5, f"{v:.1f} %\n({r['tp']}/{r['n_all']})", ha="center", va="bottom")
    ax.set_xticks(range(len(rows)), names)
    ax.set_ylim(0, 118)
    ax.set_ylabel("recall on ALL patients (%)")
    ax.set_title("Stress test: does the call depend on the blasts?")
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return _svg(fig)
