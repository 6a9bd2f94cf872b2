"""Request bodies are refused with 413 before they are read. Django's ASGI handler spools
a whole body to disk before any view runs (a 300 MiB upload was read to the end, ~60 s,
for an odd 422), so the limit is enforced in front of it: by Content-Length at once, and
while streaming, as soon as more than the limit has arrived. Daphne in turn reads the whole
body before it calls the application at all, so under Daphne the same limit is enforced on
the connection too (daphne_refuses_large_bodies)."""

import json
import re
from urllib.parse import unquote

from django.conf import settings

# Multipart boundaries, part headers and the small form fields beside the file.
FRAMING_BYTES = 64 * 1024
ARTIFACT_UPLOAD = re.compile(r"^/api/v1/tasks/[0-9]+/artifacts/?$")
TASK_GRAPH = re.compile(r"^/api/v1/groups/[^/]+/tasks/graph/?$")
MODEL_GATEWAY = "/v1/"


# After a refusal, how long the rest of the body is read and dropped before the connection
# is cut: closing with unread data would reset it and lose the 413 with it.
LINGER_S = 2.0


class BodyTooLarge(Exception):
    pass


def body_limit(path: str) -> int:
    """The largest body a path may get: artifact uploads up to CLAW_ARTIFACT_MAX_BYTES, a
    task graph up to CLAW_TASK_GRAPH_MAX_BYTES, a model call up to the gateway's own bound;
    everything else up to the largest form or document (skill documents, 2 MiB)."""
    from apps.devices.skills import MAX_DOCUMENT_BYTES  # here: the web server loads it early
    from apps.llm.gateway import MAX_BODY_BYTES

    if path.startswith(MODEL_GATEWAY):
        largest = MAX_BODY_BYTES
    elif ARTIFACT_UPLOAD.match(path):
        largest = settings.CLAW_ARTIFACT_MAX_BYTES
    elif TASK_GRAPH.match(path):
        largest = settings.CLAW_TASK_GRAPH_MAX_BYTES
    else:
        largest = max(settings.DATA_UPLOAD_MAX_MEMORY_SIZE, MAX_DOCUMENT_BYTES)
    return largest + FRAMING_BYTES


def _refusal(limit: int, path: str) -> bytes:
    message = f"The request body is larger than {limit} bytes."
    if path.startswith(MODEL_GATEWAY):  # what OpenAI clients read (apps.llm.gateway)
        error = {
            "message": message,
            "type": "invalid_request_error",
            "param": None,
            "code": "request_too_large",
        }
        return json.dumps({"error": error}).encode()
    return json.dumps({"code": "too_large", "message": message}).encode()


async def _refuse(send, limit: int, path: str) -> None:
    body = _refusal(limit, path)
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                # The rest of the body is never read: the connection cannot be reused.
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def limit_body(app):
    async def middleware(scope: dict, receive, send) -> None:
        limit = body_limit(scope["path"])
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _refuse(send, limit, scope["path"])
                return
        received = 0
        started = False

        async def limited_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge
            return message

        async def tracked_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await app(scope, limited_receive, tracked_send)
        except BodyTooLarge:
            if not started:
                await _refuse(send, limit, scope["path"])

    return middleware


# The Daphne release whose request class daphne_refuses_large_bodies extends (its
# gotLength, handleContentChunk and process): pinned in pyproject.toml, checked by a test.
DAPHNE_VERSION = "4.2.3"


def daphne_refuses_large_bodies() -> None:
    """Refuse an over-limit body in Daphne's Twisted request, as its bytes arrive.

    Daphne reads a whole request body (to memory or a temporary file) before it calls the
    application, so the ASGI middleware above alone would let a 300 MiB upload be read to
    its end. Daphne has no setting for it, so this replaces its request class with a
    subclass: written for DAPHNE_VERSION only (tests/test_body_limit.py)."""
    from daphne import http_protocol

    class LimitedRequest(http_protocol.WebRequest):
        refused = False

        body_limit: float = float("inf")
        body_received = 0
        body_path = "/"

        def gotLength(self, length: int | None) -> None:
            if settings.configured:  # else the server runs an app other than Claw's
                raw_path = getattr(self.channel, "_path", b"/").split(b"?", 1)[0]
                self.body_path = unquote(raw_path.decode("latin-1"))
                self.body_limit = body_limit(self.body_path)
            if length is not None and length > self.body_limit:
                self._refuse()
            super().gotLength(0 if self.refused else length)

        def handleContentChunk(self, data: bytes) -> None:
            if self.refused:
                return
            self.body_received += len(data)
            if self.body_received > self.body_limit:
                self._refuse()
                return
            super().handleContentChunk(data)

        def process(self):
            if not self.refused:
                return super().process()

        def _refuse(self) -> None:
            from twisted.internet import reactor  # Daphne's, installed by now

            self.refused = True
            body = _refusal(self.body_limit, self.body_path)
            transport = self.channel.transport
            transport.write(
                b"HTTP/1.1 413 Content Too Large\r\n"
                b"Content-Type: application/json\r\n"
                b"Content-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s" % (len(body), body)
            )
            transport.loseWriteConnection()
            reactor.callLater(LINGER_S, transport.abortConnection)

    http_protocol.WebRequest = LimitedRequest
