"""The model gateway: OpenAI-compatible `GET /v1/models` and `POST /v1/chat/completions`
for device agents, who authenticate with their device token (`Authorization: Bearer
clawd_…`) and never hold the provider's key.

`X-Claw-Attempt: <attempt id>` (and `X-Claw-Epoch: <epoch>`) attribute a call to a live
attempt of the calling device. The request goes to the configured backend through the
openai SDK (claw.llm), the client's fields as they are plus the model's sampling defaults
for fields it did not set; a stream is relayed event by event as the backend sends it,
bytes unchanged (tool calls, reasoning_content, Kimi tool-call ids), and the backend is
always asked for the usage chunk, which the client gets only if it asked too. Errors are
OpenAI-style: `{"error": {"message", "type", "param", "code"}}`; a stream that fails after
it started ends with an SSE `data: {"error": …}` event. Every call that reached the
backend is metered after it ends (apps.llm.meter).

This is a bare ASGI application (claw.asgi sends /v1/ here), not a Django view: the
gateway needs no session, CSRF or auth middleware, and Django runs sync middleware on one
shared thread, where 50 concurrent streams queued for their first byte."""

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections, connection
from django.utils import timezone

from apps.llm.meter import METER
from apps.llm.models import ModelCallStatus
from apps.llm.selectors import Caller, CallerError, caller_for_token
from apps.llm.services import CallRecord, budget_exhausted_message, budget_exhausted_refuse
from claw import llm
from claw.errors import pool_timed_out

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 4 * 1024 * 1024
DEVICE_PREFIX = "clawd_"
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    429: "insufficient_quota",
}
# Database reads of the request path run here: long-lived threads, not a fresh thread per
# request. Without a pool each keeps its connection open (CONN_MAX_AGE); with one, each
# call hands its connection back to the pool.
_DB = ThreadPoolExecutor(max_workers=8, thread_name_prefix="claw-llm-db")
_EVENT_END = re.compile(rb"\r?\n\r?\n")
_SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store")]


class ClientGone(Exception):
    """The agent closed its connection."""


class Request:
    """What the gateway reads of an ASGI HTTP request."""

    def __init__(self, scope: dict, receive) -> None:
        self.method = scope["method"]
        self.headers = {
            name.decode("latin-1").lower(): value.decode("latin-1")
            for name, value in scope.get("headers", [])
        }
        self._receive = receive
        self.raw = b""

    async def body(self) -> bytes:
        length = self.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            raise _too_large()
        chunks, size = [], 0
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise _too_large()
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def disconnected(self) -> None:
        """Returns once the client has gone away (to be raced against the answer)."""
        while (await self._receive())["type"] != "http.disconnect":
            pass


class Response:
    """A complete answer; `Stream` answers piece by piece."""

    def __init__(
        self, body: bytes, *, status: int = 200, content_type: str = "application/json"
    ) -> None:
        self.body, self.status, self.content_type = body, status, content_type
        self.headers: list[tuple[bytes, bytes]] = []

    def start(self) -> dict:
        headers = [(b"content-type", self.content_type.encode("latin-1")), *_SECURITY_HEADERS]
        return {"type": "http.response.start", "status": self.status, "headers": headers}

    async def send(self, send) -> None:
        start = self.start()
        start["headers"] += [*self.headers, (b"content-length", str(len(self.body)).encode())]
        await send(start)
        await send({"type": "http.response.body", "body": self.body})


class Stream(Response):
    def __init__(self, pieces, *, status: int, content_type: str) -> None:
        super().__init__(b"", status=status, content_type=content_type)
        self.pieces = pieces
        self.headers = [(b"x-accel-buffering", b"no")]

    async def send(self, send) -> None:
        start = self.start()
        start["headers"] += self.headers
        await send(start)
        try:
            async for piece in self.pieces:
                await send({"type": "http.response.body", "body": piece, "more_body": True})
        finally:
            await self.pieces.aclose()  # at once, also when the client went away mid-send
        await send({"type": "http.response.body", "body": b""})


def error_response(status: int, code: str, message: str) -> Response:
    """An OpenAI-style error. The SDK retries 408/409/429 by default; a gateway refusal
    (bad token, stale attempt, budget) is final, so those say `x-should-retry: false`."""
    error = {
        "message": message,
        "type": ERROR_TYPES.get(status, "api_error"),
        "param": None,
        "code": code,
    }
    response = Response(json.dumps({"error": error}).encode(), status=status)
    if status < 500:
        response.headers.append((b"x-should-retry", b"false"))
    return response


