"""Protocol 3 (cross-domain): protocol 2's held-out folds, seen through another lab's stain, camera and objective.

For every ALL-IDB1 field (a patient) and every shift of :data:`allmil_cli.train.shifts.PROTOCOL3`
(resolution: red cells 20 px and 14 px across, then JPEG quality 70; stain: hue rotation, HED stain-matrix
perturbation, saturation, gamma, a pink/purple Romanowsky cast, blur; stain and resolution combined), the
shifted field goes through the product path with that field's fold models, exported to ONNX:
``Pipeline.measure`` (red-cell ruler and anchor colours) -> fold detector -> ``crop_cells`` ->
``Embedder.normalise`` -> ``Embedder.embed`` -> ``Aggregator`` (patient p_all and per-cell blast scores).
No component saw the test field (protocol 2's folds); thresholds are fixed (patient 0.5 on the raw model
output, cell 0.5), never tuned on these predictions. Detection does not depend on the recipe, so each
shifted field is detected and cropped once and then embedded by every recipe's fold models.

Reported per shift: patient sensitivity, specificity, AUC; blast-cell recall (ground-truth blasts with a
detected cell within 0.8 red-cell diameter that the model scores blast-like); the share of held-out normal
white cells (ALL-IDB1 ``other/`` cells kept by the stain rule, and ALL-IDB2 normal crops) so matched that
are scored blast-like.

PBC leave-source-out (``pbc``): a model that never saw PBC (fold 0 of a recipe without PBC) scores PBC's
normal cells (all lymphocytes, 100 of each other type) under each stain shift, through the same crop,
ruler, normalisation and embedder path; reported is the share flagged blast-like, by cell type.

``python -m allmil_cli.train.protocol3 [fields|pbc|all] --recipes v1 v2 ...``: results to
``.cache/protocol3/`` and ``docs/cross_domain_results.md``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from functools import lru_cache
from pathlib import Path

import numpy as np

from allmil_cli.stages.crops import crop_cells
from allmil_cli.types.field import Field
from allmil_cli.stages.metrics import roc_auc
from allmil_cli.stages.models import load_models, write_manifest
from allmil_cli.types.results import MIN_CELLS_NORMAL
from allmil_cli.pipeline.runner import Pipeline
from allmil_cli.stages.scale import estimate_rbc_diameter
from allmil_cli.train.augment import RECIPES
from allmil_cli.train.data import load_rgb
from allmil_cli.train.export import export_onnx
from allmil_cli.train.inventory import PBC_TYPES, REPO, pbc_cells
from allmil_cli.train.protocol2 import FOLDS_DIR, K, Protocol2
from allmil_cli.train.shifts import PROTOCOL3, STAIN_SHIFTS, Shift

OUT = REPO / ".cache" / "protocol3"
DOC = REPO / "docs" / "cross_domain_results.md"
PATIENT_THRESHOLD = 0.5
CELL_THRESHOLD = 0.5
MATCH_RBC = 0.8  # a detection within this many red-cell diameters of a ground-truth centre is that cell
PBC_EVAL = {"lymphocyte": None, "monocyte": 100, "neutrophil": 100, "eosinophil": 100, "basophil": 100, "ig": 100,
            "erythroblast": 100}


def fold_pipelines(recipe: str, folds: range | list[int] = range(K), precision: str = "fp32") -> list[Pipeline]:
    """The recipe's protocol-2 fold models (trained or loaded from cache), exported to ONNX beside their fold
    detector, each opened as a product ``Pipeline``. ``precision="int8"``: with int8 copies of the detector and
    embedder (:mod:`allmil_cli.train.quantize`), each calibrated on its fold's training fields only."""
    from allmil_cli.stages.normalize import meta_for
    from allmil_cli.stages.models import INT8_FILES

    P = Protocol2(recipe=recipe, cells_source="detector", verbose=False)
    rec = RECIPES[recipe]
    out = []
    for k in folds:
        d = OUT / "models" / recipe / f"fold{k}"
        if not (d / "manifest.json").exists():
            m = P.model(k)
            export_onnx(P.backbone, m.head, m.agg, d, PATIENT_THRESHOLD, CELL_THRESHOLD, "max",
                        embedder_meta=meta_for() if rec.stain_norm else None)
            shutil.copy(FOLDS_DIR / f"detector_fold{k}.onnx", d / "detector.onnx")
            write_manifest(d)
        if precision == "int8" and not all((d / f).exists() for f in INT8_FILES.values()):
            from allmil_cli.train.quantize import quantize_weights

            quantize_weights(d, calibration_fields(P, k))
        out.append(Pipeline(load_models(d, device="cpu", threads=1, precision=precision)))
    return out


