"""Probing the model backend (run by beat every CLAW_LLM_PROBE_SECONDS: apps.llm.tasks).

Three GETs, each bounded by CLAW_LLM_PROBE_TIMEOUT_S as a whole (connect, headers and body
together), never retried, and the provider key sent as the gateway sends it:

- `{root}/health` (root: the base URL without its /v1). Failing, a 5xx or 4xx answer, or no
  answer in time: the backend is down, and nothing else is asked. SGLang answers 503 while
  it starts or drains, and its /health runs a one-token generation, so a wedged scheduler
  fails it too. A 404/405 means there is no /health (a hosted API): /v1/models decides.
- `{base}/models`: the served model's id and context length (SGLang: `max_model_len` on
  each entry; others may say `context_length`).
- `{root}/metrics`: SGLang's Prometheus metrics when it serves them (`--enable-metrics`):
  `sglang:num_running_reqs`, `sglang:num_queue_reqs`, `sglang:gen_throughput`,
  `sglang:token_usage` (KV cache use, 0..1), `sglang:cache_hit_rate` and the
  `sglang:time_to_first_token_seconds` histogram. Optional: absent, they stay unknown.
"""

import json
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from apps.llm import prometheus

if TYPE_CHECKING:  # imported when a probe runs, not by every process that reads results
    import httpx

MAX_BODY_BYTES = 4 * 1024 * 1024
HEALTH_MISSING = {404, 405}


@dataclass
class ProbeResult:
    """What one probe saw. `healthy` is False when the backend is down (see `error`)."""

    healthy: bool
    latency_ms: int | None = None
    error: str = ""
    model_id: str = ""
    context_length: int | None = None
    running: int | None = None
    queued: int | None = None
    gen_throughput: float | None = None
    kv_usage: float | None = None
    cache_hit_rate: float | None = None
    # The backend's cumulative TTFT histogram (seconds, observations).
    ttft_sum_s: float | None = None
    ttft_count: float | None = None


class ProbeFailed(Exception):
    pass


def backend_root(base_url: str) -> str:
    """`http://gpu:30000/v1` → `http://gpu:30000`: where SGLang serves /health and /metrics."""
    root = base_url.rstrip("/")
    return root.removesuffix("/v1")


def _get(client: "httpx.Client", url: str, timeout: float) -> tuple[int, bytes]:
    """GET with a deadline for the whole answer (httpx's timeouts are per read, so a
    server trickling bytes could otherwise keep us forever) and a size cap."""
    deadline = time.monotonic() + timeout
    with client.stream("GET", url) as response:
        chunks, size = [], 0
        for chunk in response.iter_bytes():
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise ProbeFailed(f"GET {url}: the answer is over {MAX_BODY_BYTES} bytes")
            if time.monotonic() > deadline:
                raise ProbeFailed(f"GET {url}: no complete answer within {timeout:g} s")
            chunks.append(chunk)
        return response.status_code, b"".join(chunks)


def _problem(url: str, exc: Exception, timeout: float) -> str:
    import httpx

    if isinstance(exc, httpx.TimeoutException):
        return f"GET {url}: no answer within {timeout:g} s"
    if isinstance(exc, ProbeFailed):
        return str(exc)
    return f"GET {url}: {type(exc).__name__}: {exc}"[:500]


def _model_entry(body: bytes, model: str) -> dict:
    """The /v1/models entry of the configured model, else the first one."""
    entries = json.loads(body).get("data") or []
    entries = [e for e in entries if isinstance(e, dict)]
    for entry in entries:
        if entry.get("id") == model:
            return entry
    return entries[0] if entries else {}


def _positive_int(value) -> int | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return int(value)
    return None


def _count(value: float | None) -> int | None:
    return None if value is None or value < 0 else round(value)


def probe(*, base_url: str, api_key: str, model: str, timeout: float) -> ProbeResult:
    """Probe the backend once; never raises for the backend's sake, never waits longer
    than about three timeouts."""
    import httpx

    root, base = backend_root(base_url), base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(timeout=timeout, headers=headers, follow_redirects=False) as client:
        started = time.monotonic()
        url = f"{root}/health"
        try:
            health, _ = _get(client, url, timeout)
        except (httpx.HTTPError, httpx.InvalidURL, ProbeFailed) as exc:
            return ProbeResult(healthy=False, error=_problem(url, exc, timeout))
        latency_ms = round((time.monotonic() - started) * 1000)
        if health >= 400 and health not in HEALTH_MISSING:
            return ProbeResult(
                healthy=False, latency_ms=latency_ms, error=f"GET {url} answered {health}"
            )
        result = ProbeResult(healthy=True, latency_ms=latency_ms)

        url = f"{base}/models"
        try:
            status, body = _get(client, url, timeout)
            if status != 200:
                raise ProbeFailed(f"GET {url} answered {status}")
            entry = _model_entry(body, model)
            result.model_id = str(entry.get("id") or "")[:200]
            result.context_length = _positive_int(
                entry.get("max_model_len") or entry.get("context_length")
            )
        except (httpx.HTTPError, ProbeFailed, ValueError, AttributeError) as exc:
            if health in HEALTH_MISSING:
                # Without a /health, the model list is the only sign of life.
                return ProbeResult(healthy=False, error=_problem(url, exc, timeout))

        url = f"{root}/metrics"
        try:
            status, body = _get(client, url, timeout)
            if status == 200:
                _read_metrics(result, body.decode("utf-8", "replace"))
        except (httpx.HTTPError, ProbeFailed):
            pass  # metrics are optional: they stay unknown
    return result


def _read_metrics(result: ProbeResult, text: str) -> None:
    samples = [s for s in prometheus.parse(text) if s.name.startswith("sglang:")]
    result.running = _count(prometheus.total(samples, "sglang:num_running_reqs"))
    result.queued = _count(prometheus.total(samples, "sglang:num_queue_reqs"))
    result.gen_throughput = prometheus.total(samples, "sglang:gen_throughput")
    result.kv_usage = prometheus.highest(samples, "sglang:token_usage")
    result.cache_hit_rate = prometheus.highest(samples, "sglang:cache_hit_rate")
    ttft = prometheus.histogram(samples, "sglang:time_to_first_token_seconds")
    if ttft is not None:
        result.ttft_sum_s, result.ttft_count = ttft
