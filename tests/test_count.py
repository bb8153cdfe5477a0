"""Each cell counted once: twin detections that are neither blast-like count as one cell (allmil_cli.stages.count)."""

from __future__ import annotations

import numpy as np
import pytest

from allmil_cli.stages.count import count_once, twin_positions
from allmil_cli.stages.detect import Decoding, heatmap_detections, twin_of

META = {"threshold": 0.3, "stride": 4.0, "canonical_rbc_px": 20.0}  # 5 heatmap cells per red cell


def test_twins_are_the_nearest_stronger_detection_closer_than_the_distance():
    heat = np.zeros((30, 60), np.float32)
    heat[15, 10], heat[15, 14], heat[15, 30], heat[15, 45] = 0.9, 0.7, 0.8, 0.6  # 0.8, 4.0 and 3.0 red cells apart
    shipped = heatmap_detections(heat, META, None, 240, 120, 1.0, 1.0, Decoding(twin_dist_rbc=0.0))
    assert [d.same_as for d in shipped] == [-1, -1, -1, -1]  # off: no twins
    dets = heatmap_detections(heat, META, None, 240, 120, 1.0, 1.0, Decoding(twin_dist_rbc=1.0))
    assert [round(d.score, 1) for d in dets] == [0.9, 0.8, 0.7, 0.6]  # strongest first
    assert [d.same_as for d in dets] == [-1, -1, 0, -1]  # the 0.7 peak, 0.8 red cell from the 0.9 one
    assert [(d.x, d.y, d.score) for d in dets] == [(d.x, d.y, d.score) for d in shipped]  # twins change no detection
    assert twin_of(np.array([[0.0, 0.0, 0.9], [4.0, 0.0, 0.8], [6.0, 0.0, 0.7]]), 5.0) == [-1, 0, 1]  # the nearest


def test_a_twin_pair_counts_once_only_when_neither_is_blast_like():
    images = ["a.jpg"] * 3 + ["b.jpg"] * 2
    same_as = [-1, 0, -1, -1, 0]
    none = np.zeros(5, bool)
    assert count_once(images, same_as, none).tolist() == [False, True, False, False, True]
    # a blast-like cell (or a blast-like twin) keeps the pair two cells: the blast count can never fall
    assert count_once(images, same_as, np.array([False, True, False, False, False])).tolist() == [False] * 4 + [True]
    assert count_once(images, same_as, np.array([False, False, False, True, False])).tolist() == [False, True] + [False] * 3
    # twins are field-local: the first cell of b.jpg is not a twin of a.jpg's cells
    assert twin_positions(images, same_as) == [-1, 0, -1, -1, 3]
    assert twin_positions(["a.jpg", "b.jpg"], [-1, 0]) == [-1, -1]  # an index past its field's own cells is ignored


def test_three_lobes_are_one_cell():
    assert count_once(["f"] * 3, [-1, 0, 1], np.zeros(3, bool)).tolist() == [False, True, True]


@pytest.mark.parametrize("blast_like", [False, True])
def test_the_patient_stage_counts_twins_once(tiny_weights, blast_like):
    """A real patient's evidence with one cell made the twin of its field's first: the count leaves it out and the
    JSON says so, unless the cells are blast-like."""
    from dataclasses import replace

    from allmil_cli.io.discover import discover_patients
    from allmil_cli.io.report import patient_json
    from allmil_cli.pipeline import Pipeline
    from allmil_cli.stages.models import load_models
    from tests.conftest import EXAMPLES

    patients, _ = discover_patients(EXAMPLES)
    pipe = Pipeline(load_models(tiny_weights, device="cpu"))
    ev = pipe.collect(patients[0])
    fields = [c.image for c in ev.cells]
    i = next(k for k in range(1, len(fields)) if fields[k] == fields[k - 1])  # the second cell of a field
    start = fields.index(fields[i])
    ev.cells = [replace(c, same_as=(i - 1 - start) if k == i else -1) for k, c in enumerate(ev.cells)]
    pipe.caller.cell_threshold = -1.0 if blast_like else 2.0  # every cell blast-like, or none
    r = pipe.caller.call(patients[0], ev)
    alone = pipe.caller.call(patients[0], replace(ev, cells=[replace(c, same_as=-1) for c in ev.cells]))
    assert alone.n_cells == len(ev.cells) and not any(c.merged for c in alone.cells)
    assert r.n_cells == len(ev.cells) - (0 if blast_like else 1)
    assert r.n_blast_like == (r.n_cells if blast_like else 0)
    cells = patient_json(r)["cells"]
    assert len(cells) == len(ev.cells)  # every detection stays in the JSON
    assert [c["merged"] for c in cells] == [k == i and not blast_like for k in range(len(cells))]
    assert cells[i]["same_as"] == i - 1 - start


def test_the_counting_measure_sees_duplicates_and_lost_cells():
    """``python -m allmil_cli.train.counting_once``'s tally on hand-made records: two detections of one cell (a twin
    pair, neither blast-like) are one duplicate before and none after; a twin pair on two real cells loses one."""
    from allmil_cli.train.counting_once import tally

    # rows: score, blast score, nearest stronger, its distance (red cells), heatmap between / own score, owning cell,
    # cells within reach, the shipped decoding's twin
    lobes = {"dets": [[0.9, 0.01, -1, -1.0, -1.0, 0, [0], -1], [0.7, 0.02, 0, 0.8, 0.7, 0, [0], 0]],
             "n_cells": 1, "n_blasts": 0}
    touching = {"dets": [[0.9, 0.5, -1, -1.0, -1.0, 0, [0], -1], [0.8, 0.4, 0, 1.0, 0.6, 1, [1], 0]],
                "n_cells": 2, "n_blasts": 2}
    blasts = {"dets": [[0.9, 0.99, -1, -1.0, -1.0, 0, [0], -1], [0.8, 0.98, 0, 0.9, 0.9, 1, [1], 0]],
              "n_cells": 2, "n_blasts": 2}
    before, after = tally([lobes, touching, blasts], 0, None, 0.97), tally([lobes, touching, blasts], None, None, 0.97)
    assert (before["det"], before["dup"], before["merged_lost"], before["blast_like"]) == (6, 1, 0, 2)
    assert (after["det"], after["dup"], after["merged"], after["merged_lost"], after["blast_like"]) == (4, 0, 2, 1, 2)
    assert after["blasts_found"] == before["blasts_found"] - 1 == 3  # the non-blast-like touching blast merged away
    # the same rule on the recorded neighbours: a valley bar above the pair's heatmap keeps the lobes apart
    assert tally([lobes], 1.1, 0.8, 0.97)["dup"] == 1 and tally([lobes], 1.1, 0.5, 0.97)["dup"] == 0
