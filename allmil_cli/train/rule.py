"""Fitting the patient rule (``allmil_cli.decision``) on held-out cell scores of training folds.

Inputs: per-cell blast scores that the scoring model never trained on (``heldout.py``), each with its group
(``idb_blast``, ``idb_normal``, ``pbc_<class>``, ``bccd_wbc``). Nothing here sees a test fold: protocol 4 fits on the
other folds' cells and judges on the held-out fold; the shipped parameters are fitted on every fold's out-of-fold
scores.

How each parameter is set (anchored on the clinical criteria, numbers from the cells):

* ``cell_threshold``: the blast score at and above which a cell is blast-like. Chosen on a grid to maximise the
  chance that a patient at the ALL criterion (20 % blasts) of ``POWER_CELLS`` cells is called ALL, with the
  constraints below;
* ``background``: the upper end of the 95 % Wilson interval of the flagged rate of the *worst* normal class
  (lymphocytes, immature granulocytes, erythroblasts, ...): a benign patient of any composition shows at most this
  rate, so the excess test at level ``alpha`` calls a benign patient ALL with probability <= alpha, falling with size;
* ``alpha``: 0.01 (the target: benign patients called ALL <= 1 %);
* ``all_rate``: the largest blast-like rate at which a 20 %-blast patient of ``POWER_CELLS`` cells (blast recall and
  typical normal flag rate of the training cells) is still called ALL with probability >= ``POWER``; never below
  ``background`` + 1 point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from allmil_cli.decision import RuleParams, wilson_interval

ALL_FRACTION = 0.20  # WHO / ICC: >= 20 % blasts
POWER_CELLS = 50  # protocol 4's target: >= 20 % blasts called ALL >= 97 % at >= 50 cells
POWER = 0.97
ALPHA = 0.01
#: Normal groups whose flag rate sets the background (every normal class a benign patient's blood may be rich in).
MIN_CLASS_CELLS = 30


@dataclass(frozen=True)
class Fit:
    params: RuleParams
    cell_threshold: float
    blast_recall: float
    class_rates: dict[str, float]  # flagged rate per normal group at cell_threshold
    class_counts: dict[str, int]
    worst_class: str
    typical_rate: float  # pooled flagged rate of normal cells
    power: float  # P(ALL) of a 20 %-blast patient of POWER_CELLS cells, under the binomial model


def _binom_sf(k: int, n: int, p: float) -> float:
    """P(X >= k), X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    from scipy.special import bdtrc

    return float(bdtrc(k - 1, n, p))


def min_all_count(n: int, params: RuleParams) -> int:
    """The fewest blast-like cells of ``n`` that ``decide`` calls ALL (n + 1 when none do)."""
    for k in range(n + 1):
        if k / n >= params.all_rate and _binom_sf(k, n, params.background) < params.alpha:
            return k
    return n + 1


def fit_rule(scores: np.ndarray, groups: np.ndarray, thresholds: np.ndarray | None = None) -> Fit:
    """The rule's parameters from held-out cell scores (see the module docstring)."""
    scores = np.asarray(scores, np.float64)
    groups = np.asarray(groups)
    blast = scores[groups == "idb_blast"]
    normal_groups = [g for g in sorted(set(groups.tolist())) if g != "idb_blast" and (groups == g).sum() >= MIN_CLASS_CELLS]
    if thresholds is None:
        thresholds = np.round(np.linspace(0.50, 0.995, 100), 4)
    best: Fit | None = None
    for t in thresholds:
        r = float((blast >= t).mean())
        rates = {g: float((scores[groups == g] >= t).mean()) for g in normal_groups}
        counts = {g: int((groups == g).sum()) for g in normal_groups}
        uppers = {g: wilson_interval(int(round(rates[g] * counts[g])), counts[g])[1] for g in normal_groups}
        worst = max(uppers, key=uppers.get)
        bg = float(min(max(uppers[worst], 1e-3), 0.5))
        normal_all = np.isin(groups, normal_groups)
        typical = float((scores[normal_all] >= t).mean())
        rate20 = ALL_FRACTION * r + (1 - ALL_FRACTION) * typical
        if rate20 <= bg + 0.01:
            continue
        # the largest all_rate (on a 0.5-point grid) that keeps the power target, never below bg + 1 point
        all_rate, power = None, 0.0
        for a in np.arange(math.floor(rate20 * 200) / 200, bg + 0.01 - 1e-9, -0.005):
            params = RuleParams(background=bg, all_rate=float(round(a, 4)), alpha=ALPHA)
            pw = _binom_sf(min_all_count(POWER_CELLS, params), POWER_CELLS, rate20)
            if pw >= POWER:
                all_rate, power = float(round(a, 4)), pw
                break
            if all_rate is None or pw > power:
                power = pw
        if all_rate is None:  # the power target cannot be met at this threshold: keep the lowest ALL level
            all_rate = float(round(bg + 0.01, 4))
            power = _binom_sf(min_all_count(POWER_CELLS, RuleParams(background=bg, all_rate=all_rate, alpha=ALPHA)),
                              POWER_CELLS, rate20)
        fit = Fit(RuleParams(background=round(bg, 4), all_rate=all_rate, alpha=ALPHA), float(t), r, rates, counts, worst,
                  typical, power)
        if best is None or (fit.power, fit.params.all_rate) > (best.power, best.params.all_rate):
            best = fit
    if best is None:
        raise ValueError("no cell threshold separates blasts from normal cells well enough to fit the rule")
    return best


def describe(fit: Fit) -> str:
    rates = ", ".join(f"{g} {100 * v:.1f} % (n={fit.class_counts[g]})" for g, v in sorted(fit.class_rates.items()))
    return (f"cell threshold {fit.cell_threshold:.4f}: blast recall {100 * fit.blast_recall:.1f} %; normal flagged: {rates}; "
            f"background {100 * fit.params.background:.2f} % (upper 95 % bound of {fit.worst_class}); ALL level "
            f"{100 * fit.params.all_rate:.1f} %; alpha {fit.params.alpha}; P(ALL | 20 % blasts, {POWER_CELLS} cells) "
            f"{100 * fit.power:.1f} % (binomial model)")
