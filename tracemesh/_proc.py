"""Process-wide concerns of the long-running commands: child processes that never outlive their
supervisor, start-up objects kept out of the cycle collector's reach, and freed memory kept for
reuse."""

from __future__ import annotations

import ctypes
import gc
import sys
import threading

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


def freeze_startup_objects() -> None:
    """What start-up made (modules, the config, the exporters; the collector's grpcio, protobuf and
    chdb bindings and schema) lives as long as the process: out of the cycle collector's reach with
    it (:func:`gc.freeze`), so that a collection under load walks what requests made, not the
    start-up objects too. Sidecar: ~50,000 objects, 30 ms and more per full collection on a busy
    machine (a latency spike for every request waiting meanwhile). Collector: 1.8 % of its CPU
    during a 600k-span ingest run went to the cycle collector before, none visible after."""
    gc.collect()
    gc.freeze()


#: prctl's PR_SET_NAME (linux/prctl.h)
_PR_SET_NAME = 15


def name_os_thread() -> bool:
    """Give the calling thread its Python name at the OS level too: Linux's ``comm``, at
    most 15 bytes, what ``top -H``, ``ps -L``, ``perf`` and ``/proc/<pid>/task/*/comm`` show.
    Python 3.11 leaves every thread named after the process, so a busy collector's threads could not
    be told apart without a debugger. Call it first thing in the thread (it also serves as a
    ThreadPoolExecutor ``initializer``). True when named; False where there is no prctl."""
    raw = threading.current_thread().name.encode("utf-8", "replace")[:15]
    try:
        prctl = ctypes.CDLL(None).prctl
    except (OSError, AttributeError):
        return False
    return prctl(_PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0) == 0


#: glibc's malloc options (malloc.h): M_TRIM_THRESHOLD, M_MMAP_THRESHOLD.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: Blocks below this come from the heap and are reused once freed (glibc's default starts at 128 KiB
#: and moves), and up to this much free memory at the heap's top is kept rather than returned.
KEEP_FREED_BYTES = 4 * 1024 * 1024
#: glibc's default ceiling for the mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): a thread's
#: arena grows in heaps of at most 64 MiB, so larger blocks are mapped whatever the setting.
KEEP_FREED_MAX_BYTES = 32 * 1024 * 1024


def keep_freed_memory(nbytes: int = KEEP_FREED_BYTES) -> bool:
    """Have glibc's malloc keep freed blocks of up to *nbytes* for reuse. By default it unmaps a
    large block when it is freed, or trims the heap under it, so the next one is faulted in again,
    page by page. A sidecar's export requests (~0.6 MB, copied a few times on their way to the
    socket) cost about a thousand minor faults each, ~1 ms of the event loop at once, about one
    fault per proxied request in all. With this, 0.05 per request, for ~3 MB more resident at rest
    and no higher peak (measured at 1,000 req/s). True when set; False where malloc is not
    glibc's (no ``mallopt``, or it refuses)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, nbytes)) and bool(mallopt(_M_TRIM_THRESHOLD, nbytes))
