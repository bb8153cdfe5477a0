"""Layer 3, executors: where the work runs (in process with look-ahead, worker processes, the GPU front end, Ray).

They run the per-file or per-patient function they are handed and never import ``allmil_cli.pipeline``.
"""
