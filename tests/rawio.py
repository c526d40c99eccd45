"""Raw socket reads for tests that check what a server sends byte for byte (and when it closes).
A plain module beside the root conftest, importable from every test folder."""

from __future__ import annotations

import socket


def read_until_closed(s: socket.socket, timeout: float | None = None) -> bytes:
    """All that *s* delivers until the peer closes or resets it, or a read waits *timeout* (the
    socket's own timeout if None)."""
    if timeout is not None:
        s.settimeout(timeout)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except (socket.timeout, ConnectionResetError):
        pass
    return out
