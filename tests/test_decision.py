"""The patient rule (allmil_cli.stages.decision): the interval is scipy's, the call is monotone in the count, and for a fixed
mix of cells it converges to the right call as cells are added (exact binomial probabilities, no sampling)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom, binomtest

from allmil_cli.types.rule import CALLS, FALLBACK_RULE
from allmil_cli.types.rule import RuleParams
from allmil_cli.stages.decision import decide, excess_pvalue, wilson_interval

RULE = RuleParams(background=0.04, all_rate=0.12, alpha=0.01)


def p_call(call: str, rate: float, n: int, params: RuleParams = RULE) -> float:
    """Exact probability that a patient of n cells whose blast-like rate is ``rate`` gets ``call``."""
    ks = np.arange(n + 1)
    hit = np.array([decide(int(k), n, params).call == call for k in ks])
    return float(binom.pmf(ks, n, rate)[hit].sum())


@pytest.mark.parametrize("k,n", [(0, 1), (0, 15), (1, 15), (7, 20), (20, 20), (31, 86), (3, 500)])
def test_interval_is_scipys_wilson(k, n):
    lo, hi = wilson_interval(k, n)
    ref = binomtest(k, n).proportion_ci(0.95, method="wilson")
    assert lo == pytest.approx(ref.low, abs=1e-12) and hi == pytest.approx(ref.high, abs=1e-12)


@pytest.mark.parametrize("k,n,p", [(1, 15, 0.1), (9, 50, 0.05), (0, 10, 0.1), (40, 100, 0.2)])
def test_excess_pvalue_is_the_one_sided_exact_test(k, n, p):
    assert excess_pvalue(k, n, p) == pytest.approx(binomtest(k, n, p, alternative="greater").pvalue if k else 1.0, rel=1e-9)


def test_reason_gives_the_percentage_interval_and_the_criterion():
    d = decide(27, 86, RuleParams(background=0.08, all_rate=0.20))
    assert d.call == "ALL"
    assert d.reason.startswith("31 % blast-like (95 % CI 23-42 %) of 86 cells")
    assert "ALL level 20 %" in d.reason
    assert (d.blast_pct, round(d.blast_pct_lo), round(d.blast_pct_hi)) == (pytest.approx(100 * 27 / 86), 23, 42)


@pytest.mark.parametrize("n", [1, 4, 15, 50, 100, 500])
def test_more_blast_like_cells_never_move_a_call_away_from_all(n):
    order = {"normal": 0, "review": 1, "ALL": 2}
    calls = [order[decide(k, n, RULE).call] for k in range(n + 1)]
    assert calls == sorted(calls), calls  # normal ... review ... ALL as k grows
    assert calls[0] < 2  # no blast-like cell is never ALL


def test_a_benign_mix_never_drifts_toward_all():
    """Benign: the rate is at most what normal blood shows. P(ALL) stays <= alpha and falls with size."""
    for rate in (0.0, 0.01, 0.02, 0.03, 0.04):
        p_all = [p_call("ALL", rate, n) for n in (15, 50, 100, 200, 500, 2000)]
        assert max(p_all) <= RULE.alpha, (rate, p_all)
        assert p_all[-1] <= p_all[0] + 1e-12, (rate, p_all)
    # and it converges to normal when its rate is below the background
    assert p_call("normal", 0.02, 2000) > 0.999
    assert p_call("normal", 0.02, 15) < p_call("normal", 0.02, 100) < p_call("normal", 0.02, 500)


def test_a_mix_at_the_all_level_converges_to_all_and_one_between_to_review():
    assert p_call("ALL", 0.20, 500) > 0.999 and p_call("ALL", 0.20, 50) < p_call("ALL", 0.20, 500)
    between = 0.08  # beyond normal blood, below the ALL level
    assert p_call("review", between, 2000) > 0.999
    assert p_call("normal", between, 2000) < 1e-3 and p_call("ALL", between, 2000) < 1e-3


def test_the_old_max_rule_would_have_drifted():
    """Why the rule changed: 'ALL if any bag of 15 holds a blast-like cell' calls benign blood ALL ever more often."""
    rate = 0.04
    any_bag = [1 - (1 - rate) ** n for n in (15, 100, 500)]
    assert any_bag[0] < any_bag[1] < any_bag[2] and any_bag[2] > 0.99
    assert all(p_call("ALL", rate, n) <= RULE.alpha for n in (15, 100, 500))


def test_calls_and_parameters_are_validated():
    assert {decide(k, 30, FALLBACK_RULE).call for k in range(31)} <= set(CALLS)
    with pytest.raises(ValueError):
        RuleParams(background=0.2, all_rate=0.1)
    with pytest.raises(ValueError):
        decide(0, 0, RULE)
    meta = RULE.to_meta()
    assert RuleParams.from_meta(meta) == RULE and RuleParams.from_meta({}) is None
    assert all(math.isfinite(float(v)) for v in meta.values())


def test_excess_pvalue_matches_scipy_over_random_counts_without_importing_it():
    """The stdlib tail sum equals scipy's exact test to 1e-6 relative, tiny p-values included."""
    import subprocess
    import sys

    rng = np.random.default_rng(1)
    for _ in range(300):
        n = int(rng.integers(1, 3000))
        k = int(rng.integers(0, n + 1))
        p = float(rng.choice([0.0182, 0.01, 0.05, 0.3, rng.random()]))
        ref = binomtest(k, n, p, alternative="greater").pvalue if k else 1.0
        assert excess_pvalue(k, n, p) == pytest.approx(ref, rel=1e-6, abs=1e-300)
    code = "import sys; from allmil_cli.stages.decision import decide; from allmil_cli.types.rule import FALLBACK_RULE; decide(3, 40, FALLBACK_RULE); print('scipy' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
