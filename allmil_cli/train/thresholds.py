"""Metrics and threshold rules of the evaluation protocols (all chosen on out-of-fold predictions)."""

from __future__ import annotations

import numpy as np

from allmil_cli.stages.metrics import binary_metrics, roc_auc


def auc(y: np.ndarray, p: np.ndarray) -> float:
    return roc_auc(y, p)


def metrics(y, p, thr: float) -> dict:
    """:func:`allmil_cli.stages.metrics.binary_metrics` at ``p >= thr``, in this module's short keys (undefined ratios -> 0)."""
    p = np.asarray(p)
    m = binary_metrics(y, (p >= thr).astype(int), p)
    short = {"acc": "accuracy", "f1": "f1", "sens": "sensitivity", "spec": "specificity", "auc": "roc_auc"}
    out = {k: (0.0 if np.isnan(m[v]) and k != "auc" else m[v]) for k, v in short.items()}
    out.update({k: m[k] for k in ("tp", "fn", "fp", "tn")})
    out["thr"] = thr
    return out


def pick_threshold(y, p) -> float:
    """Threshold maximising balanced accuracy on (out-of-fold) predictions; ties -> closest to 0.5,
    placed midway between neighbouring scores."""
    y, p = np.asarray(y), np.asarray(p, np.float64)
    s = np.unique(p)
    cands = np.concatenate([[0.0], (s[:-1] + s[1:]) / 2, [1.0]]) if len(s) > 1 else np.array([0.5])
    best, bt = -1.0, 0.5
    for t in cands:
        m = metrics(y, p, t)
        ba = (m["sens"] + m["spec"]) / 2
        if ba > best + 1e-12 or (abs(ba - best) <= 1e-12 and abs(t - 0.5) < abs(bt - 0.5)):
            best, bt = ba, float(t)
    return bt


def pick_threshold_margin(y, p, tol: float = 0.01) -> float:
    """The shipped patient threshold: among the gaps between consecutive out-of-fold scores whose
    balanced accuracy is within ``tol`` of the best, take the widest gap in logit space and return its
    logit midpoint. A max-balanced-accuracy threshold squeezed between two near-identical scores
    (e.g. 0.9990 vs 0.9995) would not survive a new hospital's shift; the widest margin does better."""
    y, p = np.asarray(y), np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    s = np.unique(p)
    if len(s) < 2:
        return 0.5
    lo, hi = s[:-1], s[1:]
    mids = (lo + hi) / 2
    ba = np.array([(lambda m: (m["sens"] + m["spec"]) / 2)(metrics(y, p, t)) for t in mids])
    ok = ba >= ba.max() - tol - 1e-12
    lg = np.log(s / (1 - s))
    width = np.where(ok, lg[1:] - lg[:-1], -np.inf)
    i = int(np.argmax(width))
    mid = (lg[i] + lg[i + 1]) / 2
    return float(1 / (1 + np.exp(-mid)))


def row(name: str, m: dict) -> str:
    return (f"| {name} | {100 * m['acc']:.2f} | {100 * m['f1']:.2f} | {100 * m['sens']:.2f} | {100 * m['spec']:.2f} | "
            f"{m['auc']:.4f} | {m['tp']} / {m['fn']} / {m['fp']} / {m['tn']} | {m['thr']:.3f} |")


HEAD = "| setting | acc % | F1 % | sens % | spec % | AUC | TP / FN / FP / TN | thr |\n|---|---|---|---|---|---|---|---|"