def _too_large() -> CallerError:
    return CallerError(
        413, "request_too_large", f"The request body is larger than {MAX_BODY_BYTES} bytes."
    )


_checked = threading.local()
# How often a gateway DB thread checks its connection (age, health): not on every call,
# which would cost a round trip each time.
CONNECTION_CHECK_S = 10.0


def _in_db_thread(fn, kwargs: dict):
    if getattr(connection, "pool", None) is not None:
        try:
            return _retried(fn, kwargs)
        finally:
            # Back to the pool: an idle thread holding it would keep it from everyone.
            connection.close()
    now = time.monotonic()
    if now - getattr(_checked, "at", 0.0) > CONNECTION_CHECK_S:
        close_old_connections()
        _checked.at = now
    return _retried(fn, kwargs)


def _retried(fn, kwargs: dict):
    try:
        return fn(**kwargs)
    except (InterfaceError, OperationalError) as exc:
        if pool_timed_out(exc):
            raise
        # A connection that died since the last check: one retry on a fresh one.
        connection.close()
        _checked.at = time.monotonic()
        return fn(**kwargs)


async def _db(fn, **kwargs):
    return await asyncio.get_running_loop().run_in_executor(_DB, _in_db_thread, fn, kwargs)


# httpcore checks every idle connection of a pool (a syscall each) whenever a request
# starts, so with one pool of ~100 kept-alive connections each call paid ~100 checks: the
# gateway spreads its calls round robin over small pools instead.
POOLS = 8


@functools.cache
def _pooled_clients(client: openai.AsyncOpenAI) -> "itertools.cycle[openai.AsyncOpenAI]":
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=16)
    # The agent's own SDK retries; retrying here too would multiply a slow backend's wait.
    return itertools.cycle(
        [
            client.with_options(
                max_retries=0,
                http_client=openai.DefaultAsyncHttpxClient(limits=limits, timeout=client.timeout),
            )
            for _ in range(POOLS)
        ]
    )


def _backend() -> openai.AsyncOpenAI:
    return next(_pooled_clients(llm.async_client()))


def _int_header(request: Request, name: str) -> int | None:
    value = request.headers.get(name.lower())
    if value is None or value.strip() == "":
        return None
    try:
        number = int(value)
    except ValueError:
        number = -1
    if not 0 <= number < 2**63:
        raise CallerError(400, "invalid_header", f"{name} must be a non-negative integer.")
    return number


async def _authenticate(request: Request, *, with_attempt: bool) -> Caller:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token.startswith(DEVICE_PREFIX):
        raise CallerError(
            401, "invalid_api_key", "Send the device token: Authorization: Bearer clawd_…."
        )
    attempt_id = _int_header(request, "X-Claw-Attempt") if with_attempt else None
    epoch = _int_header(request, "X-Claw-Epoch") if attempt_id is not None else None
    return await _db(caller_for_token, raw_token=token, attempt_id=attempt_id, epoch=epoch)


def _parse_payload(raw: bytes) -> dict:
    try:
        payload = json.loads(raw)
    except ValueError:
        raise CallerError(400, "invalid_json", "The request body is not valid JSON.") from None
    if not isinstance(payload, dict):
        raise CallerError(400, "invalid_request", "The request body must be a JSON object.")
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise CallerError(400, "invalid_messages", "messages must be a non-empty list.")
    if not all(isinstance(m, dict) for m in messages):
        raise CallerError(400, "invalid_messages", "Each message must be a JSON object.")
    model = payload.get("model")
    if model is not None and (not isinstance(model, str) or not model.strip()):
        raise CallerError(400, "invalid_model", "model must be a non-empty string.")
    if payload.get("stream") not in (None, True, False):
        raise CallerError(400, "invalid_stream", "stream must be true or false.")
    if not isinstance(payload.get("stream_options") or {}, dict):
        raise CallerError(400, "invalid_stream_options", "stream_options must be an object.")
    return payload


def _upstream_error(exc: Exception) -> tuple[int, str, str]:
    """(status, code, message) for a backend that failed before answering."""
    if isinstance(exc, openai.APITimeoutError | httpx.TimeoutException):
        return (
            504,
            "backend_timeout",
            f"The model backend did not answer within {settings.CLAW_LLM_READ_TIMEOUT_S} s.",
        )
    if isinstance(exc, openai.APIStatusError):
        detail = exc.message if isinstance(exc.message, str) else ""
        return 502, "backend_error", f"The model backend failed ({exc.status_code}): {detail}"[:500]
    return 502, "backend_unavailable", f"The model backend is unreachable ({type(exc).__name__})."


