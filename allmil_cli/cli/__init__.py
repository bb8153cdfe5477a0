"""Layer 6, the ``allmil`` command line: one module per command group; it parses, prints and sets the exit codes.
"""
