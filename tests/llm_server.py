"""A scripted OpenAI-compatible server for tests: the real wire protocol (HTTP + SSE), so
the code under test talks to it through the real `openai` SDK.

    python -m tests.llm_server --port 8123        # run as its own process

Endpoints:
- `GET /v1/models` (each entry with SGLang's `max_model_len`), `POST /v1/chat/completions`
  (JSON or `"stream": true` SSE, with `stream_options.include_usage`), answering from the
  script, else with "ok".
- `GET /health` (200, empty, as SGLang's) and `GET /metrics` (Prometheus text with SGLang's
  metric names: `sglang:num_running_reqs`, `sglang:num_queue_reqs`, `sglang:gen_throughput`,
  `sglang:token_usage`, `sglang:cache_hit_rate` and the `sglang:time_to_first_token_seconds`
  histogram, labelled like one SGLang scheduler).
- `POST /_health` `{"status": 200|503, "hang": bool, "metrics": {...} | null}` sets how
  those two answer; what it leaves out stays as it was: `status` is /health's answer,
  `hang` (true: /health and /metrics accept and never answer), `metrics` values by SGLang
  name without `sglang:` (`num_running_reqs`, `num_queue_reqs`, `gen_throughput`,
  `token_usage`, `cache_hit_rate`; `time_to_first_token_seconds`: the list of observed
  seconds) merged over the current ones, or null: /metrics answers 404 (no metrics).
- `POST /_script` `{"responses": [RESPONSE, ...]}` appends scripted responses, consumed one
  per chat completion request in order. A RESPONSE is an object with any of:
  `content` (str), `reasoning_content` (str), `tool_calls` ([{"name", "arguments" (str),
  "id" (default Kimi-style `functions.NAME:INDEX`)}]), `finish_reason`, `usage`
  ({"prompt_tokens", "completion_tokens"}; default: counted words), `chunks` (how many SSE
  pieces the content is split into, default 4), `chunk_delay_ms` (between chunks),
  `delay_ms` (before the first byte), `status` + `error` (an OpenAI-style error answer),
  `hang` (true: accept and never answer).
- `GET /_requests` → every chat request body received, in order; `GET /_headers` → their
  HTTP headers (lower-cased names), in the same order; `GET /_streams` → per streamed
  answer `{"id", "events", "completed", "disconnected"}` (when the client goes away the
  server stops sending); `POST /_reset` clears the script and the logs and makes the
server healthy again, with idle metrics.

`LLMServer` (below) starts it as a subprocess on a free port for a test module.
"""

import argparse
import asyncio
import json
import subprocess
import sys
import time
import urllib.request
from collections import deque

MODEL_IDS = ["kimi-k2.6", "test-model"]
CONTEXT_LENGTH = 262144
IDLE_METRICS = {
    "num_running_reqs": 0,
    "num_queue_reqs": 0,
    "gen_throughput": 0.0,
    "token_usage": 0.0,
    "cache_hit_rate": 0.0,
    "time_to_first_token_seconds": [],
}
TTFT_BUCKETS = [0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400]
METRIC_HELP = {
    "num_running_reqs": "The number of running requests.",
    "num_queue_reqs": "The number of requests in the waiting queue.",
    "gen_throughput": "The generation throughput (token/s).",
    "token_usage": "The token usage.",
    "cache_hit_rate": "The prefix cache hit rate.",
}


class State:
    def __init__(self) -> None:
        self.script: deque[dict] = deque()
        self.requests: list[dict] = []
        self.headers: list[dict] = []
        self.streams: list[dict] = []
        self.health_status = 200
        self.hang = False
        self.metrics: dict | None = dict(IDLE_METRICS)


STATE = State()


def _metrics_text(metrics: dict) -> str:
    """What SGLang's /metrics says, for one scheduler (tensor-parallel rank 0)."""
    labels = 'model_name="kimi-k2.6",engine_type="unified",tp_rank="0",pp_rank="0",moe_ep_rank="0"'
    lines = []
    for name, help_text in METRIC_HELP.items():
        lines += [
            f"# HELP sglang:{name} {help_text}",
            f"# TYPE sglang:{name} gauge",
            f"sglang:{name}{{{labels}}} {float(metrics[name])}",
        ]
    observed = [float(v) for v in metrics["time_to_first_token_seconds"]]
    name = "sglang:time_to_first_token_seconds"
    lines += [
        f"# HELP {name} Histogram of time to first token in seconds.",
        f"# TYPE {name} histogram",
        f"{name}_sum{{{labels}}} {sum(observed)}",
    ]
    for bound in TTFT_BUCKETS:
        count = sum(1 for v in observed if v <= bound)
        lines.append(f'{name}_bucket{{le="{float(bound)}",{labels}}} {float(count)}')
    lines += [
        f'{name}_bucket{{le="+Inf",{labels}}} {float(len(observed))}',
        f"{name}_count{{{labels}}} {float(len(observed))}",
    ]
    return "\n".join(lines) + "\n"


