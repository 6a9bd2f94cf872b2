"""The model gateway (/v1/models, /v1/chat/completions) through the real `openai` SDK: a
real Daphne serving Claw on this test run's PostgreSQL database (the tests commit their
rows, so the server sees the personas) in services mode, and tests/llm_server as the
backend in its own process. Auth per device and attempt, pass-through of streams and
answers, metering, budgets, backend failures and malformed requests."""

import json
import re
import time
import urllib.parse

import httpx
import openai
import pytest
from django.db import connection
from django.utils import timezone

from apps.checkpoints.models import Checkpoint, CheckpointKind, CheckpointStatus
from apps.checkpoints.services import checkpoint_decide
from apps.devices.models import Device, Toolkit
from apps.events.models import Event
from apps.groups.models import Group
from apps.llm.models import ModelCall
from apps.tasks.models import Attempt, Task
from tests.live import (
    PYTHON,
    Proc,
    child_env,
    free_port,
    health,
    services_database_url,
    services_redis_url,
    wait_listening,
)
from tests.llm_server import LLMServer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.postgres,
    pytest.mark.redis,
    pytest.mark.django_db(transaction=True),
]

READ_TIMEOUT_S = 2
KIMI_CALL = {"name": "search", "arguments": '{"q": "claw"}'}


def start_daphne(tmp_path, backend_url: str) -> tuple[Proc, str]:
    """Daphne on the test database (its name once pytest-django created it)."""
    base = urllib.parse.urlparse(services_database_url())
    database = urllib.parse.urlunparse(base._replace(path="/" + connection.settings_dict["NAME"]))
    tag = f"claw_gateway_{free_port()}"
    env = child_env(
        DJANGO_SETTINGS_MODULE="claw.settings",
        CLAW_DATABASE_URL=database,
        CLAW_REDIS_URL=services_redis_url(),
        CLAW_CHANNEL_PREFIX=tag,
        CLAW_CELERY_QUEUE=tag,
        CLAW_DATA_DIR=str(tmp_path),
        CLAW_LLM_BASE_URL=backend_url,
        CLAW_LLM_API_KEY="provider-secret",
        CLAW_LLM_READ_TIMEOUT_S=str(READ_TIMEOUT_S),
        CLAW_LLM_CONNECT_TIMEOUT_S="2",
    )
    port = free_port()
    command = [PYTHON, "-m", "claw.web", "-b", "127.0.0.1", "-p", str(port)]
    proc = Proc("daphne", [*command, "claw.asgi:application"], env)
    wait_listening(port, 30, proc)
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def backend():
    server = LLMServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def gateway(backend, django_db_setup, django_db_blocker, tmp_path_factory):
    proc, url = start_daphne(tmp_path_factory.mktemp("gateway"), backend.base_url)
    yield url
    proc.close()


@pytest.fixture(autouse=True)
def _fresh_backend(backend, transactional_db):
    backend.reset()
    yield
    # The gateway meters each call it forwarded in its own process, after the call ends.
    # Those writes land before the test database is flushed: the flush's TRUNCATE against
    # the meter's row locks is a deadlock.
    forwarded = [h for h in backend.headers() if h.get("authorization") == "Bearer provider-secret"]
    deadline = time.monotonic() + 10
    while ModelCall.objects.count() < len(forwarded) and time.monotonic() < deadline:
        time.sleep(0.05)


def sdk(gateway: str, token: str, **headers) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{gateway}/v1",
        api_key=token,
        max_retries=0,
        timeout=20,
        default_headers={k: str(v) for k, v in headers.items()},
        http_client=httpx.Client(trust_env=False),
    )


def raw_post(gateway: str, content: bytes, token: str | None = None) -> httpx.Response:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    with httpx.Client(trust_env=False, timeout=20) as client:
        return client.post(f"{gateway}/v1/chat/completions", content=content, headers=headers)