class _Call:
    """One chat completion on its way through: the backend's answer relayed, its usage and
    time to first token noted, and a CallRecord for the meter at the end."""

    def __init__(self, caller: Caller, payload: dict) -> None:
        self.caller = caller
        self.started = time.monotonic()
        self.created_at = timezone.now()
        body = dict(payload)
        self.model = body["model"] = body.get("model") or settings.CLAW_LLM_MODEL
        self.stream = bool(body.get("stream"))
        for name, value in llm.sampling_defaults(self.model).items():
            body.setdefault(name, value)
        options = body.get("stream_options") or {}
        self.wants_usage = bool(self.stream and options.get("include_usage"))
        if self.stream:
            body["stream_options"] = {**options, "include_usage": True}
        self.body = body
        self.prompt_tokens = self.completion_tokens = 0
        self.ttft_ms: int | None = None

    def _ms(self) -> int:
        return round((time.monotonic() - self.started) * 1000)

    def record(self, *, status: str, http_status: int, code: str = "", error: str = "") -> None:
        caller = self.caller
        METER.submit(
            CallRecord(
                group_id=caller.group_id,
                device_id=caller.device_id,
                agent_id=caller.agent_id,
                task_id=caller.task_id,
                attempt_id=caller.attempt_id,
                model=self.model,
                stream=self.stream,
                status=status,
                http_status=http_status,
                error_code=code,
                error=error,
                prompt_tokens=self.prompt_tokens,
                completion_tokens=self.completion_tokens,
                ttft_ms=self.ttft_ms,
                latency_ms=self._ms(),
                created_at=self.created_at,
            )
        )

    def _fail(self, exc: Exception) -> Response:
        status, code, message = _upstream_error(exc)
        self.record(status=ModelCallStatus.ERROR, http_status=status, code=code, error=message)
        return error_response(status, code, message)

    def _note_usage(self, usage) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)

    async def run(self) -> Response:
        # The SDK's plain `post` with the JSON as it will be sent: `chat.completions.create`
        # would rebuild every message through its typed parameters first, a third of the
        # gateway's CPU per call, to send the same bytes. The answer comes back unread.
        try:
            upstream = await _backend().post(
                "/chat/completions",
                cast_to=httpx.Response,
                content=json.dumps(self.body).encode(),
                stream=True,
            )
        except openai.APIStatusError as exc:
            if exc.status_code >= 500:
                return self._fail(exc)
            # The backend refused the request itself (too long, bad parameter, its own
            # rate limit): the agent gets the backend's answer as it is.
            self.record(
                status=ModelCallStatus.ERROR,
                http_status=exc.status_code,
                code=f"backend_{exc.status_code}",
                error=str(exc.message)[:500],
            )
            content_type = exc.response.headers.get("content-type", "application/json")
            return Response(exc.response.content, status=exc.status_code, content_type=content_type)
        except (openai.APIError, httpx.HTTPError) as exc:
            return self._fail(exc)
        except asyncio.CancelledError:
            self.record(status=ModelCallStatus.CANCELLED, http_status=499, code="client_gone")
            raise
        if not self.stream:
            return await self._answer(upstream)
        return Stream(
            self._relay(upstream),
            status=upstream.status_code,
            content_type=upstream.headers.get("content-type", "text/event-stream"),
        )

    async def _answer(self, upstream: httpx.Response) -> Response:
        try:
            raw = await upstream.aread()
        except (openai.APIError, httpx.HTTPError) as exc:
            return self._fail(exc)
        except asyncio.CancelledError:
            self.record(status=ModelCallStatus.CANCELLED, http_status=499, code="client_gone")
            raise
        finally:
            await upstream.aclose()
        self.ttft_ms = self._ms()
        with contextlib.suppress(ValueError, AttributeError):
            self._note_usage(json.loads(raw).get("usage"))
        self.record(status=ModelCallStatus.OK, http_status=upstream.status_code)
        content_type = upstream.headers.get("content-type", "application/json")
        return Response(raw, status=upstream.status_code, content_type=content_type)

    async def _relay(self, upstream: httpx.Response):
        status, code, error = ModelCallStatus.CANCELLED, "client_gone", ""
        buffer = b""
        try:
            async for chunk in upstream.aiter_bytes():
                buffer += chunk
                out, start = [], 0
                for match in _EVENT_END.finditer(buffer):
                    event = buffer[start : match.end()]
                    start = match.end()
                    if self._observe(event):
                        out.append(event)
                buffer = buffer[start:]
                if out:
                    yield b"".join(out)
            if buffer.strip():
                yield buffer
            status, code = ModelCallStatus.OK, ""
        except (openai.APIError, httpx.HTTPError) as exc:
            _, code, error = _upstream_error(exc)
            status = ModelCallStatus.ERROR
            if code == "backend_timeout":
                error = (
                    f"The model backend sent nothing for {settings.CLAW_LLM_READ_TIMEOUT_S} s "
                    "in the middle of the stream."
                )
            else:
                error = f"The model backend broke off the stream ({type(exc).__name__})."
            body = {"error": {"message": error, "type": "api_error", "param": None, "code": code}}
            yield f"data: {json.dumps(body)}\n\n".encode()
        finally:
            await upstream.aclose()
            self.record(status=status, http_status=200, code=code, error=error)

    def _observe(self, event: bytes) -> bool:
        """Note time to first token and usage; False drops the event (the usage chunk the
        client did not ask for)."""
        if self.ttft_ms is not None and b'"usage"' not in event:
            return True
        data = b"\n".join(
            line[5:].lstrip() for line in event.splitlines() if line.startswith(b"data:")
        )
        if not data or data == b"[DONE]":
            return True
        try:
            chunk = json.loads(data)
        except ValueError:
            return True
        if not isinstance(chunk, dict):
            return True
        choices = chunk.get("choices") or []
        if self.ttft_ms is None and any(_generated(choice) for choice in choices):
            self.ttft_ms = self._ms()
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self._note_usage(usage)
            if not self.wants_usage and not choices:
                return False
        return True


