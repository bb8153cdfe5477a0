"""Fitting the patient rule (``allmil_cli.stages.decision``) on held-out cell scores of training folds.

Inputs: per-cell blast scores that the scoring model never trained on (``heldout.py``), each with its group
(``idb_blast``, ``idb_normal``, ``pbc_<class>``, ``bccd_wbc``). Nothing here sees a test fold: protocol 4 fits on the
other folds' cells and judges on the held-out fold; the shipped parameters are fitted on every fold's out-of-fold
scores.

How each parameter is set (anchored on the clinical criteria, numbers from the cells):

* ``cell_threshold``: the blast score at and above which a cell is blast-like. Chosen on a grid to maximise the
  chance that a patient at the ALL criterion (20 % blasts) of ``POWER_CELLS`` cells is called ALL, with the
  constraints below;
* ``background``: the one-sided 95 % upper bound (Wilson) of the flagged rate of the *worst* normal group
  (lymphocytes, immature granulocytes, erythroblasts, normal cells of healthy ALL-IDB1 fields, ...; groups under
  ``MIN_CLASS_CELLS`` pooled): a benign patient of any composition shows at most this rate, so the excess test at
  level ``alpha`` calls a benign patient ALL with probability <= alpha, falling with size. Normal cells of ALL fields
  do not count (their crops often hold part of a neighbouring blast);
* ``alpha``: 0.01 (the target: benign patients called ALL <= 1 %);
* ``all_rate``: the largest blast-like rate at which a 20 %-blast patient of ``POWER_CELLS`` cells (blast recall and
  typical normal flag rate of the training cells) is still called ALL with probability >= ``POWER`` (or, where no
  level reaches it, the best this threshold allows, within half a point); never below ``background`` + 1 point.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from allmil_cli.types.rule import RuleParams
from allmil_cli.stages.decision import decide, excess_pvalue, wilson_interval

ALL_FRACTION = 0.20  # WHO / ICC: >= 20 % blasts
POWER_CELLS = 50  # protocol 4's target: >= 20 % blasts called ALL >= 97 % at >= 50 cells
POWER = 0.97
ALPHA = 0.01
#: Groups that do not set what normal blood shows: blasts, and normal cells of ALL fields (their crops often hold part
#: of a neighbouring blast; a benign patient has none). Every other normal group does, when it has enough cells.
NOT_BACKGROUND = ("idb_blast", "idb_normal_in_all")
#: A normal group with fewer held-out cells is pooled into ``other_normal``: a small group's upper bound says more
#: about its size than about its rate (0 of 56 cells flagged still bounds the rate at 5 %).
MIN_CLASS_CELLS = 100
#: One-sided 95 % upper bound (the Wilson score bound at z = 1.645).
UPPER_CONFIDENCE = 0.90


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


#: P(X >= k), X ~ Binomial(n, p): the excess test's own tail (one implementation for the rule and its fitting).
_binom_sf = excess_pvalue


def min_all_count(n: int, params: RuleParams) -> int:
    """The fewest blast-like cells of ``n`` that :func:`decide` calls ALL (n + 1 when none do)."""
    return next((k for k in range(n + 1) if decide(k, n, params).call == "ALL"), n + 1)


def pool_small_groups(groups: np.ndarray) -> np.ndarray:
    """Normal groups under MIN_CLASS_CELLS cells pooled (with the smallest other group while still too small)."""
    groups = np.asarray(groups).astype(object)
    while True:
        sizes = {g: int((groups == g).sum()) for g in set(groups.tolist()) if g not in NOT_BACKGROUND}
        small = sorted((n, g) for g, n in sizes.items() if n < MIN_CLASS_CELLS)
        if not small or len(sizes) < 2:
            return groups.astype(str)
        _, g = small[0]
        _, other = min((n, h) for h, n in sizes.items() if h != g)
        name = "+".join(sorted({*g.split("+"), *other.split("+")}))
        groups = np.where(np.isin(groups, [g, other]), name, groups)


def fit_rule(scores: np.ndarray, groups: np.ndarray, thresholds: np.ndarray | None = None) -> Fit:
    """The rule's parameters from held-out cell scores (see the module docstring)."""
    scores = np.asarray(scores, np.float64)
    groups = np.asarray(groups)
    blast = scores[groups == "idb_blast"]
    groups = pool_small_groups(groups)
    normal_groups = [g for g in sorted(set(groups.tolist())) if g not in NOT_BACKGROUND]
    if thresholds is None:
        thresholds = np.round(np.linspace(0.50, 0.995, 100), 4)
    best: Fit | None = None
    for t in thresholds:
        r = float((blast >= t).mean())
        rates = {g: float((scores[groups == g] >= t).mean()) for g in normal_groups}
        counts = {g: int((groups == g).sum()) for g in normal_groups}
        uppers = {g: wilson_interval(int(round(rates[g] * counts[g])), counts[g], UPPER_CONFIDENCE)[1] for g in normal_groups}
        worst = max(uppers, key=uppers.get)
        bg = float(min(max(uppers[worst], 1e-3), 0.5))
        normal_all = np.isin(groups, normal_groups)
        typical = float((scores[normal_all] >= t).mean())
        rate20 = ALL_FRACTION * r + (1 - ALL_FRACTION) * typical
        if rate20 <= bg + 0.01:
            continue
        # the largest all_rate (0.5-point grid, at most the 20 %-blast rate, at least bg + 1 point) whose power reaches
        # POWER, or, where no level does, the best power this threshold allows (within half a point): a lower ALL
        # level than needed would only turn review calls into ALL calls
        grid = np.arange(math.floor(rate20 * 200) / 200, bg + 0.01 - 1e-9, -0.005)
        powers = [(float(round(a, 4)), _binom_sf(min_all_count(POWER_CELLS, RuleParams(background=bg, all_rate=float(round(a, 4)),
                                                                                       alpha=ALPHA)), POWER_CELLS, rate20))
                  for a in grid]
        if not powers:
            continue
        best_power = max(p for _, p in powers)
        goal = min(POWER, best_power - 0.005)
        all_rate, power = next((a, p) for a, p in powers if p >= goal)
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