def wait_calls(count: int, timeout: float = 10.0, **filters) -> list[ModelCall]:
    deadline = time.monotonic() + timeout
    while True:
        calls = list(ModelCall.objects.filter(**filters).order_by("id"))
        if len(calls) >= count or time.monotonic() > deadline:
            assert len(calls) == count, calls
            return calls
        time.sleep(0.05)


def running_attempt(agent, *, status: str = "running") -> Attempt:
    task = Task.objects.create(
        group=agent.group, title="Write the summary", max_attempts=3, epoch=1, status="running"
    )
    return Attempt.objects.create(
        task=task, agent=agent, device=agent.device, epoch=1, status=status
    )


HELLO = [{"role": "user", "content": "hello there"}]


# --- auth ------------------------------------------------------------------------------


def test_only_an_unrevoked_device_token_gets_in(personas, gateway, backend):
    token = personas.agent.device.raw_token

    models = sdk(gateway, token).models.list()
    assert [m.id for m in models.data] == ["kimi-k2.6", "test-model"]

    for bad in ("clawd_not-a-real-token", "clawp_a-personal-token", "sk-provider"):
        with pytest.raises(openai.AuthenticationError) as caught:
            sdk(gateway, bad).chat.completions.create(model="kimi-k2.6", messages=HELLO)
        assert caught.value.code == "invalid_api_key"
    missing = raw_post(gateway, json.dumps({"messages": HELLO}).encode())
    assert missing.status_code == 401
    assert missing.json()["error"]["type"] == "authentication_error"

    Device.objects.filter(id=personas.agent.device_id).update(revoked_at=timezone.now())
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk(gateway, token).chat.completions.create(model="kimi-k2.6", messages=HELLO)
    body = caught.value.body
    assert set(body) == {"message", "type", "param", "code"} and body["code"] == "invalid_api_key"
    assert backend.requests() == []  # nothing reached the backend


def test_the_backend_gets_the_provider_key_never_the_device_token(personas, gateway, backend):
    token = personas.agent.device.raw_token
    sdk(gateway, token).chat.completions.create(model="kimi-k2.6", messages=HELLO)

    (headers,) = backend.headers()
    assert headers["authorization"] == "Bearer provider-secret"
    assert token not in json.dumps(headers)


def test_an_attempt_must_be_the_devices_own_and_live(personas, gateway, backend):
    token = personas.agent.device.raw_token
    mine = running_attempt(personas.agent)
    theirs = running_attempt(personas.other_agent)
    done = running_attempt(personas.agent, status="succeeded")

    with pytest.raises(openai.NotFoundError) as caught:
        sdk(gateway, token, **{"X-Claw-Attempt": theirs.id}).chat.completions.create(
            model="kimi-k2.6", messages=HELLO
        )
    assert caught.value.code == "attempt_not_found"
    for headers in ({"X-Claw-Attempt": done.id}, {"X-Claw-Attempt": mine.id, "X-Claw-Epoch": 2}):
        with pytest.raises(openai.ConflictError) as caught:
            sdk(gateway, token, **headers).chat.completions.create(
                model="kimi-k2.6", messages=HELLO
            )
        assert caught.value.code == "stale_attempt"
    assert backend.requests() == []

    headers = {"X-Claw-Attempt": mine.id, "X-Claw-Epoch": 1}
    sdk(gateway, token, **headers).chat.completions.create(model="kimi-k2.6", messages=HELLO)
    (call,) = wait_calls(1)
    assert (call.attempt_id, call.task_id, call.agent_id) == (mine.id, mine.task_id, mine.agent_id)
    assert call.device_id == personas.agent.device_id and call.group_id == personas.group.id


# --- pass-through ------------------------------------------------------------------------


