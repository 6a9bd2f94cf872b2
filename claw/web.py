"""`python -m claw.web [daphne options] claw.asgi:application`: Daphne, as Claw runs it.

Claw's web processes speak plain HTTP and WebSocket behind a proxy that terminates TLS.
Daphne depends on `twisted[tls]`, so pyOpenSSL and service_identity are installed, and
Twisted's endpoints module loads them at start for TLS endpoints that Claw never opens:
about 5 MB of every web process's memory, which holds thousands of agent sockets. Here
OpenSSL is marked unavailable before Daphne starts, which takes Twisted's own no-TLS path.
To terminate TLS in Daphne itself, run plain `daphne` instead: the same server, slower.

The server is Daphne's, with a leaner queue between each connection and its application
instance (InputQueue), on TCP connections that send as soon as they are written to
(sending_at_once); see there.
"""

import asyncio
import sys
from functools import partial


def without_tls() -> None:
    """Keep Twisted from loading pyOpenSSL in this process (a no-op once it is loaded)."""
    sys.modules.setdefault("OpenSSL", None)


class InputQueue:
    """What an application instance reads its connection's messages from: the part of
    asyncio.Queue that Daphne uses (put_nowait, and get as the ASGI `receive`), kept in two
    lists. An asyncio.Queue allocates four deques (its items, getters, putters and a join
    Event's waiters), about 3 KB, and every open socket holds one for its whole life.
    Unbounded and FIFO; a cancelled get passes a wake-up it received on, as asyncio's does.
    """

    __slots__ = ("_getters", "_items")

    def __init__(self) -> None:
        self._items: list = []
        self._getters: list[asyncio.Future] = []

    def put_nowait(self, item) -> None:
        self._items.append(item)
        self._wake_next()

    async def get(self):
        while not self._items:
            getter = asyncio.get_running_loop().create_future()
            self._getters.append(getter)
            try:
                await getter
            except asyncio.CancelledError:
                if getter in self._getters:
                    self._getters.remove(getter)
                if self._items and not getter.cancelled():
                    self._wake_next()
                raise
        return self._items.pop(0)

    def qsize(self) -> int:
        return len(self._items)

    def empty(self) -> bool:
        return not self._items

    def _wake_next(self) -> None:
        while self._getters:
            getter = self._getters.pop(0)
            if not getter.done():
                getter.set_result(None)
                return


def server_class():
    """Daphne's Server, creating application instances with an InputQueue. (A function:
    importing Daphne's server loads Twisted's endpoints, which must follow without_tls.)"""
    from daphne.server import Server

    class ClawServer(Server):
        def create_application(self, protocol, scope):
            # Daphne's own, but for the queue.
            assert "application_instance" not in self.connections[protocol]
            input_queue = InputQueue()
            scope.setdefault("asgi", {"version": "3.0"})
            application_instance = self.application(
                scope=scope, receive=input_queue.get, send=partial(self.handle_reply, protocol)
            )
            if protocol not in self.connections:
                return None
            self.connections[protocol]["application_instance"] = asyncio.ensure_future(
                application_instance, loop=asyncio.get_event_loop()
            )
            return input_queue

    return ClawServer


def sending_at_once() -> None:
    """Make Twisted's TCP connections send at once what the socket takes, as asyncio's
    transports do, and buffer only the rest (later writes queue behind it, in order).
    Twisted's own write buffers everything until the reactor's next turn: for each
    streamed piece an epoll registration, a turn through Twisted's logging context, the
    send, and an unregistration. In the gateway benchmark this is 4-13% less CPU per
    relayed piece."""
    from twisted.internet import tcp

    class Connection(tcp.Server):
        def write(self, data: bytes) -> None:
            if isinstance(data, bytes) and data and self._nothing_pending():
                try:
                    sent = self.socket.send(data)
                except OSError:
                    # Would block: all of it waits. Anything else: Twisted's own write
                    # finds the connection lost and closes it as it always does.
                    sent = 0
                data = data[sent:]
            super().write(data)

        def writeSequence(self, iovec) -> None:
            self.write(b"".join(iovec))

        def _nothing_pending(self) -> bool:
            return (
                self.connected
                and not self.disconnecting
                and not self._writeDisconnected
                and not self._tempDataLen
                and self.offset == len(self.dataBuffer)
            )

    tcp.Port.transport = Connection


def main() -> None:
    from claw.bodylimit import daphne_refuses_large_bodies

    without_tls()
    sending_at_once()
    daphne_refuses_large_bodies()
    from daphne.cli import CommandLineInterface

    CommandLineInterface.server_class = server_class()
    CommandLineInterface.entrypoint()


if __name__ == "__main__":
    main()
