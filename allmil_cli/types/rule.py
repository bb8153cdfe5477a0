"""The patient rule's value types: its parameters, its calls and one patient's decision (:mod:`allmil_cli.stages.decision`
computes it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

#: The calls a patient with a result can get.
CALLS = ("ALL", "review", "normal")
#: Changes whenever :func:`decide` changes meaning: site profiles record it and are refused by another version.
RULE_VERSION = "blast-percentage/1"
CONFIDENCE = 0.95


@dataclass(frozen=True)
class RuleParams:
    """The rule's parameters (shipped in the aggregator's ``allmil.rule.*`` metadata; see the model card)."""

    background: float  # blast-like rate (0..1) of normal blood, per cell
    all_rate: float  # blast-like rate (0..1) at which the ALL criterion is met
    alpha: float = 0.01  # one-sided test level for "more blast-like cells than normal blood"
    confidence: float = CONFIDENCE  # two-sided interval reported with the percentage

    def __post_init__(self) -> None:
        if not 0.0 < self.background < self.all_rate < 1.0:
            raise ValueError(f"need 0 < background ({self.background}) < all_rate ({self.all_rate}) < 1")
        if not 0.0 < self.alpha < 0.5 or not 0.5 < self.confidence < 1.0:
            raise ValueError("alpha must be in (0, 0.5) and confidence in (0.5, 1)")

    def to_meta(self) -> dict[str, str]:
        return {f"allmil.rule.{k}": repr(float(v)) for k, v in asdict(self).items()}

    @classmethod
    def from_meta(cls, meta: dict[str, str]) -> RuleParams | None:
        if "allmil.rule.background" not in meta:
            return None
        return cls(**{k: float(meta[f"allmil.rule.{k}"]) for k in ("background", "all_rate", "alpha", "confidence")
                      if f"allmil.rule.{k}" in meta})


#: For aggregators without ``allmil.rule.*`` metadata (weights trained before the rule, or by hand): the shipped
#: rule's numbers (weights/MODEL_CARD.md, *Patient rule*). Fit your own with ``python -m allmil_cli.train.rule``.
FALLBACK_RULE = RuleParams(background=0.0182, all_rate=0.10)


@dataclass(frozen=True)
class Decision:
    """The call with the numbers behind it (``blast_pct*`` in percent, ``p_excess`` the test's p-value)."""

    call: str
    blast_pct: float
    blast_pct_lo: float
    blast_pct_hi: float
    p_excess: float
    reason: str

    def evidence(self, params: RuleParams) -> dict[str, Any]:
        """What the JSON report and review page show of the rule for this patient."""
        return {"rule": "blast-percentage", "p_excess": self.p_excess, "background_pct": 100 * params.background,
                "all_pct": 100 * params.all_rate, "alpha": params.alpha, "confidence": params.confidence}
