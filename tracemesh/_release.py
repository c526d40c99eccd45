"""Which release of a dependency is installed, for the few places that lean on its internals and
are switched on only for the releases they were checked against (the OTLP/gRPC receiver's core
server on grpcio's, the sidecar's HTTP/2 frame receiving on h2's)."""

from __future__ import annotations


def release(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as ``"1.85.3"``; (0, 0) when it has no such form (a
    development build), which no tested range holds."""
    try:
        major, minor = version.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return (0, 0)
