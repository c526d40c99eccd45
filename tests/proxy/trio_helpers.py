"""Small Trio helpers the socket-level proxy tests share."""

import trio
import trio.testing


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected pair of trio.SocketStreams over loopback TCP: (client, server)."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    client = await trio.open_tcp_stream("127.0.0.1", listener.getsockname()[1])
    sock, _ = await listener.accept()
    listener.close()
    return client, trio.SocketStream(sock)


def run_on_mock_clock(main) -> None:
    """*main* on a clock that jumps ahead whenever every task waits: seconds-long timeouts, at once."""
    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