def _generated(choice) -> bool:
    delta = choice.get("delta") if isinstance(choice, dict) else None
    if not isinstance(delta, dict):
        return False
    return bool(delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"))


def _not_configured() -> Response:
    return error_response(
        503, "model_unavailable", "No model backend is configured (CLAW_LLM_BASE_URL)."
    )


async def chat_completions(request: Request) -> Response:
    if request.method != "POST":
        return error_response(405, "method_not_allowed", "Use POST.")
    try:
        caller = await _authenticate(request, with_attempt=True)
        payload = _parse_payload(request.raw)
        if caller.budget_exhausted:
            await _db(budget_exhausted_refuse, group_id=caller.group_id)
            raise CallerError(
                429,
                "budget_exhausted",
                budget_exhausted_message(caller.llm_tokens_used, caller.llm_token_budget),
            )
    except CallerError as exc:
        return error_response(exc.status, exc.code, exc.message)
    if not llm.configured():
        return _not_configured()
    return await _Call(caller, payload).run()


async def models(request: Request) -> Response:
    if request.method != "GET":
        return error_response(405, "method_not_allowed", "Use GET.")
    try:
        await _authenticate(request, with_attempt=False)
    except CallerError as exc:
        return error_response(exc.status, exc.code, exc.message)
    if not llm.configured():
        return _not_configured()
    client = _backend()
    try:
        async with client.models.with_streaming_response.list() as upstream:
            raw = await upstream.read()
    except (openai.APIError, httpx.HTTPError) as exc:
        status, code, message = _upstream_error(exc)
        return error_response(status, code, message)
    content_type = upstream.headers.get("content-type", "application/json")
    return Response(raw, status=upstream.status_code, content_type=content_type)


ROUTES = {"/v1/chat/completions": chat_completions, "/v1/models": models}


async def application(scope: dict, receive, send) -> None:
    """ASGI entry for HTTP requests under /v1/. The answer races the client's disconnect:
    an agent that goes away cancels the call, which closes the backend's stream."""
    handler = ROUTES.get(scope["path"].rstrip("/"))
    if handler is None:
        await error_response(404, "not_found", f"No endpoint {scope['path']}.").send(send)
        return
    request = Request(scope, receive)
    if request.method == "POST":
        try:
            request.raw = await request.body()
        except ClientGone:
            return
        except CallerError as exc:
            await error_response(exc.status, exc.code, exc.message).send(send)
            return

    async def answer() -> None:
        try:
            response = await handler(request)
        except Exception:
            logger.exception("model gateway failed on %s", scope["path"])
            response = error_response(500, "internal_error", "The gateway failed; retry.")
        with contextlib.suppress(ClientGone, OSError):
            await response.send(send)

    answering = asyncio.ensure_future(answer())
    watching = asyncio.ensure_future(request.disconnected())
    try:
        await asyncio.wait({answering, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (answering, watching):
            task.cancel()
        for task in (answering, watching):
            with contextlib.suppress(asyncio.CancelledError):
                await task
