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


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS picks it); good enough for local processes."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
