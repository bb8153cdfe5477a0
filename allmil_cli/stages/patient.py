"""The patient stage: one patient's evidence (cells, features, per-image entries) -> its call and quality flags.

Per-cell blast scores (the aggregator), twins counted once (:mod:`allmil_cli.stages.count`), optional removal of cells
(the stress test), the blast-like percentage rule
(:func:`allmil_cli.stages.decision.decide`), the adequacy rules and the QC flags (:mod:`allmil_cli.stages.qc`). No model runs here
but the aggregator's small networks; the evidence comes from :class:`allmil_cli.stages.analysis.FieldAnalyser`, wherever
an executor ran it.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from allmil_cli.stages.aggregate import Aggregator
from allmil_cli.stages.count import count_once
from allmil_cli.types.rule import RuleParams
from allmil_cli.stages.decision import decide
from allmil_cli.types.field import Patient
from allmil_cli.stages.labels import read_points
from allmil_cli.stages.qc import describe, patient_qc
from allmil_cli.types.results import REMOVE_CHOICES, Cell, Evidence, Options, PatientResult, StageTimer

#: The embedder's reference stain (background and red-cell colours), :func:`allmil_cli.stages.normalize.reference_from_meta`.
StainReference = tuple[tuple[float, ...], tuple[float, ...]]


class PatientCaller:
    """Turns a patient's :class:`~allmil_cli.types.results.Evidence` into its :class:`~allmil_cli.types.results.PatientResult`.

    ``rule``: the patient rule's parameters; ``cell_threshold``: the blast score at or above which a cell is blast-like;
    ``stain_reference``: the embedder's reference stain (QC compares each field's colours with it).
    """

    def __init__(self, aggregator: Aggregator, options: Options, rule: RuleParams, cell_threshold: float,
                 stain_reference: StainReference | None, timer: StageTimer) -> None:
        self.aggregator = aggregator
        self.options = options
        self.rule = rule
        self.cell_threshold = cell_threshold
        self.stain_reference = stain_reference
        self.timer = timer

    def decide(self, patient: Patient, ev: Evidence, remove: str | None = None) -> PatientResult:
        """Per-cell blast scores, optional removal (stress test), the patient call, and its quality flags.

        The call is :func:`allmil_cli.stages.decision.decide` on the blast-like count. A patient with a QC flag
        (``allmil_cli.stages.qc``) is never silently called ``normal``: the call becomes ``review`` with the flags in the reason. ``ALL`` calls stand (ruling in needs less evidence)."""
        result = self.call(patient, ev, remove)
        if result.status == "failed":
            return result
        fields = [(i.image, i.stats) for i in result.images if i.status == "ok" and i.stats is not None]
        qc = patient_qc(fields, result.n_cells, self.options.min_cells_normal, self.stain_reference)
        result.qc, result.qc_details = qc.flags, qc.details
        if result.call == "normal" and qc.flags:
            result.call = "review"
            result.reason = " ".join(x for x in (f"Would be called normal ({result.reason.rstrip('.')}), but {describe(qc)} "
                                                 "Review the fields before ruling out ALL.",) if x)
        return result

    def call(self, patient: Patient, ev: Evidence, remove: str | None = None) -> PatientResult:
        """Per-cell blast scores, optional removal (stress test), and the patient call."""
        opts = self.options
        remove = opts.remove if remove is None else remove
        if remove not in REMOVE_CHOICES:
            raise ValueError(f"remove must be one of {REMOVE_CHOICES}, not {remove!r}")
        images, feats, truth_flags = ev.images, ev.features, ev.truth_flags
        notes = list(ev.notes)
        cells = [replace(c) for c in ev.cells]
        n_ok = sum(1 for i in images if i.status == "ok")
        skipped = list(getattr(patient, "skipped", []))
        base = dict(patient=patient.name, n_images=n_ok, images=images, notes=notes, cell_threshold=self.cell_threshold,
                    skipped=skipped)
        if not patient.images:
            extra = f" ({len(skipped)} file(s) skipped: see the JSON report)" if skipped else ""
            return PatientResult(status="insufficient", call="review", p_all=float("nan"), n_cells=0,
                                 n_blast_like=0, blast_fraction=float("nan"),
                                 reason=f"no images in {patient.folder}{extra}; add JPEG/PNG/TIFF fields of this patient.", **base)
        if n_ok == 0:
            first = next((i.reason for i in images if i.reason), "no usable image")
            return PatientResult(status="failed", call="review", p_all=float("nan"), n_cells=0,
                                 n_blast_like=0, blast_fraction=float("nan"),
                                 reason=f"none of {len(images)} image(s) could be read; first problem: {first}", **base)
        X = np.concatenate(feats, axis=0)  # n_ok > 0, so at least one field's (possibly empty) features
        t = time.perf_counter()
        scores = self.aggregator.cell_scores(X)
        blast_like = scores >= self.cell_threshold
        merged = count_once([c.image for c in cells], [c.same_as for c in cells], blast_like)
        for c, s, m in zip(cells, scores, merged):
            c.blast_score, c.merged = float(s), bool(m)
        keep = ~merged
        if remove != "none" and len(cells):
            is_blast = np.concatenate(truth_flags) if opts.truth_dir is not None else blast_like
            stays = ~is_blast if remove == "blasts" else is_blast
            for c, k in zip(cells, stays):
                c.removed = not bool(k)
            keep &= stays
        kept = X[keep]
        n_blast = int(blast_like[keep].sum())
        n_cells = int(keep.sum())
        failed = [i for i in images if i.status != "ok"]
        partial = f"{len(failed)} of {len(images)} image(s) unusable (see the JSON report)." if failed else ""
        if partial:
            notes.append(f"{patient.name}: {partial}")
        if n_cells < opts.min_cells:
            self.timer.add("aggregate", t)
            why = (f"{n_cells} white cell(s) found in {n_ok} usable image(s), fewer than --min-cells {opts.min_cells}; "
                   "add fields, or check the magnification (--cell-size).")
            return PatientResult(status="insufficient", call="review", p_all=float("nan"), n_cells=n_cells,
                                 n_blast_like=n_blast, blast_fraction=float("nan"),
                                 reason=" ".join(x for x in (why, partial) if x), cells=cells,
                                 features=X if opts.keep_features else None, **base)
        p = float(self.aggregator.patient_probability(kept, seed=opts.seed))
        self.timer.add("aggregate", t)
        d = decide(n_blast, n_cells, self.rule)
        counts = dict(n_cells=n_cells, n_blast_like=n_blast, blast_fraction=n_blast / n_cells, blast_pct=d.blast_pct,
                      blast_pct_lo=d.blast_pct_lo, blast_pct_hi=d.blast_pct_hi, rule=d.evidence(self.rule), cells=cells,
                      features=X if opts.keep_features else None, **base)
        if d.call != "ALL" and n_cells < opts.min_cells_normal:  # adequacy: ruling out needs enough cells
            why = (f"only {n_cells} white cell(s), {n_blast} blast-like, in {n_ok} usable image(s): too few to rule out ALL "
                   f"(--min-cells-normal {opts.min_cells_normal}; model p_all {p:.4f}). Add fields of this patient.")
            return PatientResult(status="insufficient", call="review", p_all=float("nan"),
                                 reason=" ".join(x for x in (why, partial) if x), **counts)
        return PatientResult(status="ok", call=d.call, p_all=p, reason=" ".join(x for x in (d.reason + ".", partial) if x),
                             **counts)


def truth_blast_flags(truth_dir: Path, path: Path, cells: list[Cell], rbc_px: float) -> np.ndarray:
    """Which cells lie on a ground-truth blast centroid (``truth_dir/<image stem>.xyc``; the stress test's truth)."""
    truth = read_points(Path(truth_dir) / f"{path.stem}.xyc")
    flags = np.zeros(len(cells), dtype=bool)
    if len(truth) == 0 or not cells:
        return flags
    xy = np.asarray([(c.x, c.y) for c in cells])
    d = np.sqrt(((xy[:, None, :] - truth[None, :, :]) ** 2).sum(-1))
    return d.min(axis=1) <= 0.8 * rbc_px
