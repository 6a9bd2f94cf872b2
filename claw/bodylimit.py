"""Request bodies are refused with 413 before they are read. Django's ASGI handler spools
a whole body to disk before any view runs (a 300 MiB upload was read to the end, ~60 s,
for an odd 422), so the limit is enforced in front of it: by Content-Length at once, and
while streaming, as soon as more than the limit has arrived."""

import json
import re

from django.conf import settings

from apps.devices.skills import MAX_DOCUMENT_BYTES

# Multipart boundaries, part headers and the small form fields beside the file.
FRAMING_BYTES = 64 * 1024
ARTIFACT_UPLOAD = re.compile(r"^/api/v1/tasks/[0-9]+/artifacts/?$")


class BodyTooLarge(Exception):
    pass


def body_limit(path: str) -> int:
    """The largest body a path may get: artifact uploads up to CLAW_ARTIFACT_MAX_BYTES;
    everything else up to the largest form or document (skill documents, 2 MiB)."""
    if ARTIFACT_UPLOAD.match(path):
        largest = settings.CLAW_ARTIFACT_MAX_BYTES
    else:
        largest = max(settings.DATA_UPLOAD_MAX_MEMORY_SIZE, MAX_DOCUMENT_BYTES)
    return largest + FRAMING_BYTES


async def _refuse(send, limit: int) -> None:
    body = json.dumps(
        {"code": "too_large", "message": f"The request body is larger than {limit} bytes."}
    ).encode()
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
                await _refuse(send, limit)
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
                await _refuse(send, limit)

    return middleware