async def _text(send, status: int, text: str) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")],
        }
    )
    await send({"type": "http.response.body", "body": text.encode()})


async def _body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _json(send, status: int, payload) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _usage(request: dict, response: dict, text: str) -> dict:
    usage = response.get("usage")
    if usage is None:
        prompt = sum(len(str(m.get("content") or "").split()) for m in request["messages"])
        usage = {"prompt_tokens": max(prompt, 1), "completion_tokens": max(len(text.split()), 1)}
    usage = dict(usage)
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    return usage


def _tool_calls(response: dict) -> list[dict]:
    return [
        {
            "index": index,
            "id": call.get("id") or f"functions.{call['name']}:{index}",
            "type": "function",
            "function": {"name": call["name"], "arguments": call.get("arguments", "{}")},
        }
        for index, call in enumerate(response.get("tool_calls") or [])
    ]


def _split(text: str, pieces: int) -> list[str]:
    if not text:
        return []
    size = max(1, -(-len(text) // max(pieces, 1)))
    return [text[i : i + size] for i in range(0, len(text), size)]


class _Gone(Exception):
    """The client went away in the middle of a stream."""


async def _chat(request: dict, send, receive=None) -> None:
    STATE.requests.append(request)
    response = STATE.script.popleft() if STATE.script else {"content": "ok"}
    if response.get("hang"):
        await asyncio.sleep(3600)
        return
    if response.get("delay_ms"):
        await asyncio.sleep(response["delay_ms"] / 1000)
    if response.get("status"):
        error = response.get("error", "scripted error")
        await _json(send, response["status"], {"error": {"message": error, "type": "test"}})
        return
    model = request.get("model", "test-model")
    content = response.get("content")
    reasoning = response.get("reasoning_content")
    tool_calls = _tool_calls(response)
    finish = response.get("finish_reason") or ("tool_calls" if tool_calls else "stop")
    usage = _usage(request, response, (content or "") + (reasoning or ""))
    created = int(time.time())
    ident = f"chatcmpl-{len(STATE.requests)}"
    if not request.get("stream"):
        message = {"role": "assistant", "content": content}
        if reasoning is not None:
            message["reasoning_content"] = reasoning
        if tool_calls:
            message["tool_calls"] = [
                {k: v for k, v in c.items() if k != "index"} for c in tool_calls
            ]
        await _json(
            send,
            200,
            {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": usage,
            },
        )
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")],
        }
    )
    delay = response.get("chunk_delay_ms", 0) / 1000
    pieces = response.get("chunks", 4)
    log = {"id": ident, "events": 0, "completed": False, "disconnected": False}
    STATE.streams.append(log)

    async def watch() -> None:
        while receive is not None:
            if (await receive())["type"] == "http.disconnect":
                log["disconnected"] = True
                return

    watcher = asyncio.create_task(watch())
    try:
        await _stream(request, send, response, log, delay, pieces, ident, created, model)
    except _Gone:
        pass
    finally:
        watcher.cancel()


