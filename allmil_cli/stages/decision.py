"""The patient decision: a blast-like percentage with its uncertainty, and a call that holds as a lab scans more.

A patient's evidence is a count: ``k`` of its ``n`` white cells score at or above the cell threshold ("blast-like").
The blast-like percentage ``100 k / n`` is reported with its 95 % Wilson score interval. The call compares the count
with two rates measured on held-out cells (``weights/MODEL_CARD.md``, *Patient rule*):

* ``background``: the blast-like rate that normal blood shows (the model's per-cell false-positive rate on held-out
  normal white cells, lymphocyte-rich and immature mixes included; a healthy person's blood holds no blasts);
* ``all_rate``: the blast-like rate at and above which the count meets the ALL criterion (WHO/ICC: >= 20 % blasts),
  expressed on the model's scale: between ``background`` and the rate a 20 %-blast patient shows.

Calls:

* ``ALL``: the blast-like rate exceeds ``background`` with strong evidence (one-sided exact binomial test,
  p < ``alpha``) **and** the blast-like percentage is at least ``all_rate``;
* ``review``: the rate exceeds ``background`` (same test) but the percentage is below ``all_rate``: blast-like cells
  beyond what normal blood shows but short of the ALL criterion (a haematologist and flow cytometry decide);
* ``normal``: the upper end of the 95 % interval is at most ``background``: the count is what normal blood shows, with
  enough cells to exclude a small blast population (with none blast-like and a 2.2 % background, 170 cells: ruling
  out needs far more cells than ruling in, as a manual 200-cell differential does);
* ``review`` otherwise: too few cells to exclude a small blast population.

Why it is consistent: for a fixed mix of cells the blast-like fraction converges to its rate ``r`` as cells are
added. A benign mix (``r <= background < all_rate``) can then only drift away from ``ALL`` (the point estimate
settles below ``all_rate`` and the test rejects ever more rarely when ``r < background``) and toward ``normal``
(the interval narrows below ``background`` when ``r`` is below it); a mix at the ALL criterion (``r > all_rate``) converges to ``ALL``; a mix in
between converges to ``review``. The old rule (any bag holding one blast-like cell is ALL, bags combined by ``max``)
did the opposite: the more cells, the surer of ALL.

The paper's LSTM still gives ``p_all`` (reported, not the call). A stage function over plain numbers: no models, no
I/O; :func:`decide` is what ``Pipeline`` calls and what protocol 4 (``allmil_cli.train.protocol4``) evaluates.
"""

from __future__ import annotations

import math
from statistics import NormalDist

from allmil_cli.types.rule import CONFIDENCE, Decision, RuleParams

def wilson_interval(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Two-sided Wilson score interval for a binomial proportion k/n (equals scipy.stats.binomtest(k, n)
    .proportion_ci(confidence, 'wilson'); tested). (nan, nan) for n = 0."""
    if n <= 0:
        return float("nan"), float("nan")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (0.0 if k <= 0 else max(0.0, centre - half)), (1.0 if k >= n else min(1.0, centre + half))


def excess_pvalue(k: int, n: int, background: float) -> float:
    """One-sided exact binomial p-value of k or more blast-like cells of n if the rate were ``background``:
    P(X >= k), X ~ Binomial(n, background). Summed in log space with the standard library (equals
    ``scipy.stats.binomtest(k, n, background, alternative='greater').pvalue``; tested), so the process that makes the
    calls need not import scipy (~0.2 s of start-up)."""
    if n <= 0 or k <= 0:
        return 1.0
    if k > n:
        return 0.0
    p = float(background)
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    def term(i: int) -> float:  # log C(n, i) + i log p + (n - i) log q
        return math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq

    def tail(indices: range) -> float:  # sum of the pmf over ``indices``, moving away from the mode (terms shrink)
        total, top = 0.0, None
        for i in indices:
            t = term(i)
            top = t if top is None else top
            if t < top - 40.0:  # the rest is below 1e-17 of the first term
                break
            total += math.exp(t - top)
        return 0.0 if top is None else math.exp(top) * total

    if k > n * p:  # P(X >= k) is the small, upper tail: sum it directly
        return float(min(1.0, tail(range(k, n + 1))))
    return float(min(1.0, max(0.0, 1.0 - tail(range(k - 1, -1, -1)))))


def cells_to_rule_out(k: int, params: RuleParams, limit: int = 100_000) -> int | None:
    """The fewest cells n >= k at which k blast-like cells are a normal call (None when no n up to ``limit`` is)."""
    lo, hi = max(k, 1), limit
    if wilson_interval(k, hi, params.confidence)[1] > params.background:
        return None
    while lo < hi:  # the upper bound falls as n grows for a fixed k
        mid = (lo + hi) // 2
        if wilson_interval(k, mid, params.confidence)[1] <= params.background:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _pct(x: float) -> str:
    return f"{100 * x:.0f}" if 100 * x >= 10 or x == 0 else f"{100 * x:.1f}"


def decide(n_blast_like: int, n_cells: int, params: RuleParams) -> Decision:
    """The call for ``n_blast_like`` blast-like cells among ``n_cells`` (n_cells >= 1)."""
    if n_cells <= 0:
        raise ValueError("decide() needs at least one cell")
    k, n = int(n_blast_like), int(n_cells)
    rate = k / n
    lo, hi = wilson_interval(k, n, params.confidence)
    p = excess_pvalue(k, n, params.background)
    ci = f"{_pct(rate)} % blast-like (95 % CI {_pct(lo)}-{_pct(hi)} %) of {n} cells"
    excess = p < params.alpha  # more blast-like cells than normal blood shows, with strong evidence
    if excess and rate >= params.all_rate:
        call = "ALL"
        why = f"{ci}: at or above the ALL level {_pct(params.all_rate)} % and beyond normal blood ({_pct(params.background)} %)"
    elif excess:
        call = "review"
        why = (f"{ci}: more blast-like cells than normal blood shows ({_pct(params.background)} %) but below the ALL level "
               f"{_pct(params.all_rate)} %; review the cells, consider flow cytometry")
    elif hi <= params.background:
        call = "normal"
        why = (f"{ci}: within what normal blood shows (up to {_pct(params.background)} %): the upper end of the interval "
               "excludes a blast population")
    elif rate >= params.all_rate:
        call = "review"
        why = (f"{ci}: at the ALL level {_pct(params.all_rate)} % but too few cells to tell from normal blood "
               f"({_pct(params.background)} %); add fields of this patient")
    else:
        call = "review"
        need = cells_to_rule_out(k, params)
        why = (f"{ci}: too few cells to exclude a small blast population (normal blood: up to {_pct(params.background)} %)"
               + (f"; about {need} cells with this share would rule it out" if need else "") + "; add fields of this patient")
    return Decision(call=call, blast_pct=100 * rate, blast_pct_lo=100 * lo, blast_pct_hi=100 * hi, p_excess=p, reason=why)
