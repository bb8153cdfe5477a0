"""Kept for the commands quoted in earlier notes: ``python -m allmil_cli.train.ruler_check --gap 1.5`` is
``python -m allmil_cli.train.variant_check ruler --gap 1.5`` (see :mod:`allmil_cli.train.variant_check`)."""

from __future__ import annotations

import sys

from allmil_cli.train.variant_check import main as _main


def main(argv: list[str] | None = None) -> int:
    return _main(["ruler", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())
