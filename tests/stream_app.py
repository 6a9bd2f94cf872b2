"""A plain ASGI application for tests of the web process (tests/test_web.py):
`GET /stream?pieces=N&size=BYTES[&delay=S]` streams N numbered pieces, stopping when the
client goes away; `GET /gone` says how many streams it saw the client leave."""

import asyncio
import contextlib
from urllib.parse import parse_qs

gone = 0


def piece(index: int, size: int) -> bytes:
    label = b"%08d:" % index
    return label + bytes([index % 251]) * (size - len(label))


async def _stream(send, pieces: int, size: int, delay: float) -> None:
    start = {"type": "http.response.start", "status": 200, "headers": []}
    await send(start)
    for index in range(pieces):
        await send({"type": "http.response.body", "body": piece(index, size), "more_body": True})
        await asyncio.sleep(delay)
    await send({"type": "http.response.body", "body": b""})


async def application(scope, receive, send) -> None:
    global gone
    assert scope["type"] == "http"
    if scope["path"] == "/gone":
        body = str(gone).encode()
        headers = [(b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    query = {name: values[0] for name, values in parse_qs(scope["query_string"].decode()).items()}
    streaming = asyncio.ensure_future(
        _stream(send, int(query["pieces"]), int(query["size"]), float(query.get("delay", 0)))
    )
    watching = asyncio.ensure_future(_disconnected(receive))
    await asyncio.wait({streaming, watching}, return_when=asyncio.FIRST_COMPLETED)
    if watching.done():
        gone += 1
    for task in (streaming, watching):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _disconnected(receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
