"""Running a cohort: the chosen engine analyses the patients, and the journal makes the run resumable.

Results stream back to this process, which appends each finished patient to the journal (flushed and
fsynced) as soon as it is back; the reports are then built from those same results, in discovery order,
so a resumed run and a clean run write the same bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from allmil_cli.executors.engine import ENGINES, EngineConfig, EngineError
from allmil_cli.types.field import Patient
from allmil_cli.io.journal import Journal
from allmil_cli.types.results import PatientResult
from allmil_cli.pipeline.runner import Pipeline


def check_engine(cfg: EngineConfig) -> None:
    """Fail early (before any journal is touched) when the engine cannot run at all."""
    if cfg.engine not in ENGINES:
        raise EngineError(f"--engine {cfg.engine!r}: use one of {', '.join(ENGINES)}.")
    if cfg.engine == "ray":
        from allmil_cli.executors.engine_ray import import_ray

        import_ray()


def iter_results(cfg: EngineConfig, pipeline: Pipeline, patients: list[Patient]) -> Iterator[PatientResult]:
    """Run ``patients`` on the configured engine; results come back as they finish."""
    if cfg.engine == "local":
        yield from pipeline.run(patients)
    elif cfg.engine == "ray":
        from allmil_cli.executors.engine_ray import run_ray

        yield from run_ray(patients, pipeline.models, pipeline.options, cfg, Pipeline.from_weights)
    else:
        raise EngineError(f"--engine {cfg.engine!r}: use one of {', '.join(ENGINES)}.")


@dataclass
class CohortRun:
    """The outcome of :func:`run_cohort`: results in discovery order, and what the journal contributed."""

    results: list[PatientResult]
    n_resumed: int = 0
    n_redone: int = 0  # journal lines cut short by a kill, dropped (their patients were analysed again)
    journal: Path | None = None
    notes: list[str] = field(default_factory=list)


def run_cohort(
    patients: list[Patient],
    keys: dict[str, str],
    pipeline: Pipeline,
    cfg: EngineConfig,
    *,
    journal_path: Path | None,
    resume: bool,
    fp: dict[str, Any],
    meta: dict[str, Any],
    on_result: Callable[[PatientResult], None] | None = None,
    on_resumed: Callable[[int], None] | None = None,
) -> CohortRun:
    """Analyse the patients not yet journalled, journalling each as it finishes; return all results.

    ``keys`` maps each patient name to its discovery sort key (kept in the journal for ``allmil merge``).
    """
    done: dict[str, PatientResult] = {}
    run = CohortRun(results=[], journal=journal_path)
    journal: Journal | None = None
    if journal_path is not None:
        if resume and journal_path.exists():
            journal, contents = Journal.resume(journal_path, fp, len(patients))
            wanted = {p.name for p in patients}
            done = {name: r for name, (_, r) in contents.patients.items() if name in wanted}
            run.n_resumed, run.n_redone = len(done), contents.dropped
            extra = len(contents.patients) - len(done)
            if extra:
                run.notes.append(f"{extra} journalled patient(s) are no longer in the input and are left out of the report.")
        else:
            if resume:
                run.notes.append(f"{journal_path}: no journal yet; starting afresh.")
            journal = Journal.create(journal_path, fp, meta, len(patients))
    todo = [p for p in patients if p.name not in done]
    if on_resumed and done:
        on_resumed(len(done))
    try:
        for result in iter_results(cfg, pipeline, todo):
            if journal is not None:
                journal.append(result, keys.get(result.patient, result.patient))
            done[result.patient] = result
            if on_result:
                on_result(result)
    finally:
        if journal is not None:
            journal.close()
    run.results = [done[p.name] for p in patients]
    return run
