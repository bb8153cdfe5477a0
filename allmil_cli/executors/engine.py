"""Engines that run a cohort's patients: their settings, errors, and the fingerprint of a run.

The per-patient work is always :meth:`allmil_cli.pipeline.runner.Pipeline.diagnose_patient`, whichever engine runs it:

- ``local``: this process (``Pipeline.run``: decode look-ahead threads, and whatever parallelism the
  pipeline itself offers);
- ``ray``: an actor pool on a Ray cluster (:mod:`allmil_cli.executors.engine_ray`), models loaded once per actor, each actor
  running the per-patient function it is handed (``Pipeline.from_weights``).

:mod:`allmil_cli.io.cohort` picks the engine and journals the results.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from allmil_cli.stages.models import Models
from allmil_cli.types.results import Options

ENGINES = ("local", "ray")
#: Options that only change how fast a run goes. Every other field of ``Options`` may change a call, so it is
#: recorded in the journal and compared on --resume and by ``allmil merge`` (a new option is covered by default).
EXECUTION_OPTIONS = frozenset({"decode_workers", "workers", "keep_features", "prefetch", "threads", "batch_size"})


class EngineError(Exception):
    """An engine that cannot run (Ray missing, cluster unreachable, actors failed); the message is for the user."""


@dataclass
class EngineConfig:
    """How the patients are run. ``workers``: parallel workers (for ``ray``: the number of actors)."""

    engine: str = "local"
    workers: int | None = None
    gpus_per_worker: float = 0.0
    ray_address: str | None = None
    device: str = "auto"
    threads: int | None = None


def fingerprint(models: Models, options: Options, threshold: float, per_image: bool,
                shard: tuple[int, int] | None) -> dict[str, Any]:
    """What a resumed run must share with the journal: allmil version, model sha256s, call-changing options."""
    from allmil_cli import __version__

    opts: dict[str, Any] = {}
    for f in dataclasses.fields(options):
        if f.name not in EXECUTION_OPTIONS:
            value = getattr(options, f.name)
            if dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            opts[f.name] = str(value) if isinstance(value, Path) else value
    opts["threshold"] = threshold  # the effective one (the model's when not given)
    opts["per_image"] = per_image
    return {"version": __version__, "models_sha256": dict(models.sha256), "options": opts,
            "shard": None if shard is None else f"{shard[0]}/{shard[1]}"}


def merge_fingerprint(fp: dict[str, Any]) -> dict[str, Any]:
    """The part of a fingerprint that shards of one cohort must share (everything but the shard)."""
    return {k: v for k, v in fp.items() if k != "shard"}
