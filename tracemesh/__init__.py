"""tracemesh: a distributed-tracing-first observability service mesh.

This core package holds only what several components share: the CLI entry point
(:mod:`tracemesh.cli`) and small helpers for addresses and processes.
"""

__version__ = "0.1.0"
