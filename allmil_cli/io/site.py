"""Site profiles (``site.yaml``): written by ``allmil calibrate``, read by ``diagnose --site`` and ``stress-test --site``.

A profile is human-readable YAML with comments. It records what the lab's patients showed (stain anchors of its normal
fields, the blast-like rate of its normal patients), the patient rule fitted to them, the leave-one-patient-out
numbers, and what it is valid for: the models' sha256, the allmil version and the rule version. A run with other
weights, another rule version or another allmil version refuses it (:class:`SiteError`, exit 2), naming what differs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from allmil_cli.stages.calibrate import Counts, Rate, SiteFit
from allmil_cli.types.rule import RULE_VERSION
from allmil_cli.types.rule import RuleParams

FORMAT = 1


class SiteError(Exception):
    """A profile that cannot be used for this run (the message says what differs and what to do)."""


@dataclass(frozen=True)
class SiteProfile:
    path: Path
    sha256: str
    rule: RuleParams
    cell_threshold: float
    summary: dict[str, Any]  # what the review page and the JSON report show

    def meta(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, **self.summary}


def _rate(r: Rate | None) -> dict[str, Any] | None:
    if r is None:
        return None
    return {"value_pct": round(100 * r.value, 1), "ci95_pct": [round(100 * r.lo, 1), round(100 * r.hi, 1)], "k": r.k, "n": r.n}


def profile_text(fit: SiteFit, counts: list[Counts], *, models_sha256: dict[str, str], version: str, cell_threshold: float,
                 stain: dict[str, Any], source: dict[str, Any]) -> str:
    """The profile as commented YAML."""
    p = fit.params
    sections: list[tuple[str, dict[str, Any]]] = [
        ("What this profile is for: diagnose refuses it with other weights, another allmil version or another rule.", {
            "allmil_site_profile": FORMAT, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "allmil_version": version, "rule_version": RULE_VERSION, "models_sha256": dict(models_sha256)}),
        ("The patients it was made from.", {"input": source}),
        ("What this lab's normal fields looked like: median background and red-cell colours (RGB), the stain anchors.",
         {"stain": stain}),
        ("What this lab's normal patients showed: their blast-like cells at the model's cell threshold.", {
            "normal_background": {
                "pooled_pct": round(100 * fit.pooled_rate, 2), "dispersion": round(fit.dispersion, 3),
                "patients": [{"patient": c.patient, "n_cells": c.n_cells, "n_blast_like": c.n_blast_like}
                             for c in counts if c.label == 0]}}),
        ("The patient rule for this lab (allmil_cli/stages/decision.py). background: highest blast-like rate normal blood shows here\n"
         "(background_source: kept = the shipped value, which your normal patients agree with; raised / lowered by them);\n"
         "all_rate: ALL level; alpha: level of the excess test. all_criterion: shipped (kept), raised, or fitted to ALL patients.", {
            "rule": {"cell_threshold": round(float(cell_threshold), 6), "background": p.background, "all_rate": p.all_rate,
                     "alpha": p.alpha, "confidence": p.confidence, "background_source": fit.background_how,
                     "all_criterion": fit.all_criterion}}),
        ("Leave-one-patient-out: each patient called by a rule fitted without it. 95 % Wilson intervals, with the counts.\n"
         "sensitivity: ALL patients called ALL; specificity: normal patients not called ALL; normal_calls: called normal.", {
            "cross_validation": {"sensitivity": _rate(fit.sensitivity), "specificity": _rate(fit.specificity),
                                 "normal_calls": _rate(fit.normal_calls),
                                 "calls": [{"patient": n, "label": "ALL" if y else "normal", "call": c} for n, y, c in fit.cv_calls]}}),
        ("Warnings given when it was made.", {"warnings": list(fit.warnings)}),
    ]
    out = ["# allmil site profile: made by `allmil calibrate`; use with `allmil diagnose DIR --site THIS_FILE`.",
           "# Do not edit the numbers by hand: make a new profile instead (docs/validating.md).", ""]
    for comment, body in sections:
        out += [f"# {line}" for line in comment.split("\n")]
        out.append(yaml.safe_dump(body, sort_keys=False, allow_unicode=True, default_flow_style=None, width=110).rstrip())
        out.append("")
    return "\n".join(out)


def load_profile(path: Path, models_sha256: dict[str, str], version: str) -> SiteProfile:
    """Read and check a profile against this run's models and versions; SiteError names what differs."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SiteError(f"{path}: cannot read the site profile ({exc.strerror or exc}); check the --site path.") from None
    try:
        doc = yaml.safe_load(raw.decode("utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SiteError(f"{path}: not a readable YAML site profile ({str(exc).splitlines()[0]}); make it again with "
                        "`allmil calibrate`.") from None
    if not isinstance(doc, dict) or doc.get("allmil_site_profile") != FORMAT or not isinstance(doc.get("rule"), dict):
        raise SiteError(f"{path}: not an allmil site profile (format {FORMAT}); make one with `allmil calibrate`.")
    diffs = []
    if doc.get("rule_version") != RULE_VERSION:
        diffs.append(f"rule version {doc.get('rule_version')!r} (this allmil: {RULE_VERSION!r})")
    if doc.get("allmil_version") != version:
        diffs.append(f"allmil version {doc.get('allmil_version')!r} (this run: {version!r})")
    theirs = doc.get("models_sha256") or {}
    for name in sorted(set(theirs) | set(models_sha256)):
        if theirs.get(name) != models_sha256.get(name):
            diffs.append(f"{name} sha256 {str(theirs.get(name))[:12]}... (these weights: {str(models_sha256.get(name))[:12]}...)")
    if diffs:
        raise SiteError(f"{path}: made for other models or rules: " + "; ".join(diffs)
                        + ". Make a new profile with `allmil calibrate` for these weights.")
    r = doc["rule"]
    try:
        rule = RuleParams(background=float(r["background"]), all_rate=float(r["all_rate"]), alpha=float(r["alpha"]),
                          confidence=float(r.get("confidence", 0.95)))
        cell_threshold = float(r["cell_threshold"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SiteError(f"{path}: its rule section is incomplete or invalid ({exc}); make it again with `allmil calibrate`.") from None
    cv = doc.get("cross_validation") or {}
    summary = {"created": doc.get("created"), "input": (doc.get("input") or {}).get("folder"),
               "n_normal": (doc.get("input") or {}).get("n_normal"), "n_all": (doc.get("input") or {}).get("n_all"),
               "background_pct": round(100 * rule.background, 2), "all_pct": round(100 * rule.all_rate, 2),
               "cell_threshold": cell_threshold, "all_criterion": r.get("all_criterion"),
               "cv_sensitivity": cv.get("sensitivity"), "cv_specificity": cv.get("specificity")}
    return SiteProfile(path=path, sha256=hashlib.sha256(raw).hexdigest(), rule=rule, cell_threshold=cell_threshold,
                       summary=summary)