def calibration_fields(P: Protocol2, k: int) -> list[Path]:
    """int8 calibration fields of fold ``k``: every 2nd of its training ALL-IDB1 fields, and 16 BCCD train fields."""
    from allmil_cli.train.quantize import bccd_calibration_fields

    train = [r.path for r in P.recs if P.fold_of[r.name] != k]
    return train[::2] + bccd_calibration_fields()


def _match(xy: np.ndarray, pts: np.ndarray, radius: float) -> np.ndarray:
    """For each point in ``pts``, the index of the nearest detection within ``radius`` (-1: none)."""
    if len(pts) == 0:
        return np.zeros(0, int)
    if len(xy) == 0:
        return np.full(len(pts), -1)
    d = np.hypot(pts[:, None, 0] - xy[None, :, 0], pts[:, None, 1] - xy[None, :, 1])
    j = d.argmin(1)
    return np.where(d[np.arange(len(pts)), j] <= radius, j, -1)


def new_tally() -> dict:
    return {"y": [], "p": [], "n_cells": [], "scores": [], "same_as": [], "names": [], "blast_hits": 0, "blasts": 0, "normal_flags": 0, "normals": 0,
            "normals_found": 0, "blasts_found": 0, "blast_hits_shipped": 0, "normal_flags_shipped": 0}


def score_field(pipes: dict[str, Pipeline], path: Path, label: int, blasts: np.ndarray, normals: np.ndarray,
                shifts: list[Shift], tally: dict[str, dict[str, dict]]) -> None:
    """One held-out field under every shift, through the product path, into ``tally[recipe][shift]``.

    ``pipes``: one Pipeline per recipe (the fold's models); the first one's detector finds the cells (all share it).
    ``blasts`` / ``normals``: ground-truth centres (N, 2) in the field's full-resolution pixels."""
    rgb = load_rgb(path)
    rbc0 = estimate_rbc_diameter(rgb)
    first = next(iter(pipes.values()))
    extra = shipped_cell_threshold()
    for s in shifts:
        img, f = s.apply(rgb, rbc0)
        cells, stats = first.locate_cells(Field(path=path, page=0, rgb=img))
        xy = np.asarray([(c.x, c.y) for c in cells], np.float64).reshape(-1, 2)
        raw = crop_cells(img, xy, stats.rbc_px)
        radius = MATCH_RBC * rbc0 * f
        hb = _match(xy, np.asarray(blasts, np.float64).reshape(-1, 2) * f, radius)
        hn = _match(xy, np.asarray(normals, np.float64).reshape(-1, 2) * f, radius)
        for r, pl in pipes.items():
            feats = pl.embedder.embed(pl.embedder.normalise(raw, stats))
            scores = pl.aggregator.cell_scores(feats) if len(feats) else np.zeros(0, np.float32)
            d = tally.setdefault(r, {}).setdefault(s.name, new_tally())
            d["y"].append(int(label))
            d["p"].append(float(pl.aggregator.patient_probability(feats, seed=0)))
            d["n_cells"].append(len(cells))
            d["scores"].append([round(float(x), 5) for x in scores])  # each detected cell's blast score (the patient rule's input)
            d["same_as"].append([c.same_as for c in cells])  # each cell's twin (stages.count: counted once at the rule's threshold)
            d["names"].append(path.stem)
            d["blasts"] += len(hb)
            d["blasts_found"] += int((hb >= 0).sum())
            d["blast_hits"] += int(sum(scores[j] >= CELL_THRESHOLD for j in hb if j >= 0))
            d["normals"] += len(hn)
            d["normals_found"] += int((hn >= 0).sum())
            d["normal_flags"] += int(sum(scores[j] >= CELL_THRESHOLD for j in hn if j >= 0))
            d["blast_hits_shipped"] += int(sum(scores[j] >= extra for j in hb if j >= 0))
            d["normal_flags_shipped"] += int(sum(scores[j] >= extra for j in hn if j >= 0))


