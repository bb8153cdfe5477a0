"""The Ray engine: the same per-patient code (:meth:`Pipeline.diagnose_patient`) on a pool of Ray actors.

Each actor builds its :class:`PatientRunner` once with the function it is handed (``Pipeline.from_weights``: it loads
and verifies the three models), then analyses patients one by one; the driver keeps
a bounded number of patients in flight per actor and yields results as they finish (the caller journals
them). A worker process that dies is restarted by Ray and its patient retried (``max_restarts`` /
``max_task_retries``); a driver that dies is handled by ``--resume``.

Every node reads the images itself, so the input folder must be on storage all nodes see at the same
path (NFS, Lustre, a bucket mount), and allmil with the same weights must be installed on every node:
the actors check their allmil version and model sha256s against the driver's before any patient runs.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from allmil_cli.executors.engine import EngineConfig, EngineError
from allmil_cli.types.field import Patient
from allmil_cli.stages.models import Models
from allmil_cli.types.results import Options, PatientResult

#: Patients queued per actor: one running, one waiting, so an actor never idles on a driver round trip.
IN_FLIGHT_PER_ACTOR = 2
#: How often Ray restarts a dead actor, and retries the patient it held, before the run gives up.
MAX_RESTARTS = 3
#: Object store of a local cluster started by allmil: results are small (a few kB per patient).
LOCAL_OBJECT_STORE_BYTES = 256 * 1024**2
INSTALL_HINT = "--engine ray needs Ray: pip install 'allmil[ray]' (or pip install ray), or use --engine local."


def import_ray() -> Any:
    """The ``ray`` module, or an :class:`EngineError` that says how to install it."""
    try:
        import ray
    except ImportError as exc:
        raise EngineError(INSTALL_HINT) from exc
    return ray


class PatientRunner(Protocol):
    """What an actor runs on each patient (a :class:`allmil_cli.pipeline.runner.Pipeline`)."""

    models: Models

    def diagnose_patient(self, patient: Patient) -> PatientResult: ...


#: Builds an actor's :class:`PatientRunner` from (weights folder, device, onnxruntime threads, the run's options);
#: importable by name on every node (e.g. ``Pipeline.from_weights``).
RunnerFactory = Callable[[Path, str, "int | None", Options], PatientRunner]


class PatientWorker:
    """A Ray actor: one :class:`PatientRunner` (models loaded once), reused for every patient sent to it."""

    def __init__(self, open_runner: RunnerFactory, weights_dir: str, device: str, threads: int | None,
                 options: Options) -> None:
        self.runner = open_runner(Path(weights_dir), device, threads, options)

    def identity(self) -> dict[str, Any]:
        """What the driver checks before sending patients: allmil version, model sha256s, provider, host."""
        import socket

        from allmil_cli import __version__

        models = self.runner.models
        return {"version": __version__, "models_sha256": dict(models.sha256), "provider": models.provider,
                "host": socket.gethostname(), "pid": os.getpid()}

    def diagnose(self, patient: Patient) -> PatientResult:
        return self.runner.diagnose_patient(patient)


def _connect(ray: Any, cfg: EngineConfig) -> bool:
    """Join ``cfg.ray_address`` or start a local cluster; True when this call connected (and must disconnect)."""
    if ray.is_initialized():
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing leaves the machine
    common: dict[str, Any] = dict(logging_level=logging.WARNING, log_to_driver=True, configure_logging=True)
    try:
        if cfg.ray_address:
            ray.init(address=cfg.ray_address, **common)
        else:
            cpus = max(os.cpu_count() or 1, cfg.workers or 0)
            ray.init(num_cpus=cpus, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES, **common)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError...
        where = f"the Ray cluster at {cfg.ray_address}" if cfg.ray_address else "a local Ray cluster"
        hint = ("; if the cluster uses token authentication (Ray's default), also set RAY_AUTH_MODE=token, with the "
                "cluster's token in RAY_AUTH_TOKEN or ~/.ray/auth_token") if cfg.ray_address not in (None, "auto") else ""
        raise EngineError(f"cannot start or join {where} ({_first_line(exc)}); check --ray-address (ray status shows it)"
                          f"{hint}.") from exc
    return True


def _n_workers(ray: Any, cfg: EngineConfig) -> int:
    if cfg.workers:
        return cfg.workers
    res = ray.cluster_resources()
    if cfg.gpus_per_worker > 0:
        return max(1, int(res.get("GPU", 0) / cfg.gpus_per_worker))
    return max(1, int(res.get("CPU", 1)))


def start_actors(ray: Any, models: Models, options: Options, cfg: EngineConfig, n: int,
                 open_runner: RunnerFactory) -> list[Any]:
    """Start ``n`` actors, each running what ``open_runner`` builds, and check each one runs the driver's allmil
    version and models."""
    from allmil_cli import __version__

    gpus = float(cfg.gpus_per_worker or 0.0)
    if gpus <= 0 and cfg.device == "cuda":
        raise EngineError("--device cuda with --engine ray: give each actor a GPU with --gpus-per-worker (e.g. 1 or 0.5).")
    device = "cuda" if gpus > 0 else "cpu"
    threads = cfg.threads or 1  # one actor per CPU: one onnxruntime thread each
    if "workers" in Options.__dataclass_fields__:
        options = replace(options, workers=1)  # an actor is one worker: no worker processes of its own
    remote = ray.remote(PatientWorker).options(num_cpus=1, num_gpus=gpus, max_restarts=MAX_RESTARTS,
                                               max_task_retries=MAX_RESTARTS)
    actors = [remote.remote(open_runner, str(models.weights_dir), device, threads, options) for _ in range(n)]
    try:
        identities = ray.get([a.identity.remote() for a in actors])
    except Exception as exc:  # noqa: BLE001 - an actor that cannot load its models
        for a in actors:
            ray.kill(a)
        raise EngineError(f"the Ray actors could not load the models from {models.weights_dir} ({_first_line(exc)}); "
                          "install allmil and its weights at the same path on every node.") from exc
    for ident in identities:
        if ident["version"] != __version__ or ident["models_sha256"] != models.sha256:
            for a in actors:
                ray.kill(a)
            raise EngineError(
                f"a Ray actor on {ident['host']} runs allmil {ident['version']} with other models than this driver "
                f"(allmil {__version__}, weights {models.weights_dir}); install the same allmil and weights on every node."
            )
    return actors


def run_ray(patients: list[Patient], models: Models, options: Options, cfg: EngineConfig,
            open_runner: RunnerFactory) -> Iterator[PatientResult]:
    """Diagnose ``patients`` on a Ray actor pool, each actor running what ``open_runner`` builds (one per actor), yielding
    each result as soon as it is back (any order)."""
    ray = import_ray()
    if not patients:
        return
    connected = _connect(ray, cfg)
    actors: list[Any] = []
    try:
        actors = start_actors(ray, models, options, cfg, min(_n_workers(ray, cfg), len(patients)), open_runner)
        queue: deque[Patient] = deque(patients)
        pending: dict[Any, tuple[int, Patient]] = {}

        def submit(i: int) -> None:
            patient = queue.popleft()
            pending[actors[i].diagnose.remote(patient)] = (i, patient)

        for _ in range(IN_FLIGHT_PER_ACTOR):
            for i in range(len(actors)):
                if queue:
                    submit(i)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i, patient = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as exc:  # noqa: BLE001 - RayActorError (retries spent) or an error in the pipeline
                raise EngineError(
                    f"patient {patient.name}: the Ray worker failed ({_first_line(exc)}); the finished patients are "
                    "journalled: rerun with --resume to go on."
                ) from exc
            if queue:
                submit(i)
            yield result
    finally:
        for a in actors:
            try:
                ray.kill(a)
            except Exception:  # noqa: BLE001 - already gone
                pass
        if connected:
            ray.shutdown()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
