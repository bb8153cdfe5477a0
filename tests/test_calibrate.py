"""Lab calibration, the library half: the site's rule from its patients' counts, leave-one-patient-out numbers,
refusals; the profile's YAML round trip and its checks against this run's models."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from allmil_cli.stages.calibrate import MIN_NORMAL_PATIENTS, Counts, fit_site
from allmil_cli.types.rule import RULE_VERSION
from allmil_cli.types.rule import RuleParams
from allmil_cli.stages.decision import decide
from allmil_cli.io.site import SiteError, load_profile, profile_text

SHIPPED = RuleParams(background=0.05, all_rate=0.15, alpha=0.01)
SHA = {"detector.onnx": "a" * 64, "embedder.onnx": "b" * 64, "aggregator.onnx": "c" * 64}


def lab(n_normal: int, rate: float, n_all: int = 0, all_rate: float = 0.5, cells: int = 120, seed: int = 0) -> list[Counts]:
    rng = np.random.default_rng(seed)
    out = [Counts(f"N{i}", 0, cells, int(rng.binomial(cells, rate))) for i in range(n_normal)]
    out += [Counts(f"A{i}", 1, cells, int(rng.binomial(cells, all_rate))) for i in range(n_all)]
    return out


def test_too_few_normal_patients_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=rf"needs at least {MIN_NORMAL_PATIENTS}"):
        fit_site(lab(MIN_NORMAL_PATIENTS - 1, 0.03, n_all=20), SHIPPED)
    fit_site(lab(MIN_NORMAL_PATIENTS, 0.03), SHIPPED)  # ten always works


def test_a_lab_with_more_blast_like_normals_gets_a_higher_background_and_fewer_false_all_calls():
    counts = lab(20, 0.09)  # this lab's normal blood looks more blast-like than the shipped rule allows (5 %)
    shipped_calls = [decide(c.n_blast_like, c.n_cells, SHIPPED).call for c in counts]
    fit = fit_site(counts, SHIPPED)
    assert fit.params.background > 0.09 > SHIPPED.background and fit.background_how == "raised"
    assert fit.params.all_rate == SHIPPED.all_rate and fit.all_criterion == "shipped"
    site_calls = [decide(c.n_blast_like, c.n_cells, fit.params).call for c in counts]
    assert site_calls.count("ALL") <= shipped_calls.count("ALL")
    assert fit.specificity.n == 20 and fit.sensitivity is None
    assert any("normal patients only" in w for w in fit.warnings)


def test_few_clean_cells_keep_the_shipped_background_and_many_lower_it():
    """A small sample must not loosen the rule: 12 patients of 3 cells, none blast-like, agree with the shipped
    background but cannot bound it more tightly; 12 patients of 2,000 clean cells can."""
    few = fit_site(lab(12, 0.0, cells=3), SHIPPED)
    assert few.background_how == "kept" and few.params == SHIPPED
    many = fit_site(lab(12, 0.001, cells=2000), SHIPPED)
    assert many.background_how == "lowered" and many.params.background < SHIPPED.background


def test_with_all_patients_the_all_level_is_fitted_and_cross_validated():
    clear = fit_site(lab(15, 0.02, n_all=12, all_rate=0.25), SHIPPED)  # every ALL patient is ALL at the shipped level
    assert clear.all_criterion == "shipped" and clear.params.all_rate == SHIPPED.all_rate
    assert clear.sensitivity.n == 12 and clear.sensitivity.value == 1.0 and clear.sensitivity.lo < 1.0
    assert clear.specificity.k == clear.specificity.n == 15 and len(clear.cv_calls) == 27
    # this lab's ALL patients show fewer blast-like cells (12 %) than the shipped ALL level (15 %): it is lowered
    low = lab(15, 0.005, n_all=12, all_rate=0.12, cells=300)
    fit = fit_site(low, SHIPPED)
    assert fit.all_criterion == "fitted" and fit.params.background < fit.params.all_rate < SHIPPED.all_rate
    shipped_hits = sum(decide(c.n_blast_like, c.n_cells, SHIPPED).call == "ALL" for c in low if c.label == 1)
    assert fit.sensitivity.k > shipped_hits  # leave-one-patient-out, the lab's rule calls more of its ALL patients ALL
    assert fit.specificity.k == fit.specificity.n


def test_a_background_at_the_shipped_all_level_raises_it_and_says_so():
    fit = fit_site(lab(12, 0.2), SHIPPED)
    assert fit.all_criterion == "raised" and fit.params.all_rate > fit.params.background >= 0.15
    assert any("raised" in w for w in fit.warnings)


def test_profile_round_trip_and_refusals(tmp_path):
    counts = lab(12, 0.03, n_all=10)
    fit = fit_site(counts, SHIPPED)
    text = profile_text(fit, counts, models_sha256=SHA, version="9.9", cell_threshold=0.85,
                        stain={"n_fields": 3, "background_rgb": [230, 225, 235], "rbc_rgb": [200, 120, 130]},
                        source={"folder": "lab", "labels": "labels.csv", "n_normal": 12, "n_all": 10})
    assert text.startswith("# allmil site profile") and "\n# Leave-one-patient-out" in text
    doc = yaml.safe_load(text)
    assert doc["rule_version"] == RULE_VERSION and doc["rule"]["background"] == fit.params.background
    assert doc["cross_validation"]["sensitivity"]["n"] == 10
    path = tmp_path / "site.yaml"
    path.write_text(text)
    prof = load_profile(path, SHA, "9.9")
    assert prof.rule == fit.params and prof.cell_threshold == 0.85 and len(prof.sha256) == 64
    with pytest.raises(SiteError, match=r"embedder.onnx sha256 bbbbbbbbbbbb"):
        load_profile(path, {**SHA, "embedder.onnx": "d" * 64}, "9.9")
    with pytest.raises(SiteError, match="allmil version '9.9'"):
        load_profile(path, SHA, "10.0")
    path.write_text(text.replace(RULE_VERSION, "max-bag/0"))
    with pytest.raises(SiteError, match="rule version 'max-bag/0'"):
        load_profile(path, SHA, "9.9")
    path.write_text("rule: [unclosed")
    with pytest.raises(SiteError, match="not a readable YAML"):
        load_profile(path, SHA, "9.9")
    with pytest.raises(SiteError, match="cannot read"):
        load_profile(tmp_path / "missing.yaml", SHA, "9.9")
