"""Raw socket reads for tests that check what a server sends byte for byte (and when it closes).
A plain module beside the root conftest, importable from every test folder."""

from __future__ import annotations

import socket
import threading


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


class ThreadedServer:
    """A test app on a loopback port: a thread accepts, a thread per connection runs
    :meth:`serve` (the subclass's) on its socket. ``addr`` is where it listens; :meth:`close` stops
    accepting. The apps that speak h11 or h2 by hand (to send what a real server would not) share it."""

    def __init__(self) -> None:
        from tracemesh.net import Addr

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.addr = Addr("127.0.0.1", self.sock.getsockname()[1])
        self._closed = False
        threading.Thread(target=self._accept, daemon=True, name=type(self).__name__).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self.serve, args=(s,), daemon=True).start()

    def serve(self, s: socket.socket) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._closed = True
        self.sock.close()
