"""The paper-style stack in PyTorch eager mode, for speed comparisons: Faster R-CNN ResNet50-FPN on the full field,
AlexNet fc7 features of 10 crops of 224x224, LSTM(256) + FC, with random weights (speed does not depend on them).
torch and torchvision are imported when a :class:`Baseline` is built. Used by bench.py and bench_scaling.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from common import Phase, decode_full, measured

BASELINE_STAGES = ("decode", "detect", "crop", "embed", "aggregate")
BASELINE_CROPS = 10


class Baseline:
    """Faster R-CNN ResNet50-FPN on the field -> 10 crops -> AlexNet fc7 -> LSTM(256) -> FC, random weights."""

    def __init__(self, device: str) -> None:
        import torch
        import torchvision

        self.torch = torch
        self.device = torch.device(device)
        self.detector = torchvision.models.detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None).eval()
        alex = torchvision.models.alexnet(weights=None).eval()
        self.alex_trunk = torch.nn.Sequential(alex.features, alex.avgpool, torch.nn.Flatten(), *list(alex.classifier)[:-1])
        self.lstm = torch.nn.LSTM(4096, 256, batch_first=True)
        self.fc = torch.nn.Linear(256, 2)
        for m in (self.detector, self.alex_trunk, self.lstm, self.fc):
            m.to(self.device).eval()
        self.mean = torch.tensor([0.485, 0.456, 0.406], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor([0.229, 0.224, 0.225], device=self.device).view(1, 3, 1, 1)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def _boxes(self, det_boxes, h: int, w: int):
        """Top detections, filled up to 10 with a 5x2 grid of 224x224 windows (random weights detect little)."""
        torch = self.torch
        grid = []
        for gy in range(2):
            for gx in range(5):
                cx = (gx + 0.5) * w / 5
                cy = (gy + 0.5) * h / 2
                grid.append([cx - 112, cy - 112, cx + 112, cy + 112])
        grid_t = torch.tensor(grid, dtype=torch.float32, device=self.device)
        return torch.cat([det_boxes[:BASELINE_CROPS].float(), grid_t])[:BASELINE_CROPS]

    def run_field(self, path: Path, stages: dict[str, float], decoded: Any = None) -> None:
        """One field; ``decoded``: the field already decoded elsewhere (an RGB array from decode threads, or a
        (3, H, W) uint8 tensor on the device from nvJPEG), else it is decoded here."""
        torch = self.torch
        from torchvision.ops import roi_align

        with torch.inference_mode():
            t0 = time.perf_counter()
            if decoded is None:
                decoded = decode_full(path)
            if isinstance(decoded, np.ndarray):
                h, w = decoded.shape[:2]
                img = torch.from_numpy(np.require(decoded, requirements="W")).to(self.device).permute(2, 0, 1).float().div_(255.0)
            else:
                h, w = decoded.shape[1:]
                img = decoded.to(self.device).float().div_(255.0)
            self._sync()
            t1 = time.perf_counter()
            det = self.detector([img])[0]
            self._sync()
            t2 = time.perf_counter()
            boxes = self._boxes(det["boxes"], h, w)
            crops = roi_align(img[None], [boxes], output_size=(224, 224), spatial_scale=1.0, sampling_ratio=2, aligned=True)
            crops = (crops - self.mean) / self.std
            self._sync()
            t3 = time.perf_counter()
            feats = self.alex_trunk(crops)
            self._sync()
            t4 = time.perf_counter()
            out, _ = self.lstm(feats[None])
            prob = torch.softmax(self.fc(out[:, -1]), dim=1)[0, 1]
            float(prob)  # forces the result (and a sync on cuda)
            t5 = time.perf_counter()
        for s, a, b in zip(BASELINE_STAGES, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5)):
            stages[s] = stages.get(s, 0.0) + (b - a)


def run_baseline(baseline: Baseline, paths: list[Path], name: str) -> Phase:
    baseline.run_field(paths[0], {})  # warm-up
    phase = Phase(name)
    with measured(phase):
        for p in paths:
            t = time.perf_counter()
            baseline.run_field(p, phase.stages)
            dt = time.perf_counter() - t
            phase.per_field_s.append(dt)
            phase.per_path_s[p] = dt
    phase.cells = BASELINE_CROPS * phase.n
    return phase
