"""A ``tracemesh collector`` subprocess as the collector and control-plane tests run it: started,
waited for until ready, stopped. Importable from any test folder (the root conftest's folder is on
``sys.path``); a plain module, so that it clashes with no folder's ``conftest``."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx

#: Startup of a collector: import, open chdb, create the schema. ~1-2 s here; generous for a loaded
#: 2-core machine or slow CI.
START_TIMEOUT_S = 60.0


def wait_ready(c, ready: Callable[[], bool], transient: type[BaseException] | tuple = OSError) -> None:
    """Poll ``ready()`` every 50 ms until it is true (*transient* errors count as not yet) for the
    collector *c* (its ``proc``, ``output()``, ``kill()``); RuntimeError when the process exits
    first, TimeoutError (the process killed) after START_TIMEOUT_S."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if c.proc.poll() is not None:
            raise RuntimeError(f"collector exited with {c.proc.returncode}:\n{c.output()}")
        try:
            if ready():
                return
        except transient:
            pass
        if time.monotonic() > deadline:
            c.kill()
            raise TimeoutError(f"collector not ready after {START_TIMEOUT_S}s:\n{c.output()}")
        time.sleep(0.05)


class CollectorProcess:
    """The process side of a collector under test: ``proc`` (set by the subclass's ``start``), its
    output in ``log``, a graceful ``stop`` and a ``kill``."""

    log: Path
    proc: subprocess.Popen | None = None

    def wait_http_ready(self) -> None:
        """Wait (see :func:`wait_ready`) for ``{api_url}/ready`` to answer 200."""
        wait_ready(self, lambda: httpx.get(f"{self.api_url}/ready", timeout=2).status_code == 200,
                   httpx.TransportError)

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait: the graceful path (receiver stops, pipeline drains, store closes)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
