"""Layer 2, stages: what is computed, as functions and small classes over the data types.

Decode, ruler, detect, crops, stain map, embed, aggregate, QC, and the patient decision (``decision``), each
in its own module; they import only ``allmil_cli.types`` and each other (docs/architecture.md).
"""
