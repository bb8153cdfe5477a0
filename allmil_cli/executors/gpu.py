"""The GPU front end (``--device cuda`` with torch + torchvision installed): nvJPEG decode, resizing and crops on the GPU.

Imported lazily, only when the networks run on a GPU: inference without torch never touches this module.

Per JPEG field, on the GPU: decode (``torchvision.io.decode_jpeg(device="cuda")``, EXIF orientation applied),
the ruler's 512-px thumbnail, the detector input (resized so red cells are 20 px, padded with the median colour)
and the 224-px cell crops (with the stain map when the embedder asks for it). The detector and the embedder read
those tensors in place through onnxruntime IOBinding: no host round trip. On the CPU: the ruler and colour
measures on the thumbnail (scipy; 0.6 MB copied back), the heatmap peaks, and the white-cell boxes (stain extent,
from one host copy of the field, which also serves ``Pipeline.on_field``).

An executor (:class:`allmil_cli.executors.execution.FileExecutor` picks it per file). Non-JPEG files, and anything nvJPEG or this
code refuses, take the CPU path (:meth:`allmil_cli.stages.analysis.FieldAnalyser.analyse_file`), so a bad image is reported
word for word as there. Resampling here is torch's antialiased bilinear, not Pillow's, and
nvJPEG's IDCT is not libjpeg's: rulers, cells and p_all are close to the CPU path's, not bit-identical
(``tests/test_gpu_fallback.py`` runs this very code on CPU tensors and bounds the difference).
"""

from __future__ import annotations

import io
import time
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from allmil_cli.stages.crops import CROP_SIZE
from allmil_cli.stages.detect import cell_box, heatmap_detections, model_meta
from allmil_cli.stages.embed import Embedder
from allmil_cli.stages.images import jpeg_quality
from allmil_cli.types.field import Field
from allmil_cli.stages.models import Models
from allmil_cli.stages.normalize import stain_map
from allmil_cli.executors.parallel import ThreadLookahead
from allmil_cli.types.results import Cell, FieldOutcome, FileOutcome, ImageResult, Options, StageTimer
from allmil_cli.stages.scale import _THUMB_SIDE, CROP_RBC_RATIO, measure_thumbnail

JPEG_SUFFIXES = frozenset({".jpg", ".jpeg"})
#: Crops embedded per IOBinding run on the GPU.
GPU_EMBED_BATCH = 256


