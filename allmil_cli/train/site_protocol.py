"""The calibration protocol: protocol 3's shifts stand in for labs; does ``allmil calibrate`` fix a lab's calls?

``python -m allmil_cli.train.site_protocol`` (needs ``python -m allmil_cli.train.protocol3 fields --recipes v2pbc``,
which keeps every held-out patient's cell scores per shift, and ``python -m allmil_cli.train.heldout``).

For each shift (a "lab") and each of ``REPEATS`` seeded draws: calibrate (:func:`allmil_cli.stages.calibrate.fit_site`) on 10
normal + 10 ALL held-out patients of that shift, then call every other held-out patient of the same shift with the
lab's rule; again with the 10 normal patients only. Beside it, the same patients called without a profile.

Every patient is one ALL-IDB1 field, scored by the fold model that never saw it (protocol 2's folds). The cell
threshold and starting rule of a patient are its fold's (``rule.fit_rule`` on the other folds' held-out cells,
unshifted ground-truth cells), so nothing of a test patient sets its threshold. Calibration patients are drawn from
all folds: the profile is then fitted on counts made at their own folds' thresholds.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from allmil_cli.stages.calibrate import Counts, fit_site
from allmil_cli.stages.count import count_once
from allmil_cli.stages.decision import decide
from allmil_cli.train.heldout import load, split
from allmil_cli.train.inventory import REPO
from allmil_cli.train.protocol2 import K, fields
from allmil_cli.train.protocol3 import OUT
from allmil_cli.train.rule import fit_rule

REPEATS = 50
N_CAL = 10
DOC = REPO / "docs" / "calibration_results.md"


def _summ(calls: list[str], y: list[int]) -> dict[str, float]:
    c, t = np.asarray(calls), np.asarray(y)
    return {"spec": float((c[t == 0] != "ALL").mean()), "sens_all": float((c[t == 1] == "ALL").mean()),
            "all_as_normal": int(((c == "normal") & (t == 1)).sum()), "screen_sens": float((c[t == 1] != "normal").mean()),
            "normal_calls": float((c[t == 0] == "normal").mean())}


def counted(name: str, label: int, scores: list[float], same_as: list[int], threshold: float) -> Counts:
    """One patient's counts as the product makes them: twins counted once (:func:`allmil_cli.stages.count.count_once`)."""
    blast_like = np.asarray(scores, dtype=np.float64) >= threshold
    merged = count_once([name] * len(scores), same_as, blast_like)
    return Counts(name, label, int((~merged).sum()), int(blast_like.sum()))


def run(repeats: int = REPEATS, recipe: str = "v2pbc", seed: int = 0) -> dict:
    data = load(recipe)
    fold_fits = []
    for k in range(K):
        _, fit_mask = split(data, k)
        fold_fits.append(fit_rule(data["score"][fit_mask], data["group"].astype(str)[fit_mask]))
    recs, folds = fields()
    fold_of = {r.name: f for r, f in zip(recs, folds)}
    shifts = json.loads((OUT / "fields.json").read_text())[recipe]
    rng = np.random.default_rng(seed)
    out: dict[str, dict] = {}
    for shift, d in shifts.items():
        if "scores" not in d:
            raise SystemExit("protocol 3 results lack cell scores: rerun `python -m allmil_cli.train.protocol3 fields --recipes v2pbc`")
        names, y = d["names"], d["y"]
        fk = [fold_of[n] for n in names]
        twins = d.get("same_as") or [[-1] * len(s) for s in d["scores"]]
        counts = [counted(n, int(lab), s, t, fold_fits[k].cell_threshold)
                  for n, lab, s, t, k in zip(names, y, d["scores"], twins, fk)]
        base = [decide(c.n_blast_like, c.n_cells, fold_fits[k].params).call if c.n_cells else "review" for c, k in zip(counts, fk)]
        res = {"both": [], "normals": [], "none": []}
        how: dict[str, int] = {}
        normals = [i for i, c in enumerate(counts) if c.label == 0 and c.n_cells]
        alls = [i for i, c in enumerate(counts) if c.label == 1 and c.n_cells]
        for _ in range(repeats):
            cal_n = list(rng.choice(normals, N_CAL, replace=False))
            cal_a = list(rng.choice(alls, N_CAL, replace=False))
            for mode, cal in (("both", cal_n + cal_a), ("normals", cal_n)):
                shipped = fold_fits[int(np.bincount([fk[i] for i in cal], minlength=K).argmax())].params
                fit = fit_site([counts[i] for i in cal], shipped)
                how[f"{mode}: background {fit.background_how}"] = how.get(f"{mode}: background {fit.background_how}", 0) + 1
                test = [i for i in range(len(counts)) if i not in set(cal_n + cal_a)]
                calls = [decide(counts[i].n_blast_like, counts[i].n_cells, fit.params).call if counts[i].n_cells else "review"
                         for i in test]
                res[mode].append(_summ(calls, [counts[i].label for i in test]))
                if mode == "both":
                    res["none"].append(_summ([base[i] for i in test], [counts[i].label for i in test]))
        out[shift] = {m: {k: (float(np.mean([r[k] for r in v])), float(np.min([r[k] for r in v])), float(np.max([r[k] for r in v])))
                          for k in v[0]} for m, v in res.items()}
        out[shift]["how"] = how
        # protocol 3 itself under the rule: every held-out patient of the shift, no profile
        full = _summ(base, [c.label for c in counts])
        out[shift]["protocol3"] = {**full, "n_all": sum(1 for c in counts if c.label == 1), "n_normal": sum(1 for c in counts if c.label == 0),
                                   "all_called": sum(1 for c, b in zip(counts, base) if c.label == 1 and b == "ALL"),
                                   "normal_flags": d.get("normal_flags_shipped", 0), "normals": d.get("normals_found", 0),
                                   "blast_hits": d.get("blast_hits_shipped", 0), "blasts": d.get("blasts", 0)}
    return out


