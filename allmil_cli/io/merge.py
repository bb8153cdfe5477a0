"""``allmil merge``: combine the journals of shard runs into one report, exactly as a single run would write it.

The journals are the source of truth: they hold every patient in full (per image and per cell, floats
bit-exact). A report path given instead of a journal is resolved to the journal written beside it
(``report.csv`` / ``report.json`` -> ``report.journal.jsonl``). Merging refuses a patient found in two
sources, sources written by other allmil versions, models or call options, and a shard that did not
finish (fewer journalled patients than it planned).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from allmil_cli.executors.engine import merge_fingerprint
from allmil_cli.io.journal import Contents, JournalError, is_journal, read_journal
from allmil_cli.io.journal_lock import journal_path_for
from allmil_cli.types.results import PatientResult


class MergeError(Exception):
    """Sources that cannot be merged; the message names the files and what to do."""


@dataclass
class Merged:
    results: list[PatientResult]
    meta: dict[str, Any]
    sources: list[Path]


def resolve_source(path: Path) -> Path:
    """A journal as given, or the journal beside a report."""
    if not path.exists():
        raise MergeError(f"{path}: no such file.")
    if is_journal(path):
        return path
    beside = journal_path_for(path, None)
    if beside is not None and beside.exists() and is_journal(beside):
        return beside
    raise MergeError(
        f"{path}: neither a journal nor a report with its journal beside it (looked for {beside}); "
        "merge needs the *.journal.jsonl files that 'allmil diagnose' writes beside each report."
    )


def merge_journals(paths: list[Path]) -> Merged:
    """Load, check and combine the given journals (or reports with journals beside them)."""
    if not paths:
        raise MergeError("give at least one journal or report to merge.")
    sources = [resolve_source(Path(p)) for p in paths]
    seen_src: dict[Path, Path] = {}
    for given, src in zip(paths, sources):
        if src.resolve() in seen_src:
            raise MergeError(f"{given} and {seen_src[src.resolve()]}: the same journal ({src}) is given twice.")
        seen_src[src.resolve()] = Path(given)
    loaded: list[tuple[Path, Contents]] = []
    for src in sources:
        try:
            loaded.append((src, read_journal(src)))
        except JournalError as exc:
            raise MergeError(str(exc)) from exc
    first_src, first = loaded[0]
    ref = merge_fingerprint(first.header.get("fingerprint", {}))
    owner: dict[str, Path] = {}
    keyed: list[tuple[str, PatientResult]] = []
    for src, c in loaded:
        fp = merge_fingerprint(c.header.get("fingerprint", {}))
        if fp != ref:
            what = _differs(ref, fp)
            raise MergeError(f"{first_src} and {src}: written with different {what}; merge only shards of one run "
                             "(same allmil version, weights and options).")
        if c.dropped or (c.n_planned is not None and len(c.patients) < c.n_planned):
            raise MergeError(f"{src}: incomplete: {len(c.patients)} of {c.n_planned} planned patients journalled"
                             + (f", {c.dropped} line(s) cut short" if c.dropped else "")
                             + "; finish that shard with 'allmil diagnose ... --resume' first.")
        for name, (key, result) in c.patients.items():
            if name in owner:
                raise MergeError(f"patient {name!r} is in both {owner[name]} and {src}; each patient must be in one "
                                 "shard only (were two shards run with the same --shard, or overlapping inputs?).")
            owner[name] = src
            keyed.append((key, result))
    keyed.sort(key=lambda kr: kr[0])
    meta = dict(first.header.get("meta", {}))
    meta.update(command="merge", created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                merged_from=[str(s) for s in sources],
                shards=[c.header.get("fingerprint", {}).get("shard") for _, c in loaded])
    return Merged(results=[r for _, r in keyed], meta=meta, sources=sources)


def _differs(a: dict[str, Any], b: dict[str, Any]) -> str:
    parts = []
    if a.get("version") != b.get("version"):
        parts.append(f"allmil versions ({a.get('version')} vs {b.get('version')})")
    if a.get("models_sha256") != b.get("models_sha256"):
        names = sorted(k for k in set(a.get("models_sha256", {})) | set(b.get("models_sha256", {}))
                       if a.get("models_sha256", {}).get(k) != b.get("models_sha256", {}).get(k))
        parts.append(f"models (sha256 of {', '.join(names)})")
    oa, ob = a.get("options", {}), b.get("options", {})
    opts = sorted(k for k in set(oa) | set(ob) if oa.get(k) != ob.get(k))
    if opts:
        parts.append("options (" + ", ".join(f"{k}: {oa.get(k)!r} vs {ob.get(k)!r}" for k in opts) + ")")
    return "; ".join(parts) or "fingerprints"