def test_an_answer_passes_through_with_tool_calls_reasoning_and_usage(personas, gateway, backend):
    backend.script(
        {
            "reasoning_content": "The user wants a search.",
            "tool_calls": [KIMI_CALL],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7},
        }
    )
    attempt = running_attempt(personas.agent)
    client = sdk(gateway, personas.agent.device.raw_token, **{"X-Claw-Attempt": attempt.id})

    answer = client.chat.completions.create(
        messages=HELLO, model="kimi-k2.6", tools=[{"type": "function", "function": {"name": "s"}}]
    )

    message = answer.choices[0].message
    assert message.tool_calls[0].id == "functions.search:0"
    assert message.tool_calls[0].function.arguments == '{"q": "claw"}'
    assert message.model_extra["reasoning_content"] == "The user wants a search."
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (11, 7)
    (sent,) = backend.requests()
    assert sent["temperature"] == 1.0  # the model's sampling default
    assert sent["tools"] == [{"type": "function", "function": {"name": "s"}}]
    assert "stream_options" not in sent

    (call,) = wait_calls(1)
    assert (call.status, call.prompt_tokens, call.completion_tokens) == ("ok", 11, 7)
    assert call.model == "kimi-k2.6" and not call.stream and call.latency_ms >= 0
    event = Event.objects.get(kind="llm.call")
    assert event.attempt_id == attempt.id and event.agent_id == personas.agent.id
    assert event.payload["prompt_tokens"] == 11 and event.payload["call_id"] == call.id
    assert Group.objects.get(id=personas.group.id).llm_tokens_used == 18


def test_a_clients_own_sampling_settings_win_and_the_model_defaults(personas, gateway, backend):
    client = sdk(gateway, personas.agent.device.raw_token)
    client.chat.completions.create(messages=HELLO, model="test-model", temperature=0.2)
    raw_post(gateway, json.dumps({"messages": HELLO}).encode(), personas.agent.device.raw_token)

    first, second = backend.requests()
    assert first["temperature"] == 0.2 and first["model"] == "test-model"
    assert second["model"] == "kimi-k2.6" and second["temperature"] == 1.0


def _normalized(raw: bytes) -> bytes:
    raw = re.sub(rb'"created": \d+', b'"created": 0', raw)
    return re.sub(rb"chatcmpl-\d+", b"chatcmpl-N", raw)


def _stream_raw(url: str, token: str, body: dict) -> bytes:
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(trust_env=False, timeout=20) as client:
        with client.stream("POST", url, json=body, headers=headers) as response:
            assert response.status_code == 200, response.read()
            return b"".join(response.iter_raw())


def test_a_stream_relays_the_backends_bytes_unchanged(personas, gateway, backend):
    script = {
        "reasoning_content": "Think first.",
        "content": "Here it comes.",
        "tool_calls": [KIMI_CALL, {"name": "fetch", "arguments": "{}"}],
        "usage": {"prompt_tokens": 5, "completion_tokens": 9},
    }
    body = {
        "model": "kimi-k2.6",
        "messages": HELLO,
        "stream": True,
        "temperature": 1.0,
        "stream_options": {"include_usage": True},
    }
    token = personas.agent.device.raw_token
    backend.script(script, script, script)

    direct = _stream_raw(f"{backend.base_url}/chat/completions", "x", body)
    with_usage = _stream_raw(f"{gateway}/v1/chat/completions", token, body)
    body.pop("stream_options")
    without_usage = _stream_raw(f"{gateway}/v1/chat/completions", token, body)

    assert _normalized(with_usage) == _normalized(direct)
    events = direct.split(b"\n\n")
    usage_event = next(e for e in events if b'"choices": []' in e)
    assert _normalized(without_usage) == _normalized(direct.replace(usage_event + b"\n\n", b""))
    assert b'"id": "functions.search:0"' in with_usage and b"reasoning_content" in with_usage
    assert all(r["stream_options"] == {"include_usage": True} for r in backend.requests())
    calls = wait_calls(2)
    assert [(c.prompt_tokens, c.completion_tokens, c.stream) for c in calls] == [(5, 9, True)] * 2
    assert all(c.ttft_ms is not None and c.ttft_ms <= c.latency_ms for c in calls)