def stamp(weights_dir: Path, fit: Fit) -> dict[str, str]:
    """Write the fitted rule into ``aggregator.onnx``'s metadata (``allmil.rule.*``, ``allmil.cell_threshold``) and
    refresh ``manifest.json``; returns the new manifest digests."""
    import onnx

    from allmil_cli.stages.models import write_manifest

    path = Path(weights_dir) / "aggregator.onnx"
    model = onnx.load(str(path))
    meta = {p.key: p.value for p in model.metadata_props}
    meta.update(fit.params.to_meta())
    meta["allmil.cell_threshold"] = repr(float(fit.cell_threshold))
    meta["allmil.rule.fitted_on"] = "protocol-2 out-of-fold held-out cells (python -m allmil_cli.train.rule)"
    del model.metadata_props[:]
    for k, v in sorted(meta.items()):
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return write_manifest(Path(weights_dir))


def main(argv: list[str] | None = None) -> None:
    import argparse

    from allmil_cli.train.heldout import K, load, split
    from allmil_cli.train.inventory import WEIGHTS

    ap = argparse.ArgumentParser(prog="python -m allmil_cli.train.rule",
                                 description="Fit the patient rule on every fold's held-out cells and ship it in the aggregator.")
    ap.add_argument("--recipe", default="v2pbc")
    ap.add_argument("--weights", type=Path, default=WEIGHTS)
    ap.add_argument("--dry-run", action="store_true", help="print the fit; leave the weights as they are")
    a = ap.parse_args(argv)
    d = load(a.recipe)
    oof = np.zeros(len(d["group"]), bool)
    for k in range(K):
        oof |= split(d, k)[0]  # every cell once, scored by the fold model that never trained on it
    fit = fit_rule(d["score"][oof], d["group"][oof])
    print(describe(fit))
    if not a.dry_run:
        for name, digest in stamp(a.weights, fit).items():
            print(f"{digest}  {name}")


if __name__ == "__main__":
    main()
