"""Layer 5, I/O: the patients' files in; reports, journal, merge, review page, crops and site profiles out.

Every write is atomic and fails with one line (``outputs.OutputError``).
"""
