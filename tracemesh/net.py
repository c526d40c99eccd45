"""Addresses and ports shared by every component."""

from __future__ import annotations

import socket
from typing import NamedTuple


class Addr(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_addr(text: str, default_host: str = "127.0.0.1") -> Addr:
    """Parse ``HOST:PORT``, ``:PORT``, ``[V6]:PORT`` or ``PORT``; raise ValueError with the reason."""
    text = text.strip()
    if not text:
        raise ValueError("empty address; expected HOST:PORT")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError(f"bad address {text!r}; expected [IPV6]:PORT")
        port_s = rest[1:]
    elif ":" in text:
        host, _, port_s = text.rpartition(":")
    else:
        host, port_s = "", text
    host = host or default_host
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"bad port in address {text!r}; expected HOST:PORT") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range in address {text!r}")
    return Addr(host, port)


#: Ports handed out by this process: never the same one twice (the caller may not have bound it yet).
_handed_out: set[int] = set()
#: Below the kernel's ephemeral range, where outgoing connections take their local ports.
_FLOOR = 10_000


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago, for a local process to listen on.

    Taken below the ephemeral range: a port the OS picks for ``bind(0)`` is one that outgoing
    connections draw from too, and between our check and the listener's bind one of them can take
    it (seen: "Address already in use" in a sidecar that binds after fetching its certificate).
    Never the same port twice in one process. Falls back to ``bind(0)`` if that range is full.
    """
    import random

    high = _ephemeral_low()
    rng = random.SystemRandom()
    for _ in range(200):
        port = rng.randrange(_FLOOR, high) if high > _FLOOR else 0
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            port = s.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    _handed_out.add(port)
    return port


def wait_for_port(addr: Addr, timeout: float = 10.0) -> None:
    """Block until something accepts TCP connections on *addr*, or raise TimeoutError."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((addr.host, addr.port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {addr} after {timeout:.0f}s") from None
            time.sleep(0.05)
