"""Process-wide settings of the long-running commands (tracemesh._proc)."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A child allocates and frees blocks the size of a sidecar's export request (and its copy) while
# small objects live on between them, and prints its minor page faults per round.
_ROUNDS = r'''
import resource, sys
from tracemesh._proc import keep_freed_memory
if sys.argv[1] == "keep" and not keep_freed_memory():
    sys.exit("malloc is not glibc's")
pieces = [bytes(600) for _ in range(1000)]
kept = []
f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(50):
    a = b"".join(pieces)
    b = b"".join((b"x", a))
    kept.append(bytes(100))
    del a, b
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 50)
'''


def _faults_per_round(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _ROUNDS, mode], capture_output=True, text=True)
    if out.returncode:
        pytest.skip(out.stderr.strip())
    return float(out.stdout)


def test_freed_blocks_are_reused_not_faulted_in_again():
    default, kept = _faults_per_round("default"), _faults_per_round("keep")
    # ~600 KB a block is ~150 pages: glibc's default maps and unmaps each (measured: 282 faults a
    # round); kept, a round faults a few pages at most (measured: 6)
    assert default > 100, default
    assert kept < default / 10, (kept, default)
