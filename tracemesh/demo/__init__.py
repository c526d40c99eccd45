"""``tracemesh demo``: a whole local mesh on the embedded store, load, and what the mesh recorded."""

from tracemesh.demo._run import run

__all__ = ["run"]
