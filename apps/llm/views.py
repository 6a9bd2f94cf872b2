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
backend is metered after it ends (apps.llm.meter)."""

import asyncio
import contextlib
import functools
import json
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
from django.conf import settings
from django.db import InterfaceError, OperationalError, close_old_connections, connection
from django.http import HttpRequest, HttpResponse, JsonResponse, StreamingHttpResponse
from django.utils import timezone
from django.views.decorators.csrf import csrf_exempt

from apps.llm.meter import METER
from apps.llm.models import ModelCallStatus
from apps.llm.selectors import Caller, CallerError, caller_for_token
from apps.llm.services import CallRecord, budget_exhausted_refuse
from claw import llm

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
# Database reads of the request path run here: long-lived threads whose connections stay
# open (CONN_MAX_AGE), not a fresh thread and connection per request.
_DB = ThreadPoolExecutor(max_workers=8, thread_name_prefix="claw-llm-db")
_EVENT_END = re.compile(rb"\r?\n\r?\n")


def error_response(status: int, code: str, message: str) -> JsonResponse:
    """An OpenAI-style error. The SDK retries 408/409/429 by default; a gateway refusal
    (bad token, stale attempt, budget) is final, so those say `x-should-retry: false`."""
    error = {
        "message": message,
        "type": ERROR_TYPES.get(status, "api_error"),
        "param": None,
        "code": code,
    }
    response = JsonResponse({"error": error}, status=status)
    if status < 500:
        response["x-should-retry"] = "false"
    return response


_checked = threading.local()
# How often a gateway DB thread checks its connection (age, health): not on every call,
# which would cost a round trip each time.
CONNECTION_CHECK_S = 10.0


def _in_db_thread(fn, kwargs: dict):
    now = time.monotonic()
    if now - getattr(_checked, "at", 0.0) > CONNECTION_CHECK_S:
        close_old_connections()
        _checked.at = now
    try:
        return fn(**kwargs)
    except (InterfaceError, OperationalError):
        # A connection that died since the last check: one retry on a fresh one.
        connection.close()
        _checked.at = time.monotonic()
        return fn(**kwargs)


async def _db(fn, **kwargs):
    return await asyncio.get_running_loop().run_in_executor(_DB, _in_db_thread, fn, kwargs)


@functools.cache
def _without_retries(client: openai.AsyncOpenAI) -> openai.AsyncOpenAI:
    # The agent's own SDK retries; retrying here too would multiply a slow backend's wait.
    return client.with_options(max_retries=0)


def _int_header(request: HttpRequest, name: str) -> int | None:
    value = request.headers.get(name)
    if value is None or value.strip() == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise CallerError(400, "invalid_header", f"{name} must be an integer.") from None


async def _authenticate(request: HttpRequest, *, with_attempt: bool) -> Caller:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token.startswith(DEVICE_PREFIX):
        raise CallerError(
            401, "invalid_api_key", "Send the device token: Authorization: Bearer clawd_…."
        )
    attempt_id = _int_header(request, "X-Claw-Attempt") if with_attempt else None
    epoch = _int_header(request, "X-Claw-Epoch") if attempt_id is not None else None
    return await _db(caller_for_token, raw_token=token, attempt_id=attempt_id, epoch=epoch)


def _read_payload(request: HttpRequest) -> dict:
    length = request.headers.get("Content-Length", "")
    too_large = CallerError(
        413, "request_too_large", f"The request body is larger than {MAX_BODY_BYTES} bytes."
    )
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_large
    raw = request.read(MAX_BODY_BYTES + 1)
    if len(raw) > MAX_BODY_BYTES:
        raise too_large
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
        self.model = body.pop("model", None) or settings.CLAW_LLM_MODEL
        self.messages = body.pop("messages")
        self.stream = bool(body.pop("stream", False))
        for name, value in llm.sampling_defaults(self.model).items():
            body.setdefault(name, value)
        options = body.get("stream_options") or {}
        self.wants_usage = bool(self.stream and options.get("include_usage"))
        if self.stream:
            body["stream_options"] = {**options, "include_usage": True}
        self.extra_body = body
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

    def _fail(self, exc: Exception) -> JsonResponse:
        status, code, message = _upstream_error(exc)
        self.record(status=ModelCallStatus.ERROR, http_status=status, code=code, error=message)
        return error_response(status, code, message)

    def _note_usage(self, usage) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            self.completion_tokens = int(usage.get("completion_tokens") or 0)

    async def run(self) -> HttpResponse:
        client = _without_retries(llm.async_client())
        manager = client.chat.completions.with_streaming_response.create(
            model=self.model, messages=self.messages, stream=self.stream, extra_body=self.extra_body
        )
        try:
            upstream = await manager.__aenter__()
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
            return HttpResponse(
                exc.response.content, status=exc.status_code, content_type=content_type
            )
        except (openai.APIError, httpx.HTTPError) as exc:
            return self._fail(exc)
        except asyncio.CancelledError:
            self.record(status=ModelCallStatus.CANCELLED, http_status=499, code="client_gone")
            raise
        if not self.stream:
            return await self._answer(manager, upstream)
        response = StreamingHttpResponse(
            self._relay(manager, upstream),
            status=upstream.status_code,
            content_type=upstream.headers.get("content-type", "text/event-stream"),
        )
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        return response

    async def _answer(self, manager, upstream) -> HttpResponse:
        try:
            raw = await upstream.read()
        except (openai.APIError, httpx.HTTPError) as exc:
            return self._fail(exc)
        except asyncio.CancelledError:
            self.record(status=ModelCallStatus.CANCELLED, http_status=499, code="client_gone")
            raise
        finally:
            await manager.__aexit__(None, None, None)
        self.ttft_ms = self._ms()
        with contextlib.suppress(ValueError, AttributeError):
            self._note_usage(json.loads(raw).get("usage"))
        self.record(status=ModelCallStatus.OK, http_status=upstream.status_code)
        content_type = upstream.headers.get("content-type", "application/json")
        return HttpResponse(raw, status=upstream.status_code, content_type=content_type)

    async def _relay(self, manager, upstream):
        status, code, error = ModelCallStatus.CANCELLED, "client_gone", ""
        buffer = b""
        try:
            async for chunk in upstream.iter_bytes():
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
            await manager.__aexit__(None, None, None)
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


def _not_configured() -> JsonResponse:
    return error_response(
        503, "model_unavailable", "No model backend is configured (CLAW_LLM_BASE_URL)."
    )


@csrf_exempt
async def chat_completions(request: HttpRequest) -> HttpResponse:
    if request.method != "POST":
        return error_response(405, "method_not_allowed", "Use POST.")
    try:
        caller = await _authenticate(request, with_attempt=True)
        payload = _read_payload(request)
        if caller.budget_exhausted:
            await _db(budget_exhausted_refuse, group_id=caller.group_id)
            raise CallerError(
                429,
                "budget_exhausted",
                f"The group's model token budget is used up ({caller.llm_tokens_used:,} of "
                f"{caller.llm_token_budget:,} tokens). The group's owners were asked to "
                "raise it (a budget checkpoint).",
            )
    except CallerError as exc:
        return error_response(exc.status, exc.code, exc.message)
    if not llm.configured():
        return _not_configured()
    return await _Call(caller, payload).run()


@csrf_exempt
async def models(request: HttpRequest) -> HttpResponse:
    if request.method != "GET":
        return error_response(405, "method_not_allowed", "Use GET.")
    try:
        await _authenticate(request, with_attempt=False)
    except CallerError as exc:
        return error_response(exc.status, exc.code, exc.message)
    if not llm.configured():
        return _not_configured()
    client = _without_retries(llm.async_client())
    try:
        async with client.models.with_streaming_response.list() as upstream:
            raw = await upstream.read()
    except (openai.APIError, httpx.HTTPError) as exc:
        status, code, message = _upstream_error(exc)
        return error_response(status, code, message)
    content_type = upstream.headers.get("content-type", "application/json")
    return HttpResponse(raw, status=upstream.status_code, content_type=content_type)
