"""Layer 1, data types: fields, cells, per-image and per-patient results, options and the rule's parameters.

Plain dataclasses that import nothing from allmil_cli outside this folder (docs/architecture.md).
"""