def run_fields(recipes: list[str], shifts: list[Shift] = PROTOCOL3, limit: int | None = None, verbose: bool = True,
               pipes: dict[str, list[Pipeline]] | None = None) -> dict:
    """Per recipe and shift: y, p_all per patient; blast and normal-cell hits (see the module docstring).

    ``pipes``: name -> the K fold pipelines, instead of the ``recipes``' own (e.g. int8 variants; ``recipes[0]``
    still gives the folds and cells). The first one's detector finds the cells for all."""
    P = Protocol2(recipe=recipes[0], cells_source="detector", verbose=False)
    pipes = pipes or {r: fold_pipelines(r) for r in recipes}
    normals: dict[str, list[tuple[float, float]]] = {}
    for c in P.cells:
        if c.label == 0 and c.kind in ("idb1", "idb2") and c.idb1_field:
            normals.setdefault(c.idb1_field, []).append((c.x, c.y))
    tally: dict[str, dict[str, dict]] = {r: {s.name: new_tally() for s in shifts} for r in pipes}
    recs = P.recs[:limit] if limit else P.recs
    t0 = time.time()
    for i, rec in enumerate(recs):
        k = P.fold_of[rec.name]
        score_field({r: pipes[r][k] for r in pipes}, rec.path, rec.label, rec.blasts, np.asarray(normals.get(rec.name, [])),
                    shifts, tally)
        if verbose and (i + 1) % 10 == 0:
            print(f"  protocol 3: {i + 1}/{len(recs)} fields, {time.time() - t0:.0f}s", flush=True)
    return tally


def summarise(d: dict) -> dict:
    y, p = np.asarray(d["y"]), np.asarray(d["p"])
    call = p >= PATIENT_THRESHOLD
    return {"sensitivity": float(call[y == 1].mean()), "specificity": float((~call[y == 0]).mean()),
            "accuracy": float((call == (y == 1)).mean()), "auc": float(roc_auc(y, p)),
            "blast_recall": d["blast_hits"] / max(d["blasts"], 1), "blast_detected": d["blasts_found"] / max(d["blasts"], 1),
            "normals_flagged": d["normal_flags"] / max(d["normals_found"], 1), "n_normals": d["normals_found"],
            "blast_recall_shipped": d.get("blast_hits_shipped", float("nan")) / max(d["blasts"], 1),
            "normals_flagged_shipped": d.get("normal_flags_shipped", float("nan")) / max(d["normals_found"], 1),
            "cells_median": float(np.median(d["n_cells"]))}


def run_pbc(recipe: str, shifts: list[Shift] = STAIN_SHIFTS, verbose: bool = True) -> dict:
    """Share of PBC cells flagged blast-like, by type and stain shift, by ``recipe``'s fold-0 model (no PBC in it)."""
    if RECIPES[recipe].pbc:
        raise ValueError(f"recipe {recipe} trains on PBC; leave-source-out needs a recipe without it")
    pl = fold_pipelines(recipe, [0])[0]
    cells = pbc_cells(per_type={k: v for k, v in PBC_EVAL.items() if v}, seed=1)
    out: dict[str, dict[str, list[int]]] = {s.name: {} for s in shifts}
    extra = shipped_cell_threshold()
    t0 = time.time()
    for i, c in enumerate(cells):
        rgb = load_rgb(Path(c.path))
        kind = c.key.split("/")[1]
        crops = []
        for s in shifts:
            img, _ = s.apply(rgb, c.rbc_px)
            stats = pl.measure(img)
            crop = crop_cells(img, np.array([[img.shape[1] / 2.0, img.shape[0] / 2.0]]), stats.rbc_px)
            crops.append(pl.embedder.normalise(crop, stats))
        scores = pl.aggregator.cell_scores(pl.embedder.embed(np.concatenate(crops)))  # one batch: every shift of the cell
        for s, score in zip(shifts, scores):
            n_flag = out[s.name].setdefault(kind, [0, 0, 0])  # flagged at 0.5, cells, flagged at the shipped threshold
            n_flag[0] += int(score >= CELL_THRESHOLD)
            n_flag[1] += 1
            n_flag[2] += int(score >= extra)
        if verbose and (i + 1) % 200 == 0:
            print(f"  PBC: {i + 1}/{len(cells)} cells, {time.time() - t0:.0f}s", flush=True)
    return out