async def _stream(request, send, response, log, delay, pieces, ident, created, model) -> None:
    content = response.get("content")
    reasoning = response.get("reasoning_content")
    tool_calls = _tool_calls(response)
    finish = response.get("finish_reason") or ("tool_calls" if tool_calls else "stop")
    usage = _usage(request, response, (content or "") + (reasoning or ""))

    async def event(delta: dict, finish_reason=None, **extra) -> None:
        chunk = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            **extra,
        }
        data = f"data: {json.dumps(chunk)}\n\n".encode()
        if log["disconnected"]:
            raise _Gone
        await send({"type": "http.response.body", "body": data, "more_body": True})
        log["events"] += 1

    await event({"role": "assistant", "content": ""})
    for piece in _split(reasoning or "", pieces):
        await asyncio.sleep(delay)
        await event({"reasoning_content": piece})
    for piece in _split(content or "", pieces):
        await asyncio.sleep(delay)
        await event({"content": piece})
    for call in tool_calls:
        await asyncio.sleep(delay)
        await event({"tool_calls": [call]})
    await event({}, finish_reason=finish)
    if (request.get("stream_options") or {}).get("include_usage"):
        chunk = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage,
        }
        data = f"data: {json.dumps(chunk)}\n\n".encode()
        await send({"type": "http.response.body", "body": data, "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
    log["completed"] = True


async def app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    method, path = scope["method"], scope["path"]
    body = await _body(receive)
    if method == "GET" and path == "/v1/models":
        data = [
            {
                "id": m,
                "object": "model",
                "created": 0,
                "owned_by": "test",
                "max_model_len": CONTEXT_LENGTH,
            }
            for m in MODEL_IDS
        ]
        await _json(send, 200, {"object": "list", "data": data})
    elif method == "GET" and path in ("/health", "/metrics"):
        if STATE.hang:
            await asyncio.sleep(3600)
        elif path == "/health":
            await _text(send, STATE.health_status, "")
        elif STATE.metrics is None:
            await _json(send, 404, {"detail": "Not Found"})
        else:
            await _text(send, 200, _metrics_text(STATE.metrics))
    elif method == "POST" and path == "/_health":
        change = json.loads(body)
        STATE.health_status = change.get("status", STATE.health_status)
        STATE.hang = change.get("hang", STATE.hang)
        if "metrics" in change:
            new = change["metrics"]
            STATE.metrics = None if new is None else {**(STATE.metrics or IDLE_METRICS), **new}
        await _json(send, 200, {"status": STATE.health_status, "hang": STATE.hang})
    elif method == "POST" and path == "/v1/chat/completions":
        try:
            request = json.loads(body)
            assert isinstance(request, dict) and isinstance(request.get("messages"), list)
        except (ValueError, AssertionError):
            await _json(send, 400, {"error": {"message": "bad request", "type": "test"}})
            return
        STATE.headers.append({k.decode().lower(): v.decode() for k, v in scope["headers"]})
        await _chat(request, send, receive)
    elif method == "POST" and path == "/_script":
        STATE.script.extend(json.loads(body)["responses"])
        await _json(send, 200, {"queued": len(STATE.script)})
    elif method == "GET" and path == "/_requests":
        await _json(send, 200, STATE.requests)
    elif method == "GET" and path == "/_streams":
        await _json(send, 200, STATE.streams)
    elif method == "GET" and path == "/_headers":
        await _json(send, 200, STATE.headers)
    elif method == "POST" and path == "/_reset":
        STATE.script.clear()
        STATE.requests.clear()
        STATE.streams.clear()
        STATE.headers.clear()
        STATE.health_status, STATE.hang, STATE.metrics = 200, False, dict(IDLE_METRICS)
        await _json(send, 200, {})
    else:
        await _json(send, 404, {"error": {"message": f"no {method} {path}", "type": "test"}})


class LLMServer:
    """The server in its own process, for a test module: `.base_url` ends in /v1."""

    def __init__(self) -> None:
        from tests.live import PYTHON, ROOT, free_port

        self.port = free_port()
        self.root = f"http://127.0.0.1:{self.port}"
        self.base_url = f"{self.root}/v1"
        self.process = subprocess.Popen(
            [PYTHON, "-m", "tests.llm_server", "--port", str(self.port)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                self._call("POST", "/_reset")
                return
            except OSError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.close()
                    raise RuntimeError("the test LLM server did not start") from None
                time.sleep(0.1)

    def _call(self, method: str, path: str, payload=None):
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.root + path, data=data, method=method)  # noqa: S310
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(request, timeout=10) as response:
            return json.loads(response.read())

    def script(self, *responses: dict) -> None:
        self._call("POST", "/_script", {"responses": list(responses)})

    def requests(self) -> list[dict]:
        return self._call("GET", "/_requests")

    def headers(self) -> list[dict]:
        return self._call("GET", "/_headers")

    def streams(self) -> list[dict]:
        return self._call("GET", "/_streams")

    def reset(self) -> None:
        self._call("POST", "/_reset")

    def set_health(self, **change) -> None:
        """status=200|503, hang=bool, metrics={...} or None: see POST /_health."""
        self._call("POST", "/_health", change)

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", lifespan="on")


if __name__ == "__main__":
    sys.exit(main())
