"""Child processes that never outlive their supervisor."""

from __future__ import annotations

import sys

#: Run as ``python -c DIE_WITH_PARENT <python args...>``: asks the kernel for SIGTERM when the parent
#: dies (PR_SET_PDEATHSIG survives exec), then execs the real command. Not a ``preexec_fn``: that
#: forces a plain fork() of a process that may run grpcio threads, and such a child can abort
#: before its exec (seen here: "epoll_wait error: Bad file descriptor", SIGABRT).
DIE_WITH_PARENT = ("import ctypes, os, sys\n"
                   "try:\n ctypes.CDLL('libc.so.6', use_errno=True).prctl(1, 15)\n"
                   "except OSError:\n pass\n"
                   "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])")


def python_cmd(*args: str, python: str = sys.executable) -> list[str]:
    """argv that runs ``python *args`` in a child that dies with its parent (Linux; elsewhere it
    simply runs)."""
    return [python, "-c", DIE_WITH_PARENT, *args]
