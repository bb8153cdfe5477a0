"""The terminal summary of a run: a table that fits the terminal (80 columns and up) and a counts line.

No cell wraps over more than two lines: long patient names and reasons are cut with an ellipsis (the
CSV and JSON reports hold them in full).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence

from rich import box
from rich.markup import escape
from rich.table import Table

from allmil_cli.types.results import PatientResult

MAX_LINES = 2  # per table cell
MIN_REASON = 16  # columns kept for the reason
COLOURS = {"ALL": "bold red", "normal": "green", "review": "yellow", "insufficient": "yellow", "failed": "red"}


def clip(text: str, width: int, lines: int = MAX_LINES) -> str:
    """``text`` wrapped to ``width`` columns, at most ``lines`` lines, the last one ending in '…' when cut."""
    width = max(4, width)
    wrapped = textwrap.wrap(" ".join(text.split()), width=width, break_long_words=True, break_on_hyphens=False)
    if len(wrapped) > lines:
        wrapped = wrapped[:lines]
        last = wrapped[-1]
        wrapped[-1] = (last if len(last) < width else last[: width - 1]) + "…"
    return "\n".join(wrapped)


def shown_call(r: PatientResult) -> str:
    """What the table's call column shows: the call when the patient was analysed, else why not."""
    return r.call if r.ok else r.status


def blast_pct_text(r: PatientResult) -> str:
    """'31 (22-41)': the blast-like percentage and its 95 % interval, rounded to whole percent; '' without cells."""
    if r.blast_pct is None or math.isnan(r.blast_pct):
        return ""
    return f"{r.blast_pct:.0f} ({r.blast_pct_lo:.0f}-{r.blast_pct_hi:.0f})"


def summary_table(results: Sequence[PatientResult], width: int, rows: int = 50) -> Table:
    """Per-patient table for a terminal ``width`` columns wide (the first ``rows`` patients)."""
    shown = list(results[:rows])
    widths = {
        "patient": min(24, max([7] + [len(r.patient) for r in shown])),
        "call": max([4] + [len(shown_call(r)) for r in shown]),
        "p_all": 5,
        "cells": max([5] + [len(str(r.n_cells)) for r in shown]),
        "blast": max([5] + [len(str(r.n_blast_like)) for r in shown]),
        "blast %": max([7] + [len(blast_pct_text(r)) for r in shown]),
    }
    # SIMPLE_HEAD without edges: 3 characters (padding, rule, padding) between neighbouring columns.
    overhead = 3 * len(widths)
    rest = width - overhead - sum(w for k, w in widths.items() if k != "patient")
    widths["patient"] = max(8, min(widths["patient"], rest - MIN_REASON))  # long names give way to the reason
    reason_w = max(MIN_REASON, rest - widths["patient"])
    table = Table(title="allmil: per-patient calls", title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False,
                  show_edge=False, expand=False, collapse_padding=False)
    for name, w in widths.items():
        table.add_column(name, width=w, no_wrap=True, overflow="ellipsis",
                         justify="right" if name in ("p_all", "cells", "blast", "blast %") else "left")
    table.add_column("reason", width=reason_w, no_wrap=True, overflow="ellipsis")
    for r in shown:
        p = "" if r.p_all is None or math.isnan(r.p_all) else f"{r.p_all:.3f}"
        call = shown_call(r)
        table.add_row(escape(clip(r.patient, widths["patient"], 1)), f"[{COLOURS.get(call, '')}]{call}[/]", p,
                      str(r.n_cells), str(r.n_blast_like), blast_pct_text(r), escape(clip(r.reason, reason_w)))
    return table


def counts_line(results: Sequence[PatientResult]) -> str:
    """'3 patient(s): 1 ALL, 2 normal, ...' (rich markup), with the skipped-file count when there are any."""
    counts = {k: sum(1 for r in results if r.ok and r.call == k) for k in ("ALL", "normal", "review")}
    insufficient = sum(1 for r in results if r.status == "insufficient")
    failed = sum(1 for r in results if r.status == "failed")
    skipped = sum(len(getattr(r, "skipped", None) or []) for r in results)
    line = (f"{len(results)} patient(s): [bold red]{counts['ALL']} ALL[/], [green]{counts['normal']} normal[/], "
            f"[yellow]{counts['review']} review[/], {insufficient} insufficient, {failed} failed")
    if skipped:
        line += f"; {skipped} file(s) skipped (unsupported, hidden or broken links: listed in the JSON report)"
    return line