@lru_cache(maxsize=1)
def _shipped_selection() -> dict:
    """The shipped recipe's operating point, chosen on unshifted protocol-2 out-of-fold predictions (read once)."""
    from allmil_cli.train.augment import SHIPPED_RECIPE
    from allmil_cli.train.protocol2 import selection_path

    f = selection_path(SHIPPED_RECIPE)
    return json.loads(f.read_text()) if f.exists() else {}


@lru_cache(maxsize=1)
def shipped_cell_threshold() -> float:
    """The shipped blast-like cell threshold (raw cell score): the one in the shipped aggregator's metadata (the patient
    rule's, ``allmil_cli.train.rule``), else the recipe's selection file."""
    import onnxruntime as ort

    from allmil_cli.train.inventory import WEIGHTS

    meta = ort.InferenceSession(str(WEIGHTS / "aggregator.onnx"), providers=["CPUExecutionProvider"]).get_modelmeta()
    value = (meta.custom_metadata_map or {}).get("allmil.cell_threshold")
    return float(value) if value is not None else float(_shipped_selection().get("cell_threshold", CELL_THRESHOLD))


def shipped_patient_threshold() -> float:
    """The shipped patient threshold on the raw model output."""
    return float(_shipped_selection().get("threshold", PATIENT_THRESHOLD))


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def write_doc(fields: dict | None, pbc: dict | None, cmd: str) -> str:
    lines = ["# Cross-domain results (protocol 3)\n",
             f"Generated by `{cmd}` on a 2-core CPU. Method and definitions: `allmil_cli/train/protocol3.py` "
             "(docstring); shifts: `allmil_cli/train/shifts.py`; recipes: `allmil_cli/train/augment.py` (`RECIPES`). "
             f"Fixed thresholds: patient {PATIENT_THRESHOLD} (raw model output), cell {CELL_THRESHOLD}. "
             "Targets under every shift: sensitivity >= 95 %, specificity >= 90 %, blast-cell recall >= 90 %, "
             "PBC lymphocytes flagged <= 5 %.\n"]
    if fields:
        for r, per in fields.items():
            lines.append(f"\n## Recipe `{r}`: ALL-IDB1 held-out fields (108 patients: 49 ALL, 59 normal)\n")
            lines.append(f"Cell columns at score >= {CELL_THRESHOLD} (after a slash, where measured: >= {shipped_cell_threshold():.3f}, the shipped "
                         "blast-like threshold). Blasts detected: ground-truth blasts with a detection within 0.8 red-cell diameter.\n")
            lines.append("| shift | sens % | spec % | acc % | AUC | blast-cell recall % | blasts detected % | normal cells flagged % (n) | cells/field (median) |")
            lines.append("|---|---|---|---|---|---|---|---|---|")
            for s, d in per.items():
                m = summarise(d)
                two = "blast_hits_shipped" in d
                br = _pct(m["blast_recall"]) + (f" / {_pct(m['blast_recall_shipped'])}" if two else "")
                nf = _pct(m["normals_flagged"]) + (f" / {_pct(m['normals_flagged_shipped'])}" if two else "")
                lines.append(f"| {s} | {_pct(m['sensitivity'])} | {_pct(m['specificity'])} | {_pct(m['accuracy'])} | {m['auc']:.3f} | "
                             f"{br} | {_pct(m['blast_detected'])} | {nf} ({m['n_normals']}) | {m['cells_median']:.0f} |")
            d = per.get("none")
            if d:
                y, p, n = np.asarray(d["y"]), np.asarray(d["p"]), np.asarray(d["n_cells"])
                insufficient = (n < MIN_CELLS_NORMAL) & (p < PATIENT_THRESHOLD)
                keep = ~insufficient
                call = p[keep] >= PATIENT_THRESHOLD
                yk = y[keep]
                lines.append(f"\nWith the product's adequacy rule (a `normal` call needs >= {MIN_CELLS_NORMAL} cells), shift `none`: "
                             f"{int(insufficient.sum())} of {len(y)} patients `insufficient` ({int((insufficient & (y == 1)).sum())} ALL, "
                             f"{int((insufficient & (y == 0)).sum())} normal); on the other {int(keep.sum())}: sensitivity "
                             f"{_pct(call[yk == 1].mean() if (yk == 1).any() else float('nan'))} %, specificity "
                             f"{_pct((~call[yk == 0]).mean() if (yk == 0).any() else float('nan'))} %.")
    if fields:
        from allmil_cli.train.thresholds import pick_threshold_margin

        names = list(next(iter(fields.values())))
        thr = {r: pick_threshold_margin(np.asarray(per["none"]["y"]), np.asarray(per["none"]["p"])) for r, per in fields.items()}
        lines.append("\n## Sensitivity / specificity % at each recipe's own operating point\n")
        lines.append("The threshold of each recipe is the shipped rule (`pick_threshold_margin`) applied to its unshifted "
                     "out-of-fold predictions (shift `none`), so the `none` row is optimistic; the shifted rows use a threshold "
                     "that never saw shifted data. Thresholds: " + ", ".join(f"`{r}` {t:.3f}" for r, t in thr.items()) + ".\n")
        lines.append("| shift | " + " | ".join(f"`{r}`" for r in fields) + " |")
        lines.append("|---" * (len(fields) + 1) + "|")
        for sname in names:
            cells = []
            for r, per in fields.items():
                y, pp = np.asarray(per[sname]["y"]), np.asarray(per[sname]["p"])
                c = pp >= thr[r]
                cells.append(f"{_pct(c[y == 1].mean())} / {_pct((~c[y == 0]).mean())}")
            lines.append(f"| {sname} | " + " | ".join(cells) + " |")
    if pbc:
        for r, per in pbc.items():
            types = [t for t in PBC_TYPES if any(t in v for v in per.values())]
            lines.append(f"\n## PBC leave-source-out, recipe `{r}` (fold-0 model, never saw PBC): % of cells flagged blast-like\n")
            lines.append(f"At cell score >= {CELL_THRESHOLD} (and, after the slash, >= {shipped_cell_threshold():.3f}: the shipped "
                         "recipe's blast-like threshold, chosen on unshifted protocol-2 out-of-fold cells). n = cells per type.\n")
            lines.append("| shift | " + " | ".join(f"{t} (n)" for t in types) + " |")
            lines.append("|---" * (len(types) + 1) + "|")
            for s, by in per.items():
                lines.append(f"| {s} | " + " | ".join(
                    f"{_pct(by[t][0] / max(by[t][1], 1))}" + (f" / {_pct(by[t][2] / max(by[t][1], 1))}" if len(by[t]) > 2 else "")
                    + f" ({by[t][1]})" for t in types) + " |")
    text = "\n".join(lines) + "\n"
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m allmil_cli.train.protocol3", description=__doc__.split("\n")[0])
    ap.add_argument("what", choices=["fields", "pbc", "all", "doc"], nargs="?", default="all",
                    help="doc: rewrite the results document from the saved results")
    ap.add_argument("--recipes", nargs="+", default=["v1", "v2", "v2pbc"], choices=sorted(RECIPES))
    ap.add_argument("--limit", type=int, default=None, help="first N fields only (a quick look; not a result)")
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    OUT.mkdir(parents=True, exist_ok=True)
    fields_f, pbc_f = OUT / "fields.json", OUT / "pbc.json"
    fields = json.loads(fields_f.read_text()) if fields_f.exists() else {}
    pbc = json.loads(pbc_f.read_text()) if pbc_f.exists() else {}
    if a.what in ("fields", "all"):
        fields.update(run_fields(a.recipes, limit=a.limit))
        if not a.limit:
            fields_f.write_text(json.dumps(fields))
    if a.what in ("pbc", "all"):
        for r in a.recipes:
            if not RECIPES[r].pbc:
                pbc[r] = run_pbc(r)
        pbc_f.write_text(json.dumps(pbc))
    text = write_doc(fields, pbc, "python -m allmil_cli.train.protocol3 all --recipes " + " ".join(fields or pbc))
    if not a.limit:
        DOC.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
