"""Protocol 3's per-field scoring through the product path (shipped models, one real ALL-IDB1 field, two shifts)."""

from __future__ import annotations

import numpy as np
import pytest

from allmil_cli.stages.models import load_models
from allmil_cli.pipeline.runner import Pipeline
from allmil_cli.train.protocol3 import score_field, summarise
from allmil_cli.train.shifts import PROTOCOL3

from tests.conftest import shipped_weights_or_skip


@pytest.mark.data
def test_score_field_counts_blasts_under_shifts(data_root):
    w = shipped_weights_or_skip()
    from allmil_cli.train.data import read_all_idb1

    rec = next(r for r in read_all_idb1(data_root / "ALL-IDB1") if r.label == 1 and len(r.blasts) >= 3)
    pipe = Pipeline(load_models(w, device="cpu"))
    shifts = [s for s in PROTOCOL3 if s.name in ("none", "res20+jpeg70")]
    tally: dict = {}
    score_field({"shipped": pipe}, rec.path, rec.label, rec.blasts, np.zeros((0, 2)), shifts, tally)
    for name in ("none", "res20+jpeg70"):
        d = tally["shipped"][name]
        assert d["y"] == [1] and 0.0 <= d["p"][0] <= 1.0 and d["n_cells"][0] >= 1
        assert d["blasts"] == len(rec.blasts) and d["blasts_found"] >= 1  # the detector finds blasts at both scales
        assert 0 <= d["blast_hits"] <= d["blasts_found"]
    m = summarise(tally["shipped"]["none"])
    assert 0.0 <= m["blast_recall"] <= 1.0
