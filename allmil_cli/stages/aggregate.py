"""Patient aggregator (inference): LSTM over a patient's shuffled cell embeddings -> p(ALL).

numpy + onnxruntime only. ``aggregator.onnx`` maps features [B,T,256] -> p_all [B], patient_vector [B,64].

How a patient's N cells become one probability (``patient_probability``)
------------------------------------------------------------------------
The LSTM was trained (stage 2) on bags of ``bag_size`` = 15 slots: 1..15 real cells at random slots,
the other slots holding the embedding of a blank crop, label ALL iff >= 1 blast. At inference:

* N <= 15: one bag; the N cells are put in random slots among 15 (rest blank), exactly like training.
* N > 15: the shuffled cells are split into ceil(N / 15) bags of near-equal size (every cell is used
  once per shuffle), each padded to 15 with blanks; bag probabilities are combined by the rule in
  the model metadata ``allmil.combine``:
  ``max`` (a patient is ALL if any bag holds a blast: the bag-label semantics; the default),
  ``mean``, ``noisy_or`` (1 - prod(1 - p)), or ``series`` (one LSTM series over all N cells, no padding).
* N = 0: a bag of 15 blanks (the model's "no evidence" answer; the pipeline flags such patients).
* The whole procedure is repeated for ``allmil.shuffles`` (5) seeded permutations and the
  probabilities averaged, so the answer does not hinge on one ordering; fixed seed => deterministic.

The rule was chosen on protocol-2 out-of-fold predictions (see docs/classifier_results.md); with at most
15 cells per ALL-IDB1 image for almost every patient, max / mean / noisy-or / series measured identical
there, and ``max`` matches the bag-label semantics. ``threshold`` is 0.5 in the shipped model.

``p_all`` is calibrated per bag by the logit shift in the metadata (``allmil.logit_shift``): the reported
p_all crosses ``allmil.threshold`` (0.5) where the model's raw output crosses the operating point chosen on
protocol-2 out-of-fold predictions (``allmil.threshold_raw``).

``cell_scores`` runs the same LSTM on length-1 series (the paper's stage-1 view, kept calibrated by an
auxiliary loss in stage 2): the per-cell blast probability; ``cell_threshold`` turns it into the
"blast-like" count.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from allmil_cli.types.rule import FALLBACK_RULE
from allmil_cli.types.rule import RuleParams

BAG_SIZE = 15
COMBINES = ("max", "mean", "noisy_or", "series")


def bag_probability(run: Callable[[np.ndarray], np.ndarray], features: np.ndarray, blank: np.ndarray,
                    bag_size: int = BAG_SIZE, combine: str = "max", shuffles: int = 5, seed: int = 0) -> float:
    """The bag rule above, for any ``run``: float32 [B,T,D] -> p [B] (ONNX session or a torch twin)."""
    if combine not in COMBINES:
        raise ValueError(f"unknown combine rule {combine!r}; one of {COMBINES}")
    feats = np.asarray(features, np.float32).reshape(-1, blank.shape[-1])
    n = len(feats)
    rng = np.random.default_rng(seed)
    shuffles = max(1, int(shuffles))
    if n == 0:
        return float(run(np.broadcast_to(blank, (1, bag_size, blank.shape[-1])).copy())[0])
    if combine == "series" and n > bag_size:
        x = np.stack([feats[rng.permutation(n)] for _ in range(shuffles)])
        return float(np.mean(run(x)))
    n_bags = int(np.ceil(n / bag_size))
    bags, owner = [], []
    for s in range(shuffles):
        perm = rng.permutation(n)
        for chunk in np.array_split(perm, n_bags):
            bag = np.broadcast_to(blank, (bag_size, blank.shape[-1])).copy()
            bag[rng.permutation(bag_size)[: len(chunk)]] = feats[chunk]
            bags.append(bag)
            owner.append(s)
    p = np.asarray(run(np.stack(bags)), np.float64)
    owner = np.asarray(owner)
    per = []
    for s in range(shuffles):
        q = p[owner == s]
        if combine in ("max", "series"):
            per.append(q.max())
        elif combine == "mean":
            per.append(q.mean())
        else:
            per.append(1.0 - np.prod(1.0 - q))
    return float(np.mean(per))


class Aggregator:
    def __init__(self, session, blank_feature: np.ndarray) -> None:
        self.session = session
        self.blank = np.asarray(blank_feature, np.float32).reshape(-1)
        meta = session.get_modelmeta().custom_metadata_map or {}
        self.meta = dict(meta)
        self.bag_size = int(meta.get("allmil.bag_size", BAG_SIZE))
        self.combine = meta.get("allmil.combine", "max")
        self.shuffles = int(meta.get("allmil.shuffles", 5))
        self._threshold = float(meta.get("allmil.threshold", 0.5))
        self._cell_threshold = float(meta.get("allmil.cell_threshold", 0.5))
        # Patient calibration: the ALL-vs-normal logit of each bag is shifted by -logit_shift, so that the
        # reported p_all crosses the threshold (0.5) at the operating point chosen out of fold. Cell scores
        # are the model's own length-1 probabilities, unshifted.
        self._logit_shift = float(meta.get("allmil.logit_shift", 0.0))
        self._input = session.get_inputs()[0].name

    @property
    def threshold(self) -> float:
        """Patient decision threshold on p_all (chosen on protocol-2 out-of-fold predictions)."""
        return self._threshold

    @property
    def cell_threshold(self) -> float:
        """Threshold on :meth:`cell_scores` that counts a cell as 'blast-like'."""
        return self._cell_threshold

    @property
    def rule(self) -> RuleParams:
        """The patient rule's parameters shipped with the model (``allmil.rule.*``), else :data:`FALLBACK_RULE`."""
        return RuleParams.from_meta(self.meta) or FALLBACK_RULE

    def run(self, x: np.ndarray) -> np.ndarray:
        """features [B,T,256] -> the model's p_all [B] (uncalibrated)."""
        return self.session.run(["p_all"], {self._input: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def calibrated(self, x: np.ndarray) -> np.ndarray:
        """features [B,T,256] -> p_all [B] with the patient calibration (logit shift) applied."""
        p = self.run(x)
        if not self._logit_shift:
            return p
        q = np.clip(p.astype(np.float64), 1e-12, 1.0 - 1e-12)
        return 1.0 / (1.0 + np.exp(self._logit_shift - np.log(q / (1.0 - q))))

    def patient_vector(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(["patient_vector"], {self._input: np.ascontiguousarray(x, dtype=np.float32)})[0]

    def cell_scores(self, features: np.ndarray, batch_size: int = 1024) -> np.ndarray:
        """Blast probability of each cell: the model on length-1 series. (N,256) -> (N,) float32."""
        f = np.asarray(features, np.float32).reshape(-1, self.blank.shape[0])
        out = np.zeros(len(f), np.float32)
        for i in range(0, len(f), batch_size):
            out[i : i + batch_size] = self.run(f[i : i + batch_size, None, :])
        return out

    def patient_probability(self, features: np.ndarray, seed: int = 0) -> float:
        """p(ALL) for one patient's cell embeddings (N,256); see the module docstring for N != 15."""
        return bag_probability(self.calibrated, features, self.blank, self.bag_size, self.combine, self.shuffles, seed)
