"""ONNX export of the cell models (backbone + FC256 as ``embedder.onnx``, LSTM as ``aggregator.onnx``) and its check."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from allmil_cli.train.features import to_tensor
from allmil_cli.train.mil import BAG_SIZE, EMB_DIM


def export_onnx(backbone_name: str, head, agg, out_dir: Path, threshold: float, cell_threshold: float, combine: str,
                weights_file: str | None = None, extra_meta: dict | None = None,
                embedder_meta: dict | None = None, input_size: int = 224) -> tuple[Path, Path]:
    """``input_size``: the embedder's crop side (224 as shipped; the embedder ablation exports 160 / 128 too)."""
    import onnx
    import torch
    from torch import nn

    from allmil_cli.train.backbones import build_backbone

    out_dir.mkdir(parents=True, exist_ok=True)
    bb = build_backbone(backbone_name, weights_file)

    class EmbedNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.bb, self.head = bb, head

        def forward(self, crops):
            return self.head(self.bb(crops))

    class AggExport(nn.Module):
        def __init__(self):
            super().__init__()
            self.agg = agg

        def forward(self, features):
            logits, pv = self.agg(features)
            return torch.softmax(logits, dim=1)[:, 1], pv

    emb_path, agg_path = out_dir / "embedder.onnx", out_dir / "aggregator.onnx"
    en, an = EmbedNet().eval(), AggExport().eval()
    with torch.no_grad():
        torch.onnx.export(en, (torch.zeros(2, 3, input_size, input_size),), str(emb_path), input_names=["crops"], output_names=["features"],
                          dynamic_axes={"crops": {0: "N"}, "features": {0: "N"}}, opset_version=17, dynamo=False)
        torch.onnx.export(an, (torch.zeros(2, BAG_SIZE, EMB_DIM),), str(agg_path), input_names=["features"],
                          output_names=["p_all", "patient_vector"],
                          dynamic_axes={"features": {0: "B", 1: "T"}, "p_all": {0: "B"}, "patient_vector": {0: "B"}},
                          opset_version=17, dynamo=False)

    def meta(path, kv):
        m = onnx.load(str(path))
        del m.metadata_props[:]
        for k, v in kv.items():
            p = m.metadata_props.add()
            p.key, p.value = k, str(v)
        onnx.save(m, str(path))

    from allmil_cli.train.backbones import split_spec

    bname, pooling = split_spec(backbone_name)
    meta(emb_path, {"allmil.kind": "embedder", "allmil.backbone": bname, "allmil.pooling": pooling, "allmil.input_size": input_size,
                    "allmil.version": 1, **(embedder_meta or {})})
    am = {"allmil.kind": "aggregator", "allmil.bag_size": BAG_SIZE, "allmil.threshold": f"{threshold:.4f}",
          "allmil.cell_threshold": f"{cell_threshold:.4f}", "allmil.combine": combine, "allmil.version": 1}
    am.update(extra_meta or {})
    meta(agg_path, am)
    return emb_path, agg_path


def check_onnx(emb_path: Path, agg_path: Path, backbone_name: str, head, agg, crops: np.ndarray, weights_file: str | None = None) -> dict:
    """Max abs difference torch vs onnxruntime on real crops (features) and on a real bag (p_all)."""
    import onnxruntime as ort
    import torch

    from allmil_cli.train.backbones import build_backbone

    bb = build_backbone(backbone_name, weights_file)
    with torch.no_grad():
        tf = head(bb(to_tensor(crops))).numpy()
        bag = torch.from_numpy(tf[None, :BAG_SIZE])
        logits, pv = agg(bag)
        tp = torch.softmax(logits, 1)[:, 1].numpy()
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    es = ort.InferenceSession(str(emb_path), so, providers=["CPUExecutionProvider"])
    as_ = ort.InferenceSession(str(agg_path), so, providers=["CPUExecutionProvider"])
    of = es.run(None, {"crops": crops.transpose(0, 3, 1, 2).astype(np.float32)})[0]
    op, opv = as_.run(None, {"features": of[None, :BAG_SIZE]})
    return {"features_max_abs_diff": float(np.abs(of - tf).max()), "p_all_max_abs_diff": float(np.abs(op - tp).max()),
            "patient_vector_max_abs_diff": float(np.abs(opv - pv.numpy()).max()), "n_crops": int(len(crops))}


def _logit(p: float) -> float:
    p = min(max(float(p), 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))
