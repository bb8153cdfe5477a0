"""The arguments and options several ``allmil`` commands share (Typer ``Annotated`` types), and the exit-code epilog."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from allmil_cli.cli.console import Device, Precision

EPILOG_CODES = "Exit codes: 0 all patients ok; 1 some patients failed/insufficient (reports written); 2 usage/input error; 3 model error; 4 an output could not be written; 130 interrupted."

InputDir = Annotated[Path, typer.Argument(help="Folder with one subfolder per patient (or images, with --per-image).", show_default=False)]
PerImage = Annotated[bool, typer.Option("--per-image", help="Treat every image as its own patient (ALL-IDB1 style).")]
Weights = Annotated[Optional[Path], typer.Option("--weights", help="Folder with detector/embedder/aggregator .onnx and manifest.json \\[default: shipped].")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="auto uses CUDA when onnxruntime-gpu sees a GPU, else the CPU.")]
PrecisionOpt = Annotated[Precision, typer.Option("--precision", help="Detector and embedder: fp32, or their int8 copies: ~2x faster networks on CPUs, but calls shift toward normal (held-out sensitivity 86-98 % instead of 94-100 % across protocol 3's shifts); see README.")]
CellSize = Annotated[Optional[float], typer.Option("--cell-size", min=4.0, help="Red-cell diameter in pixels; skips the automatic magnification estimate. ALL-IDB1 ~85, BCCD ~110.")]
Threads = Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads per model \\[default: all cores].")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary on stderr.")]
MaxPixels = Annotated[int, typer.Option("--max-pixels", min=1, help="Refuse images above this many pixels (decompression-bomb guard).")]
DecodeWorkers = Annotated[int, typer.Option("--decode-workers", min=1, max=64, help="Threads decoding upcoming images while the networks run (raise it on GPU machines).")]
DetThreshold = Annotated[Optional[float], typer.Option("--detect-threshold", min=0.0, max=1.0, help="Detector peak threshold \\[default: the model's].")]
MinCellsNormal = Annotated[int, typer.Option("--min-cells-normal", min=0, help="Adequacy: a patient with fewer white cells may be called ALL but not normal (it is 'insufficient'); from the cells-per-patient ablation (97 % held-out accuracy at 4 cells, 90 % at 2). 0 disables.")]
HtmlOut = Annotated[Optional[Path], typer.Option("--html", help="Self-contained review page: run, sortable patient table, the cells behind each call, plots. Opens offline in any browser.")]
CropsDir = Annotated[Optional[Path], typer.Option("--crops-dir", help="Save each patient's most blast-like cell crops (PNG, 224 px, with cells.csv) under this folder (created).")]
Workers = Annotated[Optional[int], typer.Option("--workers", min=1, help="Parallel workers: worker processes with --engine local, actors with --engine ray \\[default: all cores / all cluster CPUs].")]
