"""The trainable part of the paper's model, on cached backbone features: FC256 cell head + LSTM aggregator.

Architecture: frozen ImageNet CNN -> trainable FC(256)+ReLU = the cell *embedding*; the patient's cells
(shuffled) -> LSTM(256 hidden) -> last hidden state -> FC(64)+ReLU = 64-d *patient vector* -> FC(2) -> p_all.

Training (minutes on one CPU core):
* stage 1: series of length 1 (one cell) -> blast / not blast, balanced batches;
* stage 2: generated bags of ``bag_size`` (15) slots: label ALL (1) iff >= 1 blast; the number of real
  cells is uniform in 1..15 (rest padded with the embedding of a blank, all-zero crop), ALL bags hold
  1..n blasts (half of them only 1-3, so a lone blast must suffice), order shuffled; a length-1 loss
  (weight 0.5) keeps the single-cell view calibrated (``Aggregator.cell_scores`` relies on it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from allmil_cli.train.inventory import Cell

BAG_SIZE = 15
EMB_DIM = 256


def make_modules(in_dim: int, dropout: float = 0.2):
    import torch
    from torch import nn

    class CellHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.drop = nn.Dropout(dropout)
            self.fc = nn.Linear(in_dim, EMB_DIM)

        def forward(self, x):
            return torch.relu(self.fc(self.drop(x)))

    class AggNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(EMB_DIM, 256, batch_first=True)
            self.fc64 = nn.Linear(256, 64)
            self.out = nn.Linear(64, 2)

        def forward(self, f):
            _, (h, _) = self.lstm(f)
            pv = torch.relu(self.fc64(h[-1]))
            return self.out(pv), pv

    return CellHead(), AggNet()


@dataclass
class TrainConfig:
    stage1_steps: int = 1000
    stage2_steps: int = 1500
    bag_size: int = BAG_SIZE
    batch1: int = 64
    batch2: int = 32
    lr: float = 1e-3
    lr2: float = 5e-4
    aux_weight: float = 0.5
    stage1: bool = True
    seed: int = 0
    max_real: int | None = None  # default: bag_size
    hard_neg_weight: float = 1.0  # sampling weight of normal WBCs from ALL fields (crowded, blast neighbours)


def _pick_views(feats: np.ndarray, idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    v = rng.integers(0, feats.shape[1], size=idx.shape)
    return feats[idx, v].astype(np.float32)


def make_bags(n: int, blasts: np.ndarray, normals: np.ndarray, bag: int, rng: np.random.Generator, max_real: int | None = None,
              p_normals: np.ndarray | None = None):
    """Index bags (n, bag) into [blasts..., normals...] pool order; -1 = blank. Returns (idx, labels)."""
    max_real = max_real or bag
    idx = np.full((n, bag), -1, np.int64)
    y = (rng.random(n) < 0.5).astype(np.int64)
    nb_pool = len(blasts)
    for i in range(n):
        k = int(rng.integers(1, max_real + 1))
        if y[i]:
            nb = int(rng.integers(1, min(3, k) + 1)) if rng.random() < 0.5 else int(rng.integers(1, k + 1))
        else:
            nb = 0
        cells = (np.concatenate([rng.choice(blasts, nb), nb_pool + rng.choice(normals, k - nb, p=p_normals)]) if k - nb > 0
                 else rng.choice(blasts, nb))
        slots = rng.permutation(bag)[:k]
        idx[i, slots] = cells
    return idx, y


def sample_weights(cells: list[Cell], cfg: TrainConfig) -> np.ndarray:
    """Per-cell sampling weight: ``hard_neg_weight`` for normal WBCs of ALL fields (name ends in _1)."""
    return np.array([cfg.hard_neg_weight if (c.label == 0 and c.kind in ("idb1", "idb2") and c.idb1_field.endswith("_1"))
                     else 1.0 for c in cells])


def train(feats: np.ndarray, labels: np.ndarray, blank: np.ndarray, cfg: TrainConfig, verbose: bool = True,
          weights: np.ndarray | None = None):
    """Train CellHead + AggNet on cached backbone features (N, V, D) with cell labels (N,)."""
    import torch
    from torch import nn

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    head, agg = make_modules(feats.shape[2])
    blasts = np.nonzero(labels == 1)[0]
    normals = np.nonzero(labels == 0)[0]
    pool = np.concatenate([blasts, normals])  # bag index -> feats row
    w = np.ones(len(labels)) if weights is None else np.asarray(weights, np.float64)
    pn = w[normals] / w[normals].sum()  # sampling distribution over normals
    blank_t = torch.from_numpy(blank.astype(np.float32))
    ce = nn.CrossEntropyLoss()
    params = list(head.parameters()) + list(agg.parameters())

    def single_batch(n):
        ib = rng.choice(blasts, n // 2)
        inn = rng.choice(normals, n - n // 2, p=pn)
        idx = np.concatenate([ib, inn])
        x = torch.from_numpy(_pick_views(feats, idx, rng))
        y = torch.from_numpy(np.concatenate([np.ones(len(ib)), np.zeros(len(inn))]).astype(np.int64))
        return x, y

    def single_loss(n):
        x, y = single_batch(n)
        logits, _ = agg(head(x)[:, None, :])
        return ce(logits, y)

    t0 = time.time()
    head.train()
    agg.train()
    if cfg.stage1 and cfg.stage1_steps:
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=1e-4)
        for step in range(cfg.stage1_steps):
            loss = single_loss(cfg.batch1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if verbose and (step + 1) % 250 == 0:
                print(f"  stage1 {step + 1}/{cfg.stage1_steps} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    opt = torch.optim.Adam(params, lr=cfg.lr2 if cfg.stage1 else cfg.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, cfg.stage2_steps))
    for step in range(cfg.stage2_steps):
        bidx, y = make_bags(cfg.batch2, np.arange(len(blasts)), np.arange(len(normals)), cfg.bag_size, rng, cfg.max_real, pn)
        real = bidx >= 0
        rows = pool[bidx[real]]
        x = torch.from_numpy(_pick_views(feats, rows, rng))  # (n_real, D): the head runs on real cells only
        eb = head(blank_t[None])[0]
        e = eb.expand(bidx.shape[0], bidx.shape[1], EMB_DIM)
        e = e.index_put((torch.from_numpy(np.nonzero(real)[0]), torch.from_numpy(np.nonzero(real)[1])), head(x))
        logits, _ = agg(e)
        loss = ce(logits, torch.from_numpy(y))
        if cfg.aux_weight:
            loss = loss + cfg.aux_weight * single_loss(cfg.batch2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if verbose and (step + 1) % 250 == 0:
            print(f"  stage2 {step + 1}/{cfg.stage2_steps} loss {loss.item():.4f} {time.time() - t0:.0f}s", flush=True)
    head.eval()
    agg.eval()
    return head, agg


class TorchModel:
    """Inference twin of the ONNX pair on cached backbone features (for fast evaluation)."""

    def __init__(self, head, agg, blank_backbone_feature: np.ndarray):
        import torch

        self.head, self.agg = head, agg
        with torch.no_grad():
            self.blank = head(torch.from_numpy(blank_backbone_feature[None].astype(np.float32))).numpy()[0]

    def embed(self, backbone_feats: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.head(torch.from_numpy(np.asarray(backbone_feats, np.float32))).numpy()

    def run(self, x: np.ndarray) -> np.ndarray:
        import torch

        with torch.no_grad():
            logits, _ = self.agg(torch.from_numpy(np.asarray(x, np.float32)))
            return torch.softmax(logits, 1)[:, 1].numpy()
