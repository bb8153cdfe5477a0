"""Ablations of section 5 of the paper on protocol 2: cells per patient, backbone, LSTM vs counts, stage 1, series length."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from allmil_cli.train.inventory import CACHE
from allmil_cli.train.protocol2 import ABL, DEFAULT_AUG, K, Protocol2, _sel
from allmil_cli.train.results import _cmd, save_section
from allmil_cli.train.thresholds import HEAD, auc, metrics, pick_threshold, row


def run_cells(a) -> None:
    P = Protocol2(cells_source=a.cells)
    sel = _sel()
    lines = []
    for k in (1, 2, 4, 8, 15, 30):
        accs, aucs = [], []
        for seed in range(5):
            def select(name, f, blast, rng, k=k):
                return f[rng.permutation(len(f))[:k]]
            _, y, p, _ = P.predict(combine=sel["combine"], select=select, seed=seed)
            accs.append(metrics(y, p, sel["threshold"])["acc"])
            aucs.append(auc(y, p))
        lines.append(f"| {k} | {100 * np.mean(accs):.2f} +- {100 * np.std(accs):.2f} | {np.mean(aucs):.4f} |")
    txt = f"""## Ablation: accuracy vs cells per patient

Command: `{_cmd(a)}`. Setup: {P.describe()}; protocol 2 out-of-fold. k cells sampled at random per image
(all of them when the image has fewer), 5 sampling seeds (mean +- sd); rule `{sel['combine']}`, threshold {sel['threshold']:.3f}.

| cells sampled | accuracy % | AUC |
|---|---|---|
{chr(10).join(lines)}
"""
    save_section("cells", txt)


def run_backbone(a) -> None:
    lines = []
    for bb in ("mobilenet_v2", "efficientnet_lite0", "mobilenet_v2:center", "efficientnet_lite0:center"):
        try:
            if bb == "mobilenet_v2" and (CACHE / f"feats_{bb}_a{DEFAULT_AUG}.npz").exists():  # 6-view avg cache, 2 views used
                P = Protocol2(backbone=bb, n_aug=DEFAULT_AUG, view_subset=2, cells_source=a.cells, cfg=ABL)
            else:
                P = Protocol2(backbone=bb, n_aug=2, cells_source=a.cells, cfg=ABL)
        except FileNotFoundError as e:
            lines.append(f"| {bb} | unavailable: {e} | | | | | | |")
            continue
        _, y, p, _ = P.predict()
        lines.append(row(f"{bb} @0.5", metrics(y, p, 0.5)))
        cy, cp = P.cell_oof()
        _, y2, p2, _ = P.predict(select=lambda n, f, b, r: f[~b])
        rec = float(((p2 >= 0.5) & (y2 == 1)).sum() / (y2 == 1).sum())
        lines.append(f"| {bb}: cell-level AUC (OOF) {auc(cy, cp):.4f}; stress 'blasts removed' recall @0.5 {100 * rec:.2f} % | | | | | | | |")
        src = P.describe().split(", ", 2)[-1]
    txt = f"""## Ablation: backbone (offline ImageNet weights available here)

Command: `{_cmd(a)}`. Protocol 2, {src}; 2 augmented views/cell for both (a cheaper cache than the
shipped 6), ablation training budget (stage 1 {ABL.stage1_steps} / stage 2 {ABL.stage2_steps} steps). AlexNet / ResNet50 / VGG16 / Inception-v3 / ViT-B/16 are supported (`--backbone`,
`--backbone-weights FILE`) but have no weights on this machine. `:center` = centre pooling (global average
concatenated with the average of the central 3x3 of the 7x7 map; see `backbones.py`); the others use
global average pooling.