def protocol3_table(res: dict) -> list[str]:
    """Protocol 3 under the patient rule (no profile): each shift's held-out patients, called by their fold's rule."""
    lines = ["## Protocol 3 under the patient rule (no profile)", "",
             "Each held-out ALL-IDB1 field (a patient, median 3 cells) under each shift, through the product path with its fold's "
             "models (fold detector included), called by its fold's rule (fitted on the other folds' unshifted held-out cells). "
             "*normal cells flagged*: matched held-out normal white cells (ALL-IDB1 `other/` and ALL-IDB2 normals) at the shipped "
             "cell threshold 0.97; *blast recall*: ground-truth blasts detected and scored >= 0.97.", "",
             "| shift | ALL-call specificity % | ALL-call sensitivity % (n) | ALL patients called normal | screen sensitivity % | normal cells flagged % (n) | blast recall % (n) |",
             "|---|---|---|---|---|---|---|"]
    for shift, r in res.items():
        q = r["protocol3"]
        lines.append(f"| {shift} | {100 * q['spec']:.1f} | {100 * q['sens_all']:.1f} ({q['all_called']}/{q['n_all']}) | {q['all_as_normal']} | "
                     f"{100 * q['screen_sens']:.1f} | {100 * q['normal_flags'] / max(1, q['normals']):.1f} ({q['normals']}) | "
                     f"{100 * q['blast_hits'] / max(1, q['blasts']):.1f} ({q['blasts']}) |")
    return lines + [""]


def markdown(res: dict, cmd: str, repeats: int) -> str:
    lines = ["# Calibration protocol: protocol 3's shifts as labs", "",
             f"Written by `{cmd}` (see `allmil_cli/train/site_protocol.py`). Per shift: {repeats} seeded draws of "
             f"{N_CAL} normal + {N_CAL} ALL calibration patients; the other held-out patients of the shift are called with "
             "the lab's profile. Mean (min-max over draws), %. *spec*: normal patients not called ALL; *sens*: ALL "
             "patients called ALL; *screen*: ALL patients not called normal; *normal*: normal patients called normal.", "",
             "| shift | no profile: spec / sens / screen / normal | 10 normal + 10 ALL: spec / sens / screen / normal, ALL called normal | 10 normal only: spec / sens / screen / normal |",
             "|---|---|---|---|"]

    def f(d, k):
        m, lo, hi = d[k]
        return f"{100 * m:.1f}" if k != "all_as_normal" else f"{m:.2f} (max {hi:.0f})"

    for shift, r in res.items():
        cells: list[str] = []
        for mode in ("none", "both", "normals"):
            d = r[mode]
            txt = " / ".join(f(d, k) for k in ("spec", "sens_all", "screen_sens", "normal_calls"))
            if mode == "both":
                txt += f", {f(d, 'all_as_normal')}"
            cells.append(txt)
        lines.append(f"| {shift} | " + " | ".join(cells) + " |")
    hows = "; ".join(f"{shift}: " + ", ".join(f"{k} {v}" for k, v in sorted(r["how"].items())) for shift, r in res.items())
    lines += ["", f"How each draw's profile set the background (of {repeats} draws per mode): {hows}.", ""]
    return "\n".join(lines + protocol3_table(res))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m allmil_cli.train.site_protocol", description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=REPEATS)
    a = ap.parse_args(argv)
    t0 = time.time()
    res = run(a.repeats)
    text = markdown(res, "python -m allmil_cli.train.site_protocol" + (f" --repeats {a.repeats}" if a.repeats != REPEATS else ""),
                    a.repeats)
    DOC.write_text(text)
    print(text, f"({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
