"""Cell embedder (inference): frozen ImageNet CNN + trained FC(256), one ONNX graph ``embedder.onnx``.

numpy + onnxruntime only. The graph takes RGB crops in 0..255 ([N,3,224,224] float32; ImageNet
normalisation is inside) and returns the 256-d cell embeddings (FC256 output after ReLU).
"""

from __future__ import annotations

import numpy as np

from allmil_cli.stages.normalize import reference_from_meta, stain_map
from allmil_cli.types.field import FieldStats

EMB_DIM = 256
INPUT_SIZE = 224


class Embedder:
    def __init__(self, session) -> None:
        self.session = session
        meta = session.get_modelmeta().custom_metadata_map or {}
        self.backbone = meta.get("allmil.backbone", "")
        self.input_size = int(meta.get("allmil.input_size", INPUT_SIZE))
        self._input = session.get_inputs()[0].name
        self._blank: np.ndarray | None = None
        #: (background, red-cell) reference colours when the model was trained on stain-normalised crops
        self.stain_reference = reference_from_meta(meta)

    def normalise(self, crops: np.ndarray, stats: FieldStats) -> np.ndarray:
        """Map a field's crops to the reference stain (``allmil_cli.stages.normalize``), if this model expects it."""
        if self.stain_reference is None or not stats.measured or len(crops) == 0:
            return crops
        return stain_map(stats, *self.stain_reference).apply(crops)

    def embed(self, crops: np.ndarray, batch_size: int = 32) -> np.ndarray:
        """uint8 crops (N, 224, 224, 3) RGB -> float32 (N, 256)."""
        crops = np.asarray(crops)
        if crops.ndim != 4 or crops.shape[-1] != 3:
            raise ValueError(f"crops must be (N, H, W, 3), got {crops.shape}")
        if crops.shape[1:3] != (self.input_size, self.input_size):
            raise ValueError(f"crops must be {self.input_size}x{self.input_size}, got {crops.shape[1:3]}")
        out = np.zeros((len(crops), EMB_DIM), np.float32)
        for i in range(0, len(crops), max(1, int(batch_size))):
            x = np.ascontiguousarray(crops[i : i + batch_size].transpose(0, 3, 1, 2), dtype=np.float32)
            out[i : i + len(x)] = self.session.run(None, {self._input: x})[0]
        return out

    def blank_features(self) -> np.ndarray:
        """Embedding (256,) of the blank (all-zero) crop used to pad bags, as in training."""
        if self._blank is None:
            blank = np.zeros((1, self.input_size, self.input_size, 3), np.uint8)
            self._blank = self.embed(blank)[0]
        return self._blank.copy()