class GpuFront:
    """Decode and prepare JPEG fields with torch on ``device`` ("cuda"; "cpu" runs the same code on CPU tensors)."""

    def __init__(self, models: Models, options: Options, embedder: Embedder, timer: StageTimer, device: str = "cuda") -> None:
        import torch
        import torch.nn.functional as F

        self.torch, self.F = torch, F
        self.device = torch.device(device)
        self.options, self.embedder, self.timer = options, embedder, timer
        self.detector = models.detector
        self.det_meta = model_meta(models.detector)
        self._ahead = ThreadLookahead(self._read, max(2, int(options.decode_workers)))

    # -- reading -----------------------------------------------------------------------------------
    def _read(self, path: Path) -> bytes | None:
        """The file's bytes when it is a JPEG this front end takes (size checked from the header), else None."""
        if path.suffix.lower() not in JPEG_SUFFIXES:
            return None
        try:
            data = path.read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if im.format != "JPEG" or im.mode not in ("RGB", "L", "YCbCr") or w * h > self.options.max_pixels or min(w, h) < 32:
                    return None
        except Exception:  # noqa: BLE001 - the CPU path says what is wrong with the file
            return None
        return data

    def schedule(self, paths: list[Path]) -> None:
        self._ahead.schedule(paths)

    def close(self) -> None:
        self._ahead.close()

    def _decode(self, data: bytes):
        with warnings.catch_warnings():  # torchvision 0.29 deprecates its codecs in favour of TorchCodec; they still work
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import ImageReadMode, decode_jpeg

            raw = self.torch.frombuffer(bytearray(data), dtype=self.torch.uint8)
            return decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True)

    # -- tensors -----------------------------------------------------------------------------------
    def _resize(self, x, h: int, w: int):
        """(3, H, W) or (N, 3, H, W) -> float32 (.., h, w), antialiased bilinear, rounded to 0..255 like a uint8 image."""
        batch = x if x.dim() == 4 else x[None]
        if tuple(batch.shape[-2:]) == (h, w):
            out = batch.float()
        else:
            out = self.F.interpolate(batch.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
            out = out.round_().clamp_(0.0, 255.0)
        return out if x.dim() == 4 else out[0]

    def _run(self, session, x) -> np.ndarray:
        """One network on a float32 tensor through IOBinding (input read in place on the device); output to the host."""
        x = x.contiguous()
        binding = session.io_binding()
        kind = "cuda" if self.device.type == "cuda" else "cpu"
        index = (self.device.index or 0) if kind == "cuda" else 0
        binding.bind_input(session.get_inputs()[0].name, kind, index, np.float32, list(x.shape), x.data_ptr())
        binding.bind_output(session.get_outputs()[0].name, kind, index)
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()[0]

    def embed(self, crops_list: list[Any]) -> np.ndarray:
        """Crops of several fields (device tensors (n, 3, 224, 224), or uint8 NHWC arrays from the CPU path) -> (N, 256)."""
        torch = self.torch
        parts = [c if isinstance(c, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(c)).to(self.device).permute(0, 3, 1, 2).float()
                 for c in crops_list]
        crops = torch.cat(parts) if parts else torch.zeros((0, 3, CROP_SIZE, CROP_SIZE), device=self.device)
        if len(crops) == 0:
            return np.zeros((0, self.embedder.blank_features().shape[0]), np.float32)
        return np.concatenate([self._run(self.embedder.session, crops[i : i + GPU_EMBED_BATCH])
                               for i in range(0, len(crops), GPU_EMBED_BATCH)]).astype(np.float32, copy=False)

    def _crops(self, x, centres: np.ndarray, rbc_px: float):
        """Like :func:`allmil_cli.stages.crops.crop_cells` (edge-replicated windows, resized to 224), on the device."""
        torch = self.torch
        _, h, w = x.shape
        side = max(8, int(round(CROP_RBC_RATIO * rbc_px)))
        half = side // 2
        out = []
        for cx, cy in centres:
            x0 = int(round(min(max(cx, 0.0), w - 1.0))) - half
            y0 = int(round(min(max(cy, 0.0), h - 1.0))) - half
            cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x0 + side, w), min(y0 + side, h)
            win = x[:, cy0:cy1, cx0:cx1].float()[None]
            pads = (cx0 - x0, x0 + side - cx1, cy0 - y0, y0 + side - cy1)
            if any(pads):
                win = self.F.pad(win, pads, mode="replicate")
            out.append(self._resize(win, CROP_SIZE, CROP_SIZE))
        return torch.cat(out) if out else torch.zeros((0, 3, CROP_SIZE, CROP_SIZE), device=self.device)

    def _normalise(self, crops, stats):
        """The embedder's stain map (``Embedder.normalise``) as a per-channel table lookup on the device."""
        ref = self.embedder.stain_reference
        if ref is None or not stats.measured or len(crops) == 0:
            return crops
        lut = self.torch.from_numpy(stain_map(stats, *ref).lut.astype(np.float32)).to(self.device)  # (3, 256)
        idx = crops.long()
        return self.torch.stack([lut[c][idx[:, c]] for c in range(3)], dim=1)

    # -- one file ----------------------------------------------------------------------------------
    def analyse_file(self, path: Path, mode: str, keep_field: bool) -> FileOutcome | None:
        """The file analysed here, or None when it takes the CPU path (not a JPEG, refused, or a detect mode)."""
        if mode not in ("analyse", "crops"):
            return None
        t = time.perf_counter()
        data = self._ahead.fetch(path)
        if data is None:
            return None
        try:
            x = self._decode(data)
        except Exception:  # noqa: BLE001 - nvJPEG refuses some valid JPEGs (e.g. progressive, CMYK): CPU path
            return None
        self.timer.add("decode", t)
        try:
            return FileOutcome(path=path, fields=[self._field(path, x, mode, keep_field, _quality_of(data))])
        except Exception as exc:  # noqa: BLE001 - as the CPU path: one field's failure is reported, not fatal
            return FileOutcome(path=path, fields=[FieldOutcome(ImageResult(image=path.name, status="failed",
                                                                           reason=f"{path}: analysis failed ({exc})."))])

    def _field(self, path: Path, x, mode: str, keep_field: bool, quality: int | None = None) -> FieldOutcome:
        torch, opts, meta = self.torch, self.options, self.det_meta
        _, h, w = x.shape
        t = time.perf_counter()
        factor = max(h, w) / _THUMB_SIDE
        if factor > 1.0:
            thumb = self._resize(x, max(1, round(h / factor)), max(1, round(w / factor)))
        else:
            thumb, factor = x.float(), 1.0
        stats = replace(measure_thumbnail(thumb.permute(1, 2, 0).cpu().numpy(), factor,
                                          float(opts.cell_size) if opts.cell_size else None), jpeg_quality=quality)
        rbc = stats.rbc_px
        t = self.timer.add("scale", t)
        f = meta["canonical_rbc_px"] / max(rbc, 1e-3)
        nw, nh = max(1, int(round(w * f))), max(1, int(round(h * f)))
        small = self._resize(x, nh, nw)
        ph, pw = -(-nh // 32) * 32, -(-nw // 32) * 32
        fill = torch.quantile(small[:, ::4, ::4].reshape(3, -1), 0.5, dim=1)  # linear: numpy's median
        inp = fill[:, None, None].repeat(1, ph, pw)
        inp[:, :nh, :nw] = small
        heat = self._run(self.detector, inp[None])[0, 0]
        dets = heatmap_detections(heat, meta, opts.detect_threshold, w, h, nw / w, nh / h)
        rgb = x.permute(1, 2, 0).contiguous().cpu().numpy()  # one host copy: boxes (stain extent) and on_field
        cells = [Cell(image=path.name, x=float(d.x), y=float(d.y), box=cell_box(rgb, d.x, d.y, rbc), det_score=float(d.score),
                 merged_scores=tuple(float(m) for m in d.merged_scores), same_as=int(d.same_as))
                 for d in dets]
        t = self.timer.add("detect", t)
        crops = self._normalise(self._crops(x, np.asarray([(c.x, c.y) for c in cells]).reshape(-1, 2), rbc), stats)
        t = self.timer.add("crop", t)
        feats = None
        if mode == "analyse":
            feats, crops = self.embed([crops]), None
            self.timer.add("embed", t)
        info = ImageResult(image=path.name, status="ok", width=w, height=h, rbc_px=round(rbc, 1), n_cells=len(cells), stats=stats)
        return FieldOutcome(info, cells, feats, crops, Field(path=path, page=0, rgb=rgb) if keep_field else None)


def _quality_of(data: bytes) -> int | None:
    """The JPEG quality of a file's bytes (its header only; :func:`allmil_cli.stages.images.jpeg_quality`)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            return jpeg_quality(im)
    except (OSError, ValueError, SyntaxError):
        return None