def test_a_stream_through_the_sdk_has_tool_calls_and_reasoning(personas, gateway, backend):
    backend.script({"reasoning_content": "Hmm.", "tool_calls": [KIMI_CALL]})
    client = sdk(gateway, personas.agent.device.raw_token)

    chunks = list(
        client.chat.completions.create(
            model="kimi-k2.6",
            messages=HELLO,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == "Hmm."
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert [(tc.id, tc.function.name) for tc in calls] == [("functions.search:0", "search")]
    assert chunks[-1].usage is not None and chunks[-1].choices == []


def test_chunks_arrive_as_the_backend_sends_them(personas, gateway, backend):
    backend.script({"content": "one two three four five six", "chunks": 6, "chunk_delay_ms": 300})
    client = sdk(gateway, personas.agent.device.raw_token)

    started = time.monotonic()
    arrivals = []
    for chunk in client.chat.completions.create(model="kimi-k2.6", messages=HELLO, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            arrivals.append(time.monotonic() - started)

    assert len(arrivals) == 6
    # The first piece leaves the backend at ~0.3 s, the last at ~1.8 s.
    assert arrivals[0] < 0.9, arrivals
    assert arrivals[-1] - arrivals[0] > 1.2, arrivals


def test_a_client_that_goes_away_closes_the_backends_stream(personas, gateway, backend):
    backend.script({"content": "a " * 40, "chunks": 40, "chunk_delay_ms": 100})
    client = sdk(gateway, personas.agent.device.raw_token)

    stream = client.chat.completions.create(model="kimi-k2.6", messages=HELLO, stream=True)
    next(iter(stream))
    stream.close()

    (call,) = wait_calls(1)
    assert call.status == "cancelled"
    deadline = time.monotonic() + 5
    while not backend.streams()[0]["disconnected"] and time.monotonic() < deadline:
        time.sleep(0.05)
    (log,) = backend.streams()
    assert log["disconnected"] and not log["completed"] and log["events"] < 20


# --- budgets -----------------------------------------------------------------------------


def test_a_budget_alerts_at_80_refuses_at_100_and_approval_raises_it(personas, gateway, backend):
    Group.objects.filter(id=personas.group.id).update(llm_token_budget=100)
    client = sdk(gateway, personas.agent.device.raw_token)
    backend.script(
        {"usage": {"prompt_tokens": 50, "completion_tokens": 35}},
        {"usage": {"prompt_tokens": 10, "completion_tokens": 10}},
        {"usage": {"prompt_tokens": 1, "completion_tokens": 1}},
    )

    client.chat.completions.create(model="kimi-k2.6", messages=HELLO)
    wait_calls(1)
    alerts = Event.objects.filter(kind="llm.budget_alert")
    assert [e.payload for e in alerts] == [{"percent": 80, "used": 85, "budget": 100}]

    client.chat.completions.create(model="kimi-k2.6", messages=HELLO)
    wait_calls(2)
    assert [e.payload["percent"] for e in alerts.all()] == [80, 100]
    checkpoint = Checkpoint.objects.get(kind=CheckpointKind.BUDGET)
    assert (checkpoint.source, checkpoint.decider_role) == ("system", "owner")
    assert checkpoint.options == ["+50%", "+100%"]

    for _ in range(2):
        with pytest.raises(openai.RateLimitError) as caught:
            client.chat.completions.create(model="kimi-k2.6", messages=HELLO)
        assert caught.value.code == "budget_exhausted"
        assert "105 of 100" in caught.value.message
        assert caught.value.response.headers["x-should-retry"] == "false"
    assert Checkpoint.objects.filter(kind=CheckpointKind.BUDGET).count() == 1  # once
    assert len(backend.requests()) == 2

    checkpoint_decide(
        actor=personas.owner, checkpoint=checkpoint, verdict="approve", option="+100%"
    )

    assert Group.objects.get(id=personas.group.id).llm_token_budget == 200
    raised = Event.objects.get(kind="llm.budget_raised")
    assert raised.payload == {
        "from": 100,
        "to": 200,
        "option": "+100%",
        "checkpoint_id": checkpoint.id,
    }
    client.chat.completions.create(model="kimi-k2.6", messages=HELLO)
    wait_calls(3)
    assert Checkpoint.objects.get(id=checkpoint.id).status == CheckpointStatus.APPROVED


def test_the_budget_is_readable_and_owner_settable_over_the_api(personas, gateway):
    from tests.test_api_support import body, client_for, send

    response = send(
        client_for(personas.owner), "PATCH", "/groups/research", {"llm_token_budget": 5000}
    )
    assert response.status_code == 200, response.content
    data = body(response)
    assert (data["llm_token_budget"], data["llm_tokens_used"]) == (5000, 0)
    refused = send(
        client_for(personas.member), "PATCH", "/groups/research", {"llm_token_budget": 1}
    )
    assert refused.status_code == 403
    unlimited = send(
        client_for(personas.owner), "PATCH", "/groups/research", {"llm_token_budget": None}
    )
    assert body(unlimited)["llm_token_budget"] is None


# --- a failing backend -------------------------------------------------------------------


def test_a_failing_backend_gives_clear_errors(personas, gateway, backend):
    client = sdk(gateway, personas.agent.device.raw_token)
    backend.script(
        {"status": 500, "error": "CUDA out of memory"},
        {"hang": True},
        {"delay_ms": (READ_TIMEOUT_S + 1) * 1000},
        {"status": 400, "error": "context too long"},
    )

    with pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model="kimi-k2.6", messages=HELLO)
    assert caught.value.status_code == 502 and caught.value.code == "backend_error"
    assert "CUDA out of memory" in caught.value.message
    wait_calls(1)
    _, body = health(gateway)  # 503 here only for want of Celery workers
    assert body["components"]["llm"]["ok"] is False
    assert body["components"]["llm"]["reachable"] is False
    assert "CUDA out of memory" in body["components"]["llm"]["error"]

    for _ in range(2):  # hangs; answers too late
        started = time.monotonic()
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="kimi-k2.6", messages=HELLO)
        assert caught.value.status_code == 504 and caught.value.code == "backend_timeout"
        assert time.monotonic() - started < READ_TIMEOUT_S + 1.5

    with pytest.raises(openai.BadRequestError) as caught:  # the backend's own refusal
        client.chat.completions.create(model="kimi-k2.6", messages=HELLO)
    assert "context too long" in caught.value.message

    calls = wait_calls(4)
    assert [c.error_code for c in calls] == [
        "backend_error",
        "backend_timeout",
        "backend_timeout",
        "backend_400",
    ]
    assert all(c.status == "error" for c in calls)

    client.chat.completions.create(model="kimi-k2.6", messages=HELLO)
    wait_calls(5)
    _, body = health(gateway)
    assert body["components"]["llm"]["reachable"] is True
    assert body["components"]["llm"]["configured"] is True


def test_a_stream_that_stalls_ends_with_an_error_event(personas, gateway, backend):
    backend.script({"content": "slow words", "chunks": 2, "chunk_delay_ms": 3500})
    client = sdk(gateway, personas.agent.device.raw_token)

    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in client.chat.completions.create(model="kimi-k2.6", messages=HELLO, stream=True):
            received.append(chunk)

    assert received  # the stream had started
    assert "sent nothing" in caught.value.message
    (call,) = wait_calls(1)
    assert (call.status, call.error_code, call.http_status) == ("error", "backend_timeout", 200)


def test_an_unreachable_backend_is_a_502(personas, tmp_path):
    proc, url = start_daphne(tmp_path, f"http://127.0.0.1:{free_port()}/v1")
    try:
        client = sdk(url, personas.agent.device.raw_token)
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model="kimi-k2.6", messages=HELLO)
        assert caught.value.status_code == 502 and caught.value.code == "backend_unavailable"
        with pytest.raises(openai.InternalServerError):
            client.models.list()
        wait_calls(1)
        _, body = health(url)
        assert body["components"]["llm"]["reachable"] is False
    finally:
        proc.close()