{HEAD}
{chr(10).join(lines)}
"""
    save_section("backbone", txt)


def run_counts(a) -> None:
    """LSTM vs a perceptron on (blast-like, normal-like) counts, same fold embedders."""
    import torch

    P = Protocol2(cells_source=a.cells)
    sel = _sel()
    _, y, p, _ = P.predict(combine=sel["combine"])
    lines = [row("LSTM aggregator (ours) @0.5", metrics(y, p, 0.5)),
             row("LSTM aggregator (ours) @OOF thr (optimistic)", metrics(y, p, sel["threshold"]))]
    cthr = sel.get("cell_threshold", 0.5)
    labels = np.array([c.label for c in P.cells])
    py = []
    pp = []
    for k in range(K):
        m = P.model(k)
        test = {n for n, f in P.fold_of.items() if f == k}
        tr = np.array([c.idb1_field not in test for c in P.cells])
        e = m.embed(P.fc["feats"][tr, 0].astype(np.float32))
        s = m.run(e[:, None, :])
        lab = labels[tr]
        # perceptron (logistic unit) on [n_blast_like, n_normal_like], trained on generated bags of
        # training cells (1..15 cells, ALL iff >= 1 true blast), with the cells' in-sample scores
        rng = np.random.default_rng(k)
        X, Y = [], []
        bl, nl = np.nonzero(lab == 1)[0], np.nonzero(lab == 0)[0]
        for _ in range(4000):
            n = rng.integers(1, 16)
            yy = rng.random() < 0.5
            nb = rng.integers(1, n + 1) if yy else 0
            idx = np.concatenate([rng.choice(bl, nb), rng.choice(nl, n - nb)]).astype(int)
            nbl = (s[idx] >= cthr).sum()
            X.append([nbl, n - nbl])
            Y.append(int(yy))
        X = torch.tensor(np.array(X, np.float32))
        Y = torch.tensor(np.array(Y, np.float32))
        lin = torch.nn.Linear(2, 1)
        opt = torch.optim.Adam(lin.parameters(), lr=0.05)
        for _ in range(500):
            loss = torch.nn.functional.binary_cross_entropy_with_logits(lin(X)[:, 0], Y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        for r in P.recs:
            if P.fold_of[r.name] != k:
                continue
            f, _ = P.test_cells(r.name)
            sc = m.run(m.embed(f)[:, None, :]) if len(f) else np.zeros(0)
            nb = (sc >= cthr).sum()
            with torch.no_grad():
                pp.append(float(torch.sigmoid(lin(torch.tensor([[nb, len(sc) - nb]], dtype=torch.float32)))[0, 0]))
            py.append(r.label)
    py, pp = np.array(py), np.array(pp)
    lines.append(row("perceptron on counts @0.5", metrics(py, pp, 0.5)))
    lines.append(row("perceptron on counts @OOF thr (optimistic)", metrics(py, pp, pick_threshold(py, pp))))
    txt = f"""## Ablation: LSTM vs a perceptron on per-patient blast / normal counts

Command: `{_cmd(a)}`. Setup: {P.describe()}; protocol 2. Both use the same fold embedders and cell
scores (length-1 series, cell threshold {cthr:.3f}); the perceptron is a logistic unit on
(n_blast_like, n_normal_like), trained per fold on 4000 generated bags of training cells.

{HEAD}
{chr(10).join(lines)}
"""
    save_section("counts", txt)


def run_stage1(a) -> None:
    lines = []
    for s1 in (True, False):
        cfg = ABL if s1 else replace(ABL, stage1=False, aux_weight=0.0)
        P = Protocol2(cells_source=a.cells, cfg=cfg)
        _, y, p, _ = P.predict()
        name = "with stage 1 (+ length-1 aux loss in stage 2) @0.5" if s1 else "without stage 1 (no length-1 aux loss) @0.5"
        lines.append(row(name, metrics(y, p, 0.5)))
    txt = f"""## Ablation: with vs without stage-1 (single-cell) pre-training

Command: `{_cmd(a)}`. Setup: {P.describe()}; protocol 2, rule `max`. Ablation training budget
(both rows): stage 1 {ABL.stage1_steps} steps, stage 2 {ABL.stage2_steps} steps (shipped: 1000 / 1500). Without stage 1,
stage 2 runs alone from scratch at the stage-1 learning rate.

{HEAD}
{chr(10).join(lines)}
"""
    save_section("stage1", txt)


def run_length(a) -> None:
    lines = []
    for L in (1, 4, 8, 15, 32):
        cfg = replace(ABL, bag_size=L)
        P = Protocol2(cells_source=a.cells, cfg=cfg)
        _, y, p, _ = P.predict(bag_size=L)
        lines.append(row(f"series length {L} @0.5", metrics(y, p, 0.5)))
    txt = f"""## Ablation: training series (bag) length

Command: `{_cmd(a)}`. Setup: {P.describe()}; protocol 2. Stage 2 trained on bags of L slots (1..L real
cells, blank padding); at test the patient's cells go into bags of L, combined by `max`. Ablation training
budget: stage 1 {ABL.stage1_steps} steps, stage 2 {ABL.stage2_steps} steps (shipped: 1000 / 1500).

{HEAD}
{chr(10).join(lines)}
"""
    save_section("length", txt)
