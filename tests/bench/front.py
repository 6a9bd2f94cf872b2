"""A round-robin TCP front for the swarm benchmark: each new connection (HTTP or a websocket)
goes to the next backend in turn; a backend that refuses the connection is skipped for the
next one, as a load balancer's health check would, so a killed web process sends its
clients to the others until it is back. Bytes are copied as they come, both ways.

    python -m tests.bench.front --listen 18000 --to 127.0.0.1:18001 --to 127.0.0.1:18002
"""

import argparse
import asyncio
import contextlib
import itertools


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            writer.close()


async def serve(listen: int, backends: list[tuple[str, int]]) -> None:
    turn = itertools.cycle(range(len(backends)))

    async def handle(client_reader, client_writer) -> None:
        first = next(turn)
        for offset in range(len(backends)):
            host, port = backends[(first + offset) % len(backends)]
            try:
                server_reader, server_writer = await asyncio.wait_for(
                    asyncio.open_connection(host, port), 5
                )
                break
            except (OSError, TimeoutError):
                continue
        else:
            client_writer.close()
            return
        await asyncio.gather(
            _pipe(client_reader, server_writer), _pipe(server_reader, client_writer)
        )

    server = await asyncio.start_server(handle, "127.0.0.1", listen, backlog=4096)
    print(f"front listening on {listen}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", type=int, required=True)
    parser.add_argument("--to", action="append", required=True, help="host:port (repeat)")
    args = parser.parse_args()
    backends = []
    for where in args.to:
        host, _, port = where.rpartition(":")
        if host not in ("127.0.0.1", "localhost"):
            parser.error("the front only forwards to 127.0.0.1")
        backends.append((host, int(port)))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.listen, backends))


if __name__ == "__main__":
    main()
