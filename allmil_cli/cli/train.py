"""``allmil train``: hands the stage and its arguments to the training modules (``allmil_cli.train.*``, which need
torch) or rewrites a weights manifest. Registered on the app in ``cli/app.py`` with :data:`TRAIN_SETTINGS`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from allmil_cli.cli.console import EXIT_OK, EXIT_USAGE, fail

TRAIN_STAGES = {
    "detector": "allmil_cli.train.detector",
    "cells": "allmil_cli.train.cells",
    "evaluate": "allmil_cli.train.evaluate",
    "protocol3": "allmil_cli.train.protocol3",
    "quantize": "allmil_cli.train.quantize",
    "all": "allmil_cli.train.run_all",
}

# train passes every argument on to the stage (each stage has its own --help), so it parses no option itself.
TRAIN_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []}
TRAIN_EPILOG = "Needs the training extra: pip install '.\\[train]'. Each stage has its own --help, e.g. 'allmil train detector --help'."


def train(
    ctx: typer.Context,
    stage: Annotated[str, typer.Argument(help="detector | cells | evaluate | protocol3 | quantize | all | manifest", show_default=False)] = "",
) -> None:
    """Train, evaluate and export the models (needs torch: pip install '.\\[train]').

    Stages: detector (WBC detector), cells (embedder FC256 + LSTM aggregator), evaluate (protocols,
    stress test, ablations), quantize (int8 copies of the detector and embedder for fast CPU inference:
    allmil train quantize --weights DIR --calibration TRAINING_IMAGES_DIR), all (everything that builds
    the shipped weights/), manifest (rewrite
    weights/manifest.json sha256 for models you trained yourself: allmil train manifest WEIGHTS_DIR).

    Example:

        allmil train all --data ../shared/data --out weights/
    """
    import importlib

    args = list(ctx.args)
    if stage in ("", "--help", "-h"):
        typer.echo(ctx.get_help())
        raise typer.Exit(EXIT_OK)
    if stage == "manifest":
        from allmil_cli.stages.models import write_manifest

        folder = Path(args[0]) if args else Path("weights")
        if not folder.is_dir():
            fail(f"{folder}: not a folder of .onnx models.", EXIT_USAGE)
        for name, digest in write_manifest(folder).items():
            typer.echo(f"{digest}  {name}")
        raise typer.Exit(EXIT_OK)
    if stage not in TRAIN_STAGES:
        fail(f"unknown training stage {stage!r}; use one of: {', '.join(TRAIN_STAGES)}, manifest.", EXIT_USAGE)
    try:
        import torch  # noqa: F401
    except ImportError:
        fail("training needs PyTorch: pip install '.[train]' (torch and torchvision).", EXIT_USAGE)
    import inspect

    module = importlib.import_module(TRAIN_STAGES[stage])
    if inspect.signature(module.main).parameters:
        code = module.main(args)
    else:  # argparse mains that read sys.argv
        saved = sys.argv
        sys.argv = [f"allmil train {stage}", *args]
        try:
            code = module.main()
        finally:
            sys.argv = saved
    raise typer.Exit(int(code or 0))
