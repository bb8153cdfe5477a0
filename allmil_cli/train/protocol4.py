"""Protocol 4: composition and scale. Does the patient call hold as a lab scans more cells?

``python -m allmil_cli.train.protocol4`` (needs ``python -m allmil_cli.train.heldout`` first) composes synthetic
patients from held-out cells only and reports the call distribution over a grid of blast fractions and sizes.

Held-out material (``heldout.py``): for protocol-2 fold ``k``, the ground-truth white cells of fold ``k``'s test
fields scored by fold ``k``'s model, plus one fifth (``part == k``, by a hash of the image or BCCD field) of the PBC
images outside the training subset and of BCCD's test-split WBCs, scored by the same model. The rule's parameters
for fold ``k`` are fitted (``rule.fit_rule``) on the other four folds' held-out cells and parts only; fold ``k``'s
cells then judge them. Nothing of a test cell is seen by its model or by its rule.

Grid: blast fractions 0, 1, 2, 5, 10, 20, 40, 80 % (blasts: ALL-IDB1/2 blasts of the fold) in benign backgrounds:
``typical`` (PBC differential: 55 % neutrophils, 30 % lymphocytes, 7 % monocytes, 5 % eosinophils, 3 % basophils),
``lymph-rich`` (70 % lymphocytes), ``immature`` (25 % immature granulocytes, 15 % erythroblasts, 35 % lymphocytes,
25 % neutrophils), ``idb-normal`` (ALL-IDB normal white cells: the blasts' own lab and stain) and ``bccd`` (BCCD
test WBCs); sizes 15, 50, 100, 200 and 500 cells; ``REPS`` patients per fold and grid cell, cells drawn with
replacement from the fold's pools. Field-level growth: held-out healthy ALL-IDB1 fields and BCCD test fields
grouped into patients of 1, 5 and 20 fields (drawn with replacement where a fold has fewer fields).
The old rule (the LSTM over bags of 15, ``max`` over bags, raw 0.5) is run beside it on fewer patients
(``LEGACY_REPS``) to show the failure this protocol was built to catch.

Limits: ground-truth cells, not detections (no detector false positives, no duplicates); PBC is held out by image,
not by donor or source (PBC has no donor ids; the fold models trained on other PBC images). Synthetic mixes put
cells of different labs in one patient.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import numpy as np

from allmil_cli.types.rule import RuleParams
from allmil_cli.stages.decision import decide
from allmil_cli.train.heldout import K, OUT_DIR, load, split
from allmil_cli.train.inventory import REPO
from allmil_cli.train.rule import describe, fit_rule

FRACTIONS = (0.0, 0.01, 0.02, 0.05, 0.10, 0.20, 0.40, 0.80)
SIZES = (15, 50, 100, 200, 500)
REPS = 400
LEGACY_REPS = 40
MIXES: dict[str, dict[str, float]] = {
    "typical": {"pbc_neutrophil": 0.55, "pbc_lymphocyte": 0.30, "pbc_monocyte": 0.07, "pbc_eosinophil": 0.05,
                "pbc_basophil": 0.03},
    "lymph-rich": {"pbc_lymphocyte": 0.70, "pbc_neutrophil": 0.20, "pbc_monocyte": 0.10},
    "immature": {"pbc_ig": 0.25, "pbc_erythroblast": 0.15, "pbc_lymphocyte": 0.35, "pbc_neutrophil": 0.25},
    "idb-normal": {"idb_normal": 1.0},
    "bccd": {"bccd_wbc": 1.0},
}
FIELD_SOURCES = {"ALL-IDB1 healthy fields": "idb_normal", "BCCD test fields": "bccd_wbc"}
FIELD_COUNTS = (1, 5, 20)
DOC = REPO / "docs" / "protocol4_results.md"


def _draw_counts(rng: np.random.Generator, mix: dict[str, float], rates: dict[str, float], frac: float, n: int,
                 blast_rate: float, reps: int) -> np.ndarray:
    """Blast-like counts of ``reps`` synthetic patients (cells drawn with replacement: binomial per group)."""
    n_blast = rng.binomial(n, frac, size=reps) if 0 < frac < 1 else np.full(reps, int(round(frac * n)))
    k = rng.binomial(n_blast, blast_rate)
    groups = list(mix)
    probs = np.array([mix[g] for g in groups])
    comp = np.stack([rng.multinomial(m, probs / probs.sum()) for m in n - n_blast])
    for j, g in enumerate(groups):
        k = k + rng.binomial(comp[:, j], rates[g])
    return k


def _calls(ks: np.ndarray, n: int, params: RuleParams) -> list[str]:
    cache: dict[int, str] = {}
    out = []
    for k in ks.tolist():
        if k not in cache:
            cache[k] = decide(k, n, params).call
        out.append(cache[k])
    return out


def _legacy_p(model, emb: np.ndarray, blank: np.ndarray) -> float:
    from allmil_cli.stages.aggregate import bag_probability

    return bag_probability(model.run, emb, blank, 15, "max", 5, 0)


def run(reps: int = REPS, legacy_reps: int = LEGACY_REPS, recipe: str = "v2pbc", seed: int = 0,
        variant: str | None = None, model_seed: int = 0) -> dict:
    """``variant``: an embedder of ``embedder_ablation.VARIANTS`` (its ``heldout_<recipe>_<variant>.npz`` and fold models);
    ``model_seed``: the fold models' training seed (``heldout.py --seed``; the old rule is run for seed 0 only)."""
    data = load(recipe, variant, seed=model_seed)
    groups_all = data["group"].astype(str)
    rng = np.random.default_rng(seed)
    grid: dict[tuple, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    legacy: dict[tuple, list[int]] = defaultdict(list)
    fields: dict[tuple, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    fits = []
    P = None
    if legacy_reps and model_seed == 0:
        from allmil_cli.train.variants import protocol2_for

        P = protocol2_for(recipe, variant, verbose=False)
    for k in range(K):
        test, fit_mask = split(data, k)
        fit = fit_rule(data["score"][fit_mask], groups_all[fit_mask])
        fits.append(fit)
        print(f"fold {k}: {describe(fit)}", flush=True)
        t, params = fit.cell_threshold, fit.params
        sc, gr = data["score"][test], groups_all[test]
        rates = {g: float((sc[gr == g] >= t).mean()) for g in set(gr.tolist())}
        blast_rate = rates["idb_blast"]
        for mix_name, mix in MIXES.items():
            for frac in FRACTIONS:
                for n in SIZES:
                    ks = _draw_counts(rng, mix, rates, frac, n, blast_rate, reps)
                    for c in _calls(ks, n, params):
                        grid[(mix_name, frac, n)][c] += 1
        if P is not None:  # the old rule on sampled cells (their embeddings), benign and 20 % blasts
            model = P.model(k)
            emb, blank = data["emb"][test].astype(np.float32), data["blank"][k]
            pools = {g: np.flatnonzero(gr == g) for g in set(gr.tolist())}
            for mix_name in ("typical", "lymph-rich", "idb-normal"):
                mix = MIXES[mix_name]
                for frac in (0.0, 0.20):
                    for n in SIZES:
                        for _ in range(legacy_reps):
                            nb = int(round(frac * n))
                            comp = rng.multinomial(n - nb, np.array(list(mix.values())) / sum(mix.values()))
                            idx = [rng.choice(pools["idb_blast"], nb)] + [rng.choice(pools[g], m) for g, m in zip(mix, comp)]
                            legacy[(mix_name, frac, n)].append(int(_legacy_p(model, emb[np.concatenate(idx)], blank) >= 0.5))
        field_ids = data["field"][test]
        for label, group in FIELD_SOURCES.items():
            sel = gr == group
            by_field: dict[str, np.ndarray] = defaultdict(list)
            for f, s in zip(field_ids[sel], sc[sel]):
                by_field[f].append(s >= t)
            names = sorted(by_field)
            if group == "idb_normal":  # healthy fields only: normal cells of ALL fields sit next to blasts
                names = [f for f in names if f.endswith("_0")]
            for nf in FIELD_COUNTS:
                for _ in range(reps):
                    pick = rng.choice(len(names), nf, replace=nf > len(names))
                    flags = np.concatenate([np.asarray(by_field[names[i]], bool) for i in pick])
                    if len(flags) == 0:
                        fields[(label, nf)]["no cells"] += 1
                        continue
                    fields[(label, nf)][decide(int(flags.sum()), len(flags), params).call] += 1
    return {"grid": grid, "legacy": legacy, "fields": fields, "fits": fits, "reps": reps, "legacy_reps": legacy_reps,
            "stress": stress(data, fits)}


def stress(data: dict[str, np.ndarray], fits: list) -> dict[str, dict[str, int]]:
    """The paper's stress test under the rule: every ALL-IDB1 field is a patient of its ground-truth white cells,
    scored by its fold's model and called by its fold's rule (fitted without the fold); then again with the blasts
    removed, and with the normal cells removed. Counts of ALL / review / normal calls over the ALL patients."""
    out: dict[str, dict[str, int]] = {c: defaultdict(int) for c in ("none", "blasts", "normals", "healthy")}
    groups, fields = data["group"].astype(str), data["field"].astype(str)
    for k in range(K):
        test, _ = split(data, k)
        t, params = fits[k].cell_threshold, fits[k].params
        healthy = test & np.char.startswith(groups, "idb_") & np.char.endswith(fields, "_0")
        for f in sorted(set(fields[healthy].tolist())):  # the healthy fields, for the ALL call's specificity
            m = healthy & (fields == f)
            out["healthy"][decide(int((data["score"][m] >= t).sum()), int(m.sum()), params).call] += 1
        sel = test & np.char.startswith(groups, "idb_") & np.char.endswith(fields, "_1")
        for f in sorted(set(fields[sel].tolist())):
            m = sel & (fields == f)
            flag, blast = data["score"][m] >= t, groups[m] == "idb_blast"
            for cond, keep in (("none", np.ones_like(blast)), ("blasts", ~blast), ("normals", blast)):
                n = int(keep.sum())
                out[cond]["no cells" if n == 0 else decide(int(flag[keep].sum()), n, params).call] += 1
    return out


def _pct(d: dict[str, int], key: str) -> float:
    tot = sum(d.values())
    return 100.0 * d.get(key, 0) / tot if tot else float("nan")


def targets(res: dict) -> list[tuple[str, bool, str]]:
    g = res["grid"]
    out = []
    benign = [(m, n, _pct(g[(m, 0.0, n)], "ALL")) for m in MIXES for n in SIZES]
    worst = max(benign, key=lambda x: x[2])
    rising = [m for m in MIXES if any(_pct(g[(m, 0.0, b)], "ALL") > _pct(g[(m, 0.0, a)], "ALL") + 0.5
                                      for a, b in zip(SIZES, SIZES[1:]))]
    out.append(("benign mixes called ALL <= 1 % at every size", worst[2] <= 1.0, f"worst {worst[2]:.2f} % ({worst[0]}, {worst[1]} cells)"))
    out.append(("benign ALL rate never rising with size (by > 0.5 point)", not rising, "rising in: " + (", ".join(rising) or "none")))
    hi = [(m, f, n, _pct(g[(m, f, n)], "ALL")) for m in MIXES for f in FRACTIONS if f >= 0.2 for n in SIZES if n >= 50]
    low = min(hi, key=lambda x: x[3])
    out.append((">= 20 % blasts called ALL >= 97 % at >= 50 cells", low[3] >= 97.0,
                f"lowest {low[3]:.1f} % ({low[0]}, {100 * low[1]:.0f} % blasts, {low[2]} cells)"))
    mid = [(m, f, n, _pct(g[(m, f, n)], "normal")) for m in MIXES for f in FRACTIONS if 0.02 <= f <= 0.10 for n in SIZES if n >= 100]
    worst_mid = max(mid, key=lambda x: x[3])
    out.append(("2-10 % blasts never called normal at >= 100 cells", worst_mid[3] == 0.0,
                f"highest {worst_mid[3]:.1f} % normal ({worst_mid[0]}, {100 * worst_mid[1]:.0f} % blasts, {worst_mid[2]} cells)"))
    fw = max(((lab, nf, _pct(d, "ALL")) for (lab, nf), d in res["fields"].items()), key=lambda x: x[2])
    out.append(("benign field groups of 1, 5, 20 fields called ALL <= 1 %", fw[2] <= 1.0, f"worst {fw[2]:.2f} % ({fw[0]}, {fw[1]} fields)"))
    return out


def headline(res: dict) -> dict[str, float]:
    """The numbers the targets are judged on (percent), for the spread over training seeds."""
    g, st = res["grid"], res["stress"]
    none, h = st["none"], st["healthy"]
    n_all, n_h = sum(none.values()), sum(h.values())
    return {
        "benign ALL, worst": max(_pct(g[(m, 0.0, n)], "ALL") for m in MIXES for n in SIZES),
        ">=20 % blasts ALL at 50 cells, lowest": min(_pct(g[(m, f, 50)], "ALL") for m in MIXES for f in FRACTIONS if f >= 0.2),
        ">=20 % blasts ALL at 100 cells, lowest": min(_pct(g[(m, f, 100)], "ALL") for m in MIXES for f in FRACTIONS if f >= 0.2),
        "2-10 % blasts normal at >=100 cells, highest": max(_pct(g[(m, f, n)], "normal") for m in MIXES
                                                          for f in FRACTIONS if 0.02 <= f <= 0.10 for n in SIZES if n >= 100),
        "field groups ALL, worst": max(_pct(d, "ALL") for d in res["fields"].values()),
        "stress: ALL recall, blasts removed": 100 * st["blasts"]["ALL"] / max(1, sum(st["blasts"].values())),
        "protocol 2 (GT cells): ALL-call accuracy": 100 * (none["ALL"] + n_h - h["ALL"]) / max(1, n_all + n_h),
        "protocol 2 (GT cells): screen sensitivity": 100 * (n_all - none["normal"]) / max(1, n_all),
    }


def seeds_table(rows: dict[int, dict[str, float]]) -> str:
    keys = list(next(iter(rows.values())))
    lines = ["### Spread over training seeds (fold models retrained; the rule refitted per seed)", "",
             "| measure | " + " | ".join(f"seed {s}" for s in rows) + " | mean | range |", "|---|" + "---|" * (len(rows) + 2)]
    for k in keys:
        v = [rows[s][k] for s in rows]
        lines.append(f"| {k} % | " + " | ".join(f"{x:.1f}" for x in v) + f" | {np.mean(v):.1f} | {min(v):.1f}-{max(v):.1f} |")
    return "\n".join(lines) + "\n"


def markdown(res: dict, command: str) -> str:
    g, lines = res["grid"], []
    lines += ["## Protocol 4: composition and scale", "",
              f"Command: `{command}` ({res['reps']} synthetic patients per fold and grid cell, 5 folds; each fold's rule "
              "fitted on the other folds' held-out cells). Each cell: % called ALL / review / normal.", ""]
    lines += ["Per-fold rule (fitted without the fold):", ""] + [f"- fold {k}: {describe(f)}" for k, f in enumerate(res["fits"])] + [""]
    lines += ["| targets | met | measured |", "|---|---|---|"]
    lines += [f"| {name} | {'yes' if ok else '**no**'} | {txt} |" for name, ok, txt in targets(res)] + [""]
    for mix in MIXES:
        lines += [f"### Background `{mix}`", "", "| blasts | " + " | ".join(f"{n} cells" for n in SIZES) + " |",
                  "|---|" + "---|" * len(SIZES)]
        for f in FRACTIONS:
            cells = [f"{_pct(g[(mix, f, n)], 'ALL'):.1f} / {_pct(g[(mix, f, n)], 'review'):.1f} / {_pct(g[(mix, f, n)], 'normal'):.1f}"
                     for n in SIZES]
            lines.append(f"| {100 * f:g} % | " + " | ".join(cells) + " |")
        lines.append("")
    if res["legacy"]:
        lines += ["### The old rule (LSTM over bags of 15, max over bags, raw 0.5) on the same kind of patients", "",
                  f"% called ALL ({res['legacy_reps']} patients per fold and cell; new rule's ALL % after the slash).", "",
                  "| background, blasts | " + " | ".join(f"{n} cells" for n in SIZES) + " |", "|---|" + "---|" * len(SIZES)]
        for mix in ("typical", "lymph-rich", "idb-normal"):
            for f in (0.0, 0.20):
                row = [f"{100 * np.mean(res['legacy'][(mix, f, n)]):.1f} / {_pct(g[(mix, f, n)], 'ALL'):.1f}" for n in SIZES]
                lines.append(f"| {mix}, {100 * f:g} % | " + " | ".join(row) + " |")
        lines.append("")
    st = res["stress"]
    lines += ["### The paper's stress test under the rule (ALL-IDB1 ALL fields as patients, ground-truth cells)", "",
              "| removed | ALL | review | normal | no cell left | ALL recall % |", "|---|---|---|---|---|---|"]
    for cond in ("none", "blasts", "normals"):
        d = st[cond]
        tot = sum(d.values())
        lines.append(f"| {cond} | {d['ALL']} | {d['review']} | {d['normal']} | {d['no cells']} | {100 * d['ALL'] / tot:.1f} |")
    h = st["healthy"]
    lines += ["", f"Healthy fields (with ground-truth white cells; 59 minus those without any): {h['ALL']} ALL, {h['review']} "
              f"review, {h['normal']} normal. Protocol 2 with ground-truth cells under the rule: ALL-call specificity "
              f"{100 * (1 - h['ALL'] / max(1, sum(h.values()))):.1f} %, ALL-call sensitivity {100 * st['none']['ALL'] / max(1, sum(st['none'].values())):.1f} %, "
              f"screen sensitivity (ALL or review) {100 * (1 - st['none']['normal'] / max(1, sum(st['none'].values()))):.1f} %.", ""]
    lines += ["### Field-level growth (healthy fields grouped into patients)", "",
              "| fields | patients of 1 field | of 5 | of 20 |", "|---|---|---|---|"]
    for lab in FIELD_SOURCES:
        row = [f"{_pct(res['fields'][(lab, nf)], 'ALL'):.1f} / {_pct(res['fields'][(lab, nf)], 'review'):.1f} / "
               f"{_pct(res['fields'][(lab, nf)], 'normal'):.1f}" for nf in FIELD_COUNTS]
        lines.append(f"| {lab} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m allmil_cli.train.protocol4", description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=REPS)
    ap.add_argument("--legacy-reps", type=int, default=LEGACY_REPS, help="0 skips the old rule (no torch needed)")
    ap.add_argument("--recipe", default="v2pbc")
    ap.add_argument("--no-doc", action="store_true", help="print only; leave docs/protocol4_results.md as it is")
    ap.add_argument("--variant", default=None, help="an embedder of embedder_ablation.VARIANTS (in160, in128, lite0): "
                    "its held-out file; writes targets_<recipe>_<variant>.json, never a doc")
    ap.add_argument("--seeds", type=int, nargs="*", default=[], help="also the fold models of these training seeds "
                    "(python -m allmil_cli.train.heldout --seed N): the headline numbers' spread over seeds")
    a = ap.parse_args(argv)
    t0 = time.time()
    variant = None if a.variant in (None, "in224") else a.variant
    res = run(a.reps, a.legacy_reps, a.recipe, variant=variant)
    spread = {0: headline(res)}
    for s in a.seeds:
        if s != 0:
            spread[s] = headline(run(a.reps, 0, a.recipe, model_seed=s))
    cmd = "python -m allmil_cli.train.protocol4" + (f" --reps {a.reps}" if a.reps != REPS else "") + (
        f" --legacy-reps {a.legacy_reps}" if a.legacy_reps != LEGACY_REPS else "") + (
        f" --recipe {a.recipe}" if a.recipe != "v2pbc" else "") + (f" --variant {variant}" if variant else "")
    if len(spread) > 1:
        cmd += " --seeds " + " ".join(str(s) for s in spread)
    text = markdown(res, cmd) + ("\n" + seeds_table(spread) if len(spread) > 1 else "")
    print(text)
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / f"targets_{a.recipe}{'_' + variant if variant else ''}.json").write_text(json.dumps([list(t) for t in targets(res)], indent=1))
    if not a.no_doc and variant is None:  # the shipped recipe's results, or (another recipe) a document of its own
        doc = DOC if a.recipe == "v2pbc" else DOC.with_name(f"protocol4_results_{a.recipe}.md")
        doc.write_text(f"# Protocol 4 results, recipe `{a.recipe}`\n\nWritten by `{cmd}`; see its docstring.\n\n" + text)
    print(f"({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
