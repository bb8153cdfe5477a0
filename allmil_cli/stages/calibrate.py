"""Lab calibration: the patient rule fitted to a lab's own labelled patients (``allmil calibrate``).

Pure functions over per-patient counts (blast-like cells ``k`` of ``n`` white cells, at the model's cell threshold);
reading images and writing the profile live in :mod:`allmil_cli.io.site` and the CLI.

What a lab's patients set (the shipped rule is the starting point, :mod:`allmil_cli.stages.decision`):

* ``background``: the blast-like rate this lab's normal patients show. From the pooled rate of the normal patients and
  its one-sided 95 % upper bound, widened by how much the patients differ from one another (quasi-binomial: the number
  of cells is divided by the dispersion, Pearson chi-square over degrees of freedom, at least 1):
  *raised* to that upper bound when even the lower bound exceeds the shipped background (this lab's normal blood shows
  more blast-like cells, beyond chance: without it, its benign patients drift toward ALL); *lowered* to it when the
  upper bound is below the shipped background (enough clean cells to show this lab is cleaner); *kept* otherwise (the
  lab's cells are consistent with the shipped value: a small sample moves the rule in neither direction).
* ``all_rate``: with normal patients only, the shipped ALL level stays (raised only when the lab's background reaches
  it, and then said so). With ALL patients too, the highest ALL level, at most the shipped one, that calls the most of
  the lab's ALL patients ALL (lowered only where that gains ALL calls); never below ``background`` + 1 point.

Cross-validation: leave one patient out, fit on the rest, call the left-out patient; sensitivity (ALL called ALL)
and specificity (normal not called ALL), each with its 95 % Wilson interval and counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from allmil_cli.types.rule import RuleParams
from allmil_cli.stages.decision import decide, wilson_interval

#: Fewer normal patients than this is refused: with 10 patients free of ALL calls, the 95 % upper bound of the
#: false-ALL rate is still 28 % (Wilson); fewer gives a bound too wide to set a lab's background from.
MIN_NORMAL_PATIENTS = 10
#: The lab's background is a one-sided 95 % upper bound (two-sided 90 % Wilson), as the shipped one is.
UPPER_CONFIDENCE = 0.90
#: The command warns when an interval is wider than this (in proportion, hi - lo).
WIDE_INTERVAL = 0.30


@dataclass(frozen=True)
class Counts:
    patient: str
    label: int  # 1 ALL, 0 normal
    n_cells: int
    n_blast_like: int


@dataclass(frozen=True)
class Rate:
    """A proportion with its 95 % Wilson interval and the counts behind it."""

    value: float
    lo: float
    hi: float
    k: int
    n: int

    @classmethod
    def of(cls, k: int, n: int) -> Rate:
        lo, hi = wilson_interval(k, n)
        return cls(k / n if n else float("nan"), lo, hi, k, n)

    @property
    def wide(self) -> bool:
        return not self.n or (self.hi - self.lo) > WIDE_INTERVAL


@dataclass
class SiteFit:
    params: RuleParams
    pooled_rate: float  # normal patients' blast-like cells / their cells
    dispersion: float
    all_criterion: str  # "shipped", "raised" (normals only, background reached the shipped level) or "fitted"
    sensitivity: Rate | None  # leave-one-patient-out; None without ALL patients
    specificity: Rate
    normal_calls: Rate  # normal patients called normal (the rest: review), leave-one-patient-out
    cv_calls: list[tuple[str, int, str]] = field(default_factory=list)  # (patient, label, call when left out)
    warnings: list[str] = field(default_factory=list)
    background_how: str = "kept"  # "kept" (the shipped one), "raised" or "lowered" by this lab's normal patients


def _background(normals: list[Counts], shipped: float) -> tuple[float, float, float, str]:
    """(background, pooled rate, dispersion, how) from the normal patients (see the module docstring)."""
    k = np.array([c.n_blast_like for c in normals], float)
    n = np.array([c.n_cells for c in normals], float)
    pooled = float(k.sum() / n.sum())
    expected = n * pooled
    var = expected * (1 - pooled)
    ok = var > 0
    chi2 = float((((k - expected) ** 2)[ok] / var[ok]).sum())
    dispersion = max(1.0, chi2 / max(1, int(ok.sum()) - 1))
    n_eff = n.sum() / dispersion
    lower, upper = wilson_interval(int(round(pooled * n_eff)), max(1, int(round(n_eff))), UPPER_CONFIDENCE)
    upper = float(min(0.5, max(upper, 1e-3)))
    if lower > shipped:  # this lab's normal blood shows more blast-like cells than the shipped rule allows, beyond chance
        return upper, pooled, dispersion, "raised"
    if upper < shipped:  # enough cells to show it is cleaner than the shipped bound
        return upper, pooled, dispersion, "lowered"
    return shipped, pooled, dispersion, "kept"  # consistent with the shipped background, not precise enough to move it


def fit_rule(counts: list[Counts], shipped: RuleParams) -> tuple[RuleParams, float, float, str, str]:
    """The site's rule from its patients: (params, pooled normal rate, dispersion, how the ALL level was set, how the
    background was set)."""
    normals = [c for c in counts if c.label == 0 and c.n_cells > 0]
    alls = [c for c in counts if c.label == 1 and c.n_cells > 0]
    bg, pooled, dispersion, bg_how = _background(normals, shipped.background)
    floor = round(bg + 0.01, 4)
    if not alls:
        if shipped.all_rate >= floor:
            return RuleParams(background=round(bg, 4), all_rate=shipped.all_rate, alpha=shipped.alpha), pooled, dispersion, "shipped", bg_how
        return RuleParams(background=round(bg, 4), all_rate=floor, alpha=shipped.alpha), pooled, dispersion, "raised", bg_how
    # the highest ALL level (at most the shipped one) that calls the most of the lab's ALL patients ALL: lowered only
    # where that gains ALL calls
    levels = [float(round(a, 4)) for a in np.arange(max(shipped.all_rate, floor), floor - 1e-9, -0.005)]
    hits = [sum(decide(c.n_blast_like, c.n_cells, RuleParams(background=round(bg, 4), all_rate=a, alpha=shipped.alpha)).call
                == "ALL" for c in alls) for a in levels]
    best = levels[hits.index(max(hits))]
    how = "shipped" if best == max(shipped.all_rate, floor) and best == shipped.all_rate else "fitted"
    return RuleParams(background=round(bg, 4), all_rate=best, alpha=shipped.alpha), pooled, dispersion, how, bg_how


def fit_site(counts: list[Counts], shipped: RuleParams) -> SiteFit:
    """Fit on every patient, and cross-validate by leaving one patient out. Raises ValueError when too few."""
    usable = [c for c in counts if c.n_cells > 0]
    n_normal = sum(1 for c in usable if c.label == 0)
    if n_normal < MIN_NORMAL_PATIENTS:
        raise ValueError(
            f"{n_normal} normal patient(s) with white cells; calibration needs at least {MIN_NORMAL_PATIENTS}: with fewer, "
            "the lab's normal blast-like rate cannot be bounded (10 cleared patients free of ALL calls still leave a "
            "95 % upper bound of 28 % on the false-ALL rate). Add cleared (normal) patients to the labels file.")
    params, pooled, dispersion, how, bg_how = fit_rule(usable, shipped)
    cv: list[tuple[str, int, str]] = []
    for i, c in enumerate(usable):
        rest = usable[:i] + usable[i + 1:]
        p_i = fit_rule(rest, shipped)[0]
        cv.append((c.patient, c.label, decide(c.n_blast_like, c.n_cells, p_i).call))
    alls = [call for _, y, call in cv if y == 1]
    norms = [call for _, y, call in cv if y == 0]
    sens = Rate.of(sum(1 for x in alls if x == "ALL"), len(alls)) if alls else None
    spec = Rate.of(sum(1 for x in norms if x != "ALL"), len(norms))
    normal_calls = Rate.of(sum(1 for x in norms if x == "normal"), len(norms))
    warnings = []
    if how == "raised":
        warnings.append(f"this lab's normal patients show {100 * params.background:.1f} % blast-like cells (upper bound), at or "
                        f"above the shipped ALL level {100 * shipped.all_rate:.1f} %: the ALL level was raised to "
                        f"{100 * params.all_rate:.1f} %. Check the stain and magnification (QC flags) before using this profile.")
    if not alls:
        warnings.append("normal patients only: the profile sets what normal blood looks like in this lab and keeps the shipped "
                        "ALL criterion; sensitivity is not measured. Add confirmed ALL patients to measure it.")
    for name, r in (("sensitivity", sens), ("specificity", spec)):
        if r is not None and r.wide:
            warnings.append(f"{name} {100 * r.value:.0f} % (95 % CI {100 * r.lo:.0f}-{100 * r.hi:.0f} %, {r.k}/{r.n}) is too uncertain "
                            "to mean much: add patients (about 30 per class narrows it to +-10 points).")
    skipped = [c.patient for c in counts if c.n_cells == 0]
    if skipped:
        warnings.append(f"{len(skipped)} labelled patient(s) without white cells left out: {', '.join(skipped[:5])}"
                        + (" ..." if len(skipped) > 5 else ""))
    return SiteFit(params, pooled, dispersion, how, sens, spec, normal_calls, cv, warnings, bg_how)
