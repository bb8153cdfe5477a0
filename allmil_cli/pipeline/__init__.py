"""Layer 4, pipeline: the stages and an executor put together, one patient at a time.

``from allmil_cli.pipeline import Pipeline`` is the library's front door (README, *Library use*).
"""

from allmil_cli.pipeline.runner import Pipeline

__all__ = ["Pipeline"]
