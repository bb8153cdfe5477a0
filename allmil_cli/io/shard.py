"""Deterministic shards of a cohort, for batch schedulers (SLURM array jobs and the like).

A patient belongs to shard ``sha256(patient id) mod N``: it depends on the patient's own name only, so
adding or removing other folders never moves a patient to another shard, and every machine computes the
same partition without talking to the others.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from allmil_cli.types.field import Patient


class ShardError(ValueError):
    """A malformed ``--shard`` value; the message is for the user."""


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` (1-based, 1 <= I <= N) -> (I, N)."""
    try:
        i_text, n_text = text.split("/")
        i, n = int(i_text), int(n_text)
    except ValueError:
        raise ShardError(f"--shard {text!r}: write it as I/N, e.g. 2/8 for the second of eight shards.") from None
    if n < 1 or not 1 <= i <= n:
        raise ShardError(f"--shard {text!r}: need 1 <= I <= N (shards are numbered from 1), e.g. 1/{max(n, 1)}.")
    return i, n


def shard_of(patient_id: str, n: int) -> int:
    """The 1-based shard of ``patient_id`` among ``n``."""
    digest = hashlib.sha256(patient_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % n + 1


def select(patients: list[Patient], shard: tuple[int, int] | None) -> list[Patient]:
    """The patients of shard ``(i, n)``, in their original order (all of them when ``shard`` is None)."""
    if shard is None:
        return list(patients)
    i, n = shard
    return [p for p in patients if shard_of(p.name, n) == i]


def sort_key(patient: Patient, root: Path, per_image: bool) -> str:
    """The key discovery orders patients by (folder name, or the image's path below the input folder)."""
    if per_image and patient.images:
        try:
            return str(patient.images[0].relative_to(root))
        except ValueError:
            return str(patient.images[0])
    return patient.name
