"""Running experiments: the command line, the Hydra app and its launchers, the Python API, the run settings,
`causal check`'s account of a plan, run folders, run logs and the internal-error boundary.

The top of the import graph: it may import every other package, and none imports it.
"""