# --- malformed requests ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_request"),
        (json.dumps({"model": "kimi-k2.6"}).encode(), 400, "invalid_messages"),
        (json.dumps({"messages": []}).encode(), 400, "invalid_messages"),
        (json.dumps({"messages": ["hi"]}).encode(), 400, "invalid_messages"),
        (json.dumps({"messages": HELLO, "stream": "yes"}).encode(), 400, "invalid_stream"),
        (json.dumps({"messages": HELLO, "model": ""}).encode(), 400, "invalid_model"),
        (json.dumps({"messages": HELLO, "model": 7}).encode(), 400, "invalid_model"),
        (
            json.dumps({"messages": HELLO, "stream": True, "stream_options": [1]}).encode(),
            400,
            "invalid_stream_options",
        ),
        (
            json.dumps({"messages": HELLO, "pad": "x" * (5 << 20)}).encode(),
            413,
            "request_too_large",
        ),
    ],
)
def test_malformed_requests_are_refused_clearly(personas, gateway, backend, content, status, code):
    response = raw_post(gateway, content, personas.agent.device.raw_token)

    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error"
    assert error["message"]
    assert backend.requests() == []


def test_wrong_methods_and_headers_are_refused(personas, gateway):
    token = personas.agent.device.raw_token
    with httpx.Client(trust_env=False, timeout=10) as client:
        wrong = client.get(
            f"{gateway}/v1/chat/completions", headers={"Authorization": f"Bearer {token}"}
        )
        bad_headers = [
            client.post(
                f"{gateway}/v1/chat/completions",
                json={"messages": HELLO},
                headers={"Authorization": f"Bearer {token}", "X-Claw-Attempt": value},
            )
            for value in ("seven", "-3", str(2**63), "1" * 400)
        ]
        unknown = client.post(
            f"{gateway}/v1/embeddings",
            json={"input": "x"},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    assert "/v1/embeddings" in unknown.json()["error"]["message"]
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"
    for bad_header in bad_headers:
        assert bad_header.status_code == 400
        assert bad_header.json()["error"]["code"] == "invalid_header"


# --- metering and budgets, in-process ----------------------------------------------------


def _record(personas, tokens: tuple[int, int], **extra):
    from apps.llm.services import CallRecord

    return CallRecord(
        group_id=personas.group.id,
        device_id=personas.agent.device_id,
        agent_id=personas.agent.id,
        model="kimi-k2.6",
        stream=True,
        status="ok",
        http_status=200,
        latency_ms=40,
        created_at=timezone.now(),
        prompt_tokens=tokens[0],
        completion_tokens=tokens[1],
        **extra,
    )


def test_a_batch_is_one_row_and_event_per_call_and_alerts_once_per_crossing(personas):
    from apps.llm.selectors import llm_usage, llm_usage_by
    from apps.llm.services import model_calls_record

    Group.objects.filter(id=personas.group.id).update(llm_token_budget=1000)
    attempt = running_attempt(personas.agent)

    model_calls_record(records=[_record(personas, (300, 200)), _record(personas, (100, 100))])
    model_calls_record(
        records=[_record(personas, (50, 50), task_id=attempt.task_id, attempt_id=attempt.id)]
    )
    model_calls_record(records=[_record(personas, (10, 0))])

    assert Event.objects.filter(kind="llm.call").count() == 4
    assert [e.payload["percent"] for e in Event.objects.filter(kind="llm.budget_alert")] == [80]
    model_calls_record(records=[_record(personas, (190, 0))])  # 1000 reached
    assert [e.payload["percent"] for e in Event.objects.filter(kind="llm.budget_alert")] == [
        80,
        100,
    ]
    assert Checkpoint.objects.filter(kind=CheckpointKind.BUDGET).count() == 1
    model_calls_record(records=[_record(personas, (5, 5))])
    assert Checkpoint.objects.filter(kind=CheckpointKind.BUDGET).count() == 1
    assert Group.objects.get(id=personas.group.id).llm_tokens_used == 1010

    totals = llm_usage(group_id=personas.group.id)
    assert (totals["calls"], totals["total_tokens"], totals["errors"]) == (6, 1010, 0)
    assert llm_usage(group_id=personas.group.id, attempt_id=attempt.id)["total_tokens"] == 100
    by_task = llm_usage_by(group_id=personas.group.id, by="task")
    assert [(row["task"], row["total_tokens"]) for row in by_task] == [
        (None, 910),
        (attempt.task_id, 100),
    ]


def test_a_budget_checkpoint_raises_the_budget_by_the_chosen_option(personas):
    from apps.llm.services import budget_exhausted_refuse

    Group.objects.filter(id=personas.group.id).update(llm_token_budget=400, llm_tokens_used=400)
    budget_exhausted_refuse(group_id=personas.group.id)
    budget_exhausted_refuse(group_id=personas.group.id)
    checkpoint = Checkpoint.objects.get(kind=CheckpointKind.BUDGET)

    checkpoint_decide(actor=personas.owner, checkpoint=checkpoint, verdict="approve")

    assert Group.objects.get(id=personas.group.id).llm_token_budget == 600  # +50 %
    assert Event.objects.get(kind="llm.budget_raised").payload["option"] == "+50%"


def test_refusing_a_budget_checkpoint_keeps_the_budget_and_does_not_ask_again_at_once(personas):
    from apps.llm.services import budget_exhausted_refuse

    Group.objects.filter(id=personas.group.id).update(llm_token_budget=10, llm_tokens_used=10)
    budget_exhausted_refuse(group_id=personas.group.id)
    checkpoint = Checkpoint.objects.get(kind=CheckpointKind.BUDGET)
    with pytest.raises(Exception, match="owner"):
        checkpoint_decide(actor=personas.approver, checkpoint=checkpoint, verdict="approve")

    checkpoint_decide(actor=personas.owner, checkpoint=checkpoint, verdict="reject")
    budget_exhausted_refuse(group_id=personas.group.id)

    assert Group.objects.get(id=personas.group.id).llm_token_budget == 10
    assert Checkpoint.objects.filter(kind=CheckpointKind.BUDGET).count() == 1


def test_model_tasks_wait_while_the_budget_is_used_up_and_go_once_it_is_raised(
    personas, django_capture_on_commit_callbacks, monkeypatch
):
    from apps.llm.services import budget_exhausted_refuse
    from apps.tasks.matching import tasks_match
    from apps.tasks.services import task_create
    from tests.conftest import make_agent

    asked: list[int] = []
    monkeypatch.setattr("apps.tasks.tasks.match_group.delay", asked.append)
    for slug in ("llm", "shell"):
        Toolkit.objects.get_or_create(slug=slug)
    make_agent(personas.group, "writer", toolkits={"llm": "1.0", "shell": "1"}, capacity=2)
    Group.objects.filter(id=personas.group.id).update(llm_token_budget=100, llm_tokens_used=100)
    thinking = task_create(
        group=personas.group, actor=personas.member, title="Think", required_toolkits=["llm"]
    )
    plain = task_create(
        group=personas.group, actor=personas.member, title="Run", required_toolkits=["shell"]
    )

    tasks_match(group_id=personas.group.id)
    assert Attempt.objects.filter(task=plain).exists()
    assert not Attempt.objects.filter(task=thinking).exists()  # held, still ready
    assert Task.objects.get(id=thinking.id).status == "ready"

    budget_exhausted_refuse(group_id=personas.group.id)
    checkpoint = Checkpoint.objects.get(kind=CheckpointKind.BUDGET)
    with django_capture_on_commit_callbacks(execute=True):
        checkpoint_decide(actor=personas.owner, checkpoint=checkpoint, verdict="approve")
    assert personas.group.id in asked  # the raise asks for matching

    tasks_match(group_id=personas.group.id)
    assert Attempt.objects.filter(task=thinking).exists()
