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


class H2EventServer(ThreadedServer):
    """An h2c (prior knowledge) app written as :meth:`on_event`, called for each h2 event of a
    connection in turn; what the handler queued is sent after each read. ``header_encoding`` as
    h2's (None: headers stay bytes)."""

    header_encoding: str | None = None

    def serve(self, s: socket.socket) -> None:
        import h2.config
        import h2.connection
        import h2.exceptions

        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                    header_encoding=self.header_encoding))
        conn.initiate_connection()
        try:
            with s:
                s.sendall(conn.data_to_send())
                while data := s.recv(65536):
                    for ev in conn.receive_data(data):
                        self.on_event(conn, ev)
                    s.sendall(conn.data_to_send())
        except (OSError, h2.exceptions.ProtocolError):
            pass

    def on_event(self, conn, ev) -> None:
        raise NotImplementedError
