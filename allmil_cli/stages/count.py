"""Each white cell counted once: twin detections that are neither blast-like count as one cell.

The detector keeps two heatmap maxima that lie 0.6 red cell apart or more (:data:`allmil_cli.stages.detect.DECODING`).
Two lobes of one granulocyte give two such maxima, and so do two touching blasts. The heatmap cannot tell the two
cases apart: every rule that merged the lobes also merged touching blasts (``docs/detector_results.md``, section 5).

The blast count does not need them told apart when neither cell is blast-like:
- merging such a pair never removes a blast-like cell, so the numerator of the blast percentage cannot fall;
- the denominator loses the duplicate.

So a detection closer than ``Decoding.twin_dist_rbc`` to a stronger one (its twin, ``Cell.same_as``) is counted with
that twin when neither is blast-like. A blast-like pair stays two cells. Such a pair is two touching blasts far more
often than a duplicated blast (held-out ALL-IDB1: duplicates <= 1 % of detections).

The rule's distance was chosen on design fields and judged on held-out ones: ``python -m
allmil_cli.train.counting_once`` (``docs/detector_results.md``, section 7).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def twin_positions(images: Sequence[str], same_as: Sequence[int]) -> list[int]:
    """Each cell's twin as a position in the whole list (-1: none). ``images``: each cell's field label, the cells of
    one field next to each other in detection order (strongest first); ``same_as``: each cell's twin, an index among
    its own field's cells (-1: none), always a stronger detection, so earlier in the list."""
    out = [-1] * len(images)
    start = 0
    for g in range(len(images)):
        if g and images[g] != images[g - 1]:
            start = g
        t = int(same_as[g])
        if 0 <= t < g - start:
            out[g] = start + t
    return out


def count_once(images: Sequence[str], same_as: Sequence[int], blast_like: np.ndarray) -> np.ndarray:
    """Which cells are counted with their twin (True: not counted on their own): those whose twin
    (:func:`twin_positions`) is there and neither is blast-like (``blast_like``: each cell's flag at the run's cell
    threshold). A cell whose twin was itself merged still merges (three lobes, one cell)."""
    merged = np.zeros(len(images), dtype=bool)
    for g, j in enumerate(twin_positions(images, same_as)):
        if j >= 0 and not blast_like[g] and not blast_like[j]:
            merged[g] = True
    return merged
