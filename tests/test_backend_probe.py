"""The model backend probe: the Prometheus reader on SGLang-shaped text; the probe against
tests/llm_server in its own process (healthy, saturated, down: stopped, 503, hanging,
and recovering); the status it stores and what depends on it: /healthz, the matcher
holding `llm` tasks, the Model page (charts, budget), the banner, and the page socket."""

import re
import time
from datetime import timedelta

import pytest
import time_machine
from channels.layers import get_channel_layer
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apps.dashboard.live import PAGES, LiveContext
from apps.events.models import Event
from apps.groups.models import Group
from apps.llm import prometheus
from apps.llm.models import Backend, BackendProbe
from apps.llm.probe import ProbeResult, backend_root
from apps.llm.selectors import backend_holds_llm, backend_state
from apps.llm.services import (
    CallRecord,
    backend_probe_record,
    group_llm_budget_set,
    llm_status,
    model_calls_record,
)
from apps.llm.tasks import probe_backend
from apps.tasks.matching import tasks_match
from apps.tasks.models import Attempt, TaskStatus
from apps.tasks.services import task_create
from tests.conftest import make_agent
from tests.live import free_port
from tests.llm_server import CONTEXT_LENGTH, LLMServer

pytestmark = pytest.mark.django_db

TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def server():
    backend = LLMServer()
    yield backend
    backend.close()


@pytest.fixture
def backend(server, settings):
    """The test server as the configured backend, healthy and idle."""
    server.reset()
    settings.CLAW_LLM_BASE_URL = server.base_url
    settings.CLAW_LLM_PROBE_SECONDS = 15
    settings.CLAW_LLM_PROBE_TIMEOUT_S = TIMEOUT_S
    return server


@pytest.fixture
def committed(django_capture_on_commit_callbacks, broadcasts, monkeypatch):
    """Run a call as if its transaction committed (the cache drop, the broadcasts and the
    matching requests happen), collecting the groups it asked to match."""
    requested: list[int] = []
    monkeypatch.setattr("apps.tasks.tasks.match_group.delay", requested.append)

    def run(fn, *args, **kwargs):
        with django_capture_on_commit_callbacks(execute=True):
            return fn(*args, **kwargs)

    run.requested = requested
    return run


def probe_now(committed) -> str:
    return committed(probe_backend)


def record(committed, settings, *, at=None, **result) -> BackendProbe:
    result.setdefault("healthy", True)
    return committed(
        backend_probe_record,
        base_url=settings.CLAW_LLM_BASE_URL,
        result=ProbeResult(**result),
        at=at,
    )


def backend_events(group) -> list[dict]:
    return [
        e.payload for e in Event.objects.filter(group=group, kind="llm.backend").order_by("seq")
    ]


# --- reading SGLang's /metrics ----------------------------------------------------------

SGLANG_METRICS = """\
# HELP sglang:num_running_reqs The number of running requests.
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{dp_rank="0",engine_type="unified",model_name="kimi-k2.6",tp_rank="0"} 12.0
sglang:num_running_reqs{dp_rank="1",engine_type="unified",model_name="kimi-k2.6",tp_rank="0"} 9.0
sglang:num_running_reqs{dp_rank="1",engine_type="unified",model_name="kimi-k2.6",tp_rank="1"} 9.0
# HELP sglang:num_queue_reqs The number of requests in the waiting queue.
# TYPE sglang:num_queue_reqs gauge
sglang:num_queue_reqs{dp_rank="0",model_name="kimi-k2.6",tp_rank="0"} 3.0
sglang:num_queue_reqs{dp_rank="1",model_name="kimi-k2.6",tp_rank="0"} 1.0 1735689600000
# TYPE sglang:gen_throughput gauge
sglang:gen_throughput{model_name="kimi-k2.6"} 1234.5
# TYPE sglang:token_usage gauge
sglang:token_usage{dp_rank="0",model_name="kimi-k2.6"} 0.31
sglang:token_usage{dp_rank="1",model_name="kimi-k2.6"} 0.87
sglang:cache_hit_rate{model_name="kimi-k2.6"} NaN
sglang:spec_accept_length{model_name="with \\"quotes\\", a \\\\ and a\\nnewline"} +Inf
# TYPE sglang:time_to_first_token_seconds histogram
sglang:time_to_first_token_seconds_sum{model_name="kimi-k2.6"} 30.5
sglang:time_to_first_token_seconds_bucket{le="0.1",model_name="kimi-k2.6"} 2.0
sglang:time_to_first_token_seconds_bucket{le="+Inf",model_name="kimi-k2.6"} 61.0
sglang:time_to_first_token_seconds_count{model_name="kimi-k2.6"} 61.0
this line is not a sample {
sglang:broken{model_name="unterminated} 1
"""


def test_it_reads_sglangs_metrics_with_labels_comments_and_nans():
    samples = prometheus.parse(SGLANG_METRICS)
    # Per data-parallel rank summed; tensor-parallel copies (tp_rank 1) not counted twice.
    assert prometheus.total(samples, "sglang:num_running_reqs") == 21
    assert prometheus.total(samples, "sglang:num_queue_reqs") == 4  # a timestamp is fine
    assert prometheus.total(samples, "sglang:gen_throughput") == 1234.5
    assert prometheus.highest(samples, "sglang:token_usage") == 0.87  # the fullest rank
    assert prometheus.highest(samples, "sglang:cache_hit_rate") is None  # NaN says nothing
    assert prometheus.histogram(samples, "sglang:time_to_first_token_seconds") == (30.5, 61.0)
    assert prometheus.total(samples, "sglang:missing") is None
    (spec,) = [s for s in samples if s.name == "sglang:spec_accept_length"]
    assert spec.value == float("inf")
    assert spec.labels == {"model_name": 'with "quotes", a \\ and a\nnewline'}
    assert not [s for s in samples if "broken" in s.name or s.name == "this"]
    bucket = next(s for s in samples if s.labels.get("le") == "+Inf")
    assert bucket.labels == {"le": "+Inf", "model_name": "kimi-k2.6"} and bucket.value == 61


def test_the_root_is_the_base_url_without_v1():
    assert backend_root("http://gpu:30000/v1") == "http://gpu:30000"
    assert backend_root("http://gpu:30000/v1/") == "http://gpu:30000"
    assert backend_root("https://api.example.com/openai/v1") == "https://api.example.com/openai"


# --- the probe against a real server ---------------------------------------------------


def test_a_healthy_backend_is_ok_with_its_model_context_and_metrics(
    personas, backend, committed, settings
):
    backend.set_health(
        metrics={
            "num_running_reqs": 3,
            "num_queue_reqs": 1,
            "gen_throughput": 850.5,
            "token_usage": 0.42,
            "cache_hit_rate": 0.25,
            "time_to_first_token_seconds": [0.2, 0.4],
        }
    )
    assert probe_now(committed) == "ok"
    probe = BackendProbe.objects.get()
    assert (probe.status, probe.model_id, probe.context_length) == (
        "ok",
        "kimi-k2.6",
        CONTEXT_LENGTH,
    )
    assert (probe.running, probe.queued, probe.gen_throughput) == (3, 1, 850.5)
    assert (probe.kv_usage, probe.cache_hit_rate, probe.ttft_ms) == (0.42, 0.25, 300.0)
    assert probe.latency_ms is not None and probe.error == ""
    state = backend_state()
    assert (state.status, state.stale, state.holds_llm) == ("ok", False, False)
    status = llm_status()
    assert (status["status"], status["reachable"]) == ("ok", True)
    assert backend_events(personas.group) == []  # the first ok is not news

    # TTFT is the mean over the requests since the last probe, not since the start.
    backend.set_health(metrics={"time_to_first_token_seconds": [0.2, 0.4, 1.0, 1.0, 2.5]})
    probe_now(committed)
    assert BackendProbe.objects.order_by("-id").first().ttft_ms == 1500.0
    probe_now(committed)  # nothing started since: no TTFT to report
    assert BackendProbe.objects.order_by("-id").first().ttft_ms is None


def test_without_metrics_the_probe_still_knows_the_backend_is_up(backend, committed):
    backend.set_health(metrics=None)  # /metrics answers 404: a backend without them
    assert probe_now(committed) == "ok"
    probe = BackendProbe.objects.get()
    assert probe.context_length == CONTEXT_LENGTH
    assert (probe.running, probe.queued, probe.kv_usage, probe.ttft_ms) == (None,) * 4


def test_it_is_saturated_when_the_queue_or_the_kv_cache_is_over_its_threshold(
    personas, backend, committed, settings
):
    settings.CLAW_LLM_SATURATED_QUEUE = 10
    settings.CLAW_LLM_SATURATED_KV = 0.9
    steps = [
        ({"num_queue_reqs": 11}, "saturated"),
        ({"num_queue_reqs": 8}, "saturated"),  # leaving takes clearly less (half)
        ({"num_queue_reqs": 5}, "ok"),
        ({"token_usage": 0.93}, "saturated"),
        ({"token_usage": 0.88}, "saturated"),  # within 0.05 of the line
        ({"token_usage": 0.5}, "ok"),
    ]
    for metrics, expected in steps:
        backend.set_health(metrics=metrics)
        assert probe_now(committed) == expected, metrics
    statuses = [(p["from"], p["status"]) for p in backend_events(personas.group)]
    assert statuses == [
        ("unknown", "saturated"),
        ("saturated", "ok"),
        ("ok", "saturated"),
        ("saturated", "ok"),
    ]
    assert backend_events(personas.other_group) == backend_events(personas.group)


@pytest.mark.parametrize("how", ["503", "hang"])
def test_it_is_down_when_health_answers_an_error_or_nothing_in_time(
    personas, backend, committed, how
):
    probe_now(committed)
    backend.set_health(**({"status": 503} if how == "503" else {"hang": True}))
    started = time.monotonic()
    assert probe_now(committed) == "down"
    assert time.monotonic() - started < TIMEOUT_S + 1.5  # bounded, whatever the backend does
    backend_row = Backend.objects.get()
    assert backend_row.status == "down"
    expected = "answered 503" if how == "503" else f"no answer within {TIMEOUT_S:g} s"
    assert expected in backend_row.error and "/health" in backend_row.error
    assert backend_events(personas.group) == [
        {"status": "down", "from": "ok", "error": backend_row.error}
    ]
    status = llm_status()
    assert (status["status"], status["reachable"]) == ("down", False)
    assert expected in status["last_error"]


def test_without_a_health_endpoint_the_model_list_decides(backend, committed):
    backend.set_health(status=404)  # a hosted API: no /health, but /v1/models answers
    assert probe_now(committed) == "ok"
    assert BackendProbe.objects.get().model_id == "kimi-k2.6"


def test_a_stopped_server_is_down_within_the_timeout(personas, committed, settings):
    server = LLMServer()
    settings.CLAW_LLM_BASE_URL = server.base_url
    settings.CLAW_LLM_PROBE_TIMEOUT_S = TIMEOUT_S
    try:
        assert probe_now(committed) == "ok"
    finally:
        server.close()
    started = time.monotonic()
    assert probe_now(committed) == "down"
    assert time.monotonic() - started < TIMEOUT_S + 1.5
    assert "ConnectError" in Backend.objects.get().error
    # Nothing listening at all is the same.
    settings.CLAW_LLM_BASE_URL = f"http://127.0.0.1:{free_port()}/v1"
    assert probe_now(committed) == "down"


def test_recovery_is_announced_and_the_waiting_work_is_matched(
    personas, backend, committed, broadcasts
):
    writer = make_agent(personas.group, "writer", toolkits={"llm": "1.0"})
    backend.set_health(status=503)
    probe_now(committed)
    task = task_create(
        group=personas.group, actor=personas.member, title="Summarise", required_toolkits=["llm"]
    )
    assert tasks_match(group_id=personas.group.id) == []
    assert Attempt.objects.filter(task=task).count() == 0

    committed.requested.clear()
    backend.set_health(status=200)
    assert probe_now(committed) == "ok"
    assert committed.requested == [personas.group.id]  # on commit, for groups with ready work
    assert backend_events(personas.group)[-1] == {"status": "ok", "from": "down"}
    assert ("llm.backend", {"type": "live.redraw", "source": "backend.probe"}) in broadcasts
    assert any(
        channel == f"group.{personas.group.id}" and message.get("kind") == "llm.backend"
        for channel, message in broadcasts
    )
    tasks_match(group_id=personas.group.id)
    assert Attempt.objects.get(task=task).agent_id == writer.id


def test_the_probe_keeps_a_day_of_history(personas, committed, settings):
    settings.CLAW_LLM_BASE_URL = "http://gpu.invalid:30000/v1"
    now = timezone.now()
    record(committed, settings, at=now - timedelta(hours=25))
    record(committed, settings, at=now - timedelta(hours=23))
    record(committed, settings, at=now)
    assert [p.at for p in BackendProbe.objects.order_by("at")] == [
        now - timedelta(hours=23),
        now,
    ]


def test_the_probe_is_off_without_a_backend_or_with_zero_seconds(committed, settings):
    settings.CLAW_LLM_BASE_URL = ""
    assert probe_now(committed) == "off"
    settings.CLAW_LLM_BASE_URL = "http://gpu.invalid:30000/v1"
    settings.CLAW_LLM_PROBE_SECONDS = 0
    assert probe_now(committed) == "off"
    assert not BackendProbe.objects.exists()
    assert backend_state().status == "unknown" and not backend_state().probing


def test_beat_schedules_the_probe_and_drops_a_probe_that_missed_its_turn(settings):
    from claw.celery import app

    app.finalize()
    assert "claw.probe_backend" in app.tasks
    entry = app.conf.beat_schedule["probe the model backend"]
    assert entry["task"] == "claw.probe_backend"
    assert entry["schedule"] == settings.CLAW_LLM_PROBE_SECONDS
    options = entry["options"]
    assert options["expires"] == settings.CLAW_LLM_PROBE_SECONDS
    assert 0 < options["soft_time_limit"] < options["time_limit"] < 120


# --- /healthz -----------------------------------------------------------------------------


def test_healthz_reports_the_probes_status_as_advice(client, committed, settings):
    settings.CLAW_LLM_BASE_URL = "http://gpu.invalid:30000/v1"
    record(
        committed, settings, healthy=False, error="GET http://gpu.invalid:30000/health answered 503"
    )
    llm = client.get("/healthz").json()["components"]["llm"]
    assert (llm["ok"], llm["status"], llm["reachable"]) == (False, "down", False)
    assert "answered 503" in llm["error"]
    record(committed, settings, queued=1000)
    llm = client.get("/healthz").json()["components"]["llm"]
    assert (llm["ok"], llm["status"], llm["reachable"]) == (True, "saturated", True)


# --- the matcher ------------------------------------------------------------------------------


@pytest.fixture
def writer(personas, settings):
    settings.CLAW_LLM_BASE_URL = "http://gpu.invalid:30000/v1"
    return make_agent(personas.group, "writer", toolkits={"llm": "1.0", "shell": "1"}, capacity=4)


def new_task(personas, title: str, toolkits: list[str], **kwargs):
    return task_create(
        group=personas.group,
        actor=personas.member,
        title=title,
        required_toolkits=toolkits,
        **kwargs,
    )


def assigned(task) -> int | None:
    attempt = Attempt.objects.filter(task=task).first()
    return attempt and attempt.agent_id


@pytest.mark.parametrize("trouble", [{"healthy": False, "error": "gone"}, {"queued": 999}])
def test_it_holds_llm_tasks_while_the_backend_is_down_or_saturated(
    personas, writer, committed, settings, trouble
):
    record(committed, settings, **trouble)
    assert backend_holds_llm()
    summary = new_task(personas, "Summarise", ["llm"], priority=10)
    mixed = new_task(personas, "Script and summarise", ["shell", "llm"], priority=5)
    script = new_task(personas, "Script", ["shell"])
    tasks_match(group_id=personas.group.id)
    assert (assigned(summary), assigned(mixed)) == (None, None)
    assert assigned(script) is not None  # other work flows on
    summary.refresh_from_db()
    assert summary.status == TaskStatus.READY  # waiting, not failed

    record(committed, settings)  # back
    assert not backend_holds_llm()
    tasks_match(group_id=personas.group.id)
    assert (assigned(summary), assigned(mixed)) == (writer.id, writer.id)


def test_it_does_not_hold_on_old_news(personas, writer, committed, settings):
    record(committed, settings, healthy=False, error="gone")
    summary = new_task(personas, "Summarise", ["llm"])
    with time_machine.travel(timezone.now() + timedelta(minutes=2)):
        # The probe stopped (beat is down?): a down status that old says nothing about now.
        state = backend_state()
        assert (state.status, state.stale, state.holds_llm) == ("unknown", True, False)
        tasks_match(group_id=personas.group.id)
    assert assigned(summary) == writer.id


def test_without_a_probed_backend_nothing_is_held(personas, writer, settings):
    summary = new_task(personas, "Summarise", ["llm"])
    tasks_match(group_id=personas.group.id)  # configured, never probed
    assert assigned(summary) == writer.id
    settings.CLAW_LLM_BASE_URL = ""
    assert backend_state() == backend_state().__class__(configured=False, probing=False)


def test_the_hold_costs_one_cached_read_per_match(personas, writer, committed, settings):
    record(committed, settings, healthy=False, error="gone")
    for i in range(3):
        new_task(personas, f"S{i}", ["llm"])
    backend_state()  # cached now
    with CaptureQueriesContext(connection) as queries:
        tasks_match(group_id=personas.group.id)
    assert not any("llm_backend" in q["sql"] for q in queries.captured_queries)


# --- the Model page, the banner ------------------------------------------------------------


@pytest.fixture
def as_(client, personas):
    def sign_in(name: str):
        client.logout()
        client.force_login(getattr(personas, name))
        return client

    return sign_in


def text(response) -> str:
    return response.content.decode()


def probe_history(committed, settings, minutes: int = 30) -> None:
    """A probe a minute until now, the backend busier as it goes, with one down minute."""
    now = timezone.now()
    for i in range(minutes):
        at = now - timedelta(minutes=minutes - 1 - i)
        if i == minutes // 2:
            record(committed, settings, at=at, healthy=False, error="GET /health answered 503")
            continue
        record(
            committed,
            settings,
            at=at,
            model_id="kimi-k2.6",
            context_length=262144,
            running=i,
            queued=i // 10,
            gen_throughput=100.0 * i,
            kv_usage=i / (2 * minutes),
            ttft_sum_s=float(i),
            ttft_count=float(2 * i),
        )


@pytest.mark.parametrize("persona", ["owner", "approver", "member", "viewer"])
def test_every_member_sees_the_model_page_and_only_owners_the_budget_form(
    as_, persona, committed, settings
):
    settings.CLAW_LLM_BASE_URL = "http://gpu.invalid:30000/v1"
    probe_history(committed, settings)
    page = text(as_(persona).get("/g/research/model/"))
    assert 'id="backend-status-chip">ok<' in page
    assert 'id="backend-model">kimi-k2.6<' in page and "262144 tokens" in page
    assert 'ws-connect="/ws/live/?page=model&amp;group=research"' in page
    assert 'id="nav-model" href="/g/research/model/"' in page
    assert ('id="budget-form"' in page) == (persona == "owner")


def test_outsiders_get_404_for_the_model_page_and_its_form(as_):
    client = as_("outsider")
    assert client.get("/g/research/model/").status_code == 404
    assert client.post("/g/research/model/budget/", {"budget": "5"}).status_code == 404
    assert client.get("/g/nope/model/").status_code == 404


def test_the_model_page_draws_the_last_hour_as_sparklines(as_, committed, settings):
    settings.CLAW_LLM_BASE_URL = "http://gpu.invalid:30000/v1"
    probe_history(committed, settings)
    page = text(as_("viewer").get("/g/research/model/"))
    for key in ("requests", "throughput", "ttft", "kv"):
        chart = re.search(rf'id="chart-{key}".*?</figure>', page, re.S).group()
        # The down minute breaks each line in two.
        assert chart.count("<polyline") == (4 if key == "requests" else 2), key
    assert 'id="latest-requests-running">running 29<' in page
    assert 'id="latest-kv"> 48.3 %<' in page  # 29 / 60
    assert 'id="latest-ttft"> 500 ms<' in page  # two more requests a minute, 1 s in all
    assert "peak 2900 tok/s" in page


def test_the_model_page_shows_this_groups_budget_and_calls(as_, personas, committed, settings):
    now = timezone.now()
    records = [
        CallRecord(
            group_id=personas.group.id,
            device_id=None,
            model="kimi-k2.6",
            stream=True,
            status=status,
            http_status=200 if status == "ok" else 502,
            latency_ms=900,
            created_at=now,
            prompt_tokens=100,
            completion_tokens=50,
            ttft_ms=ttft,
        )
        for status, ttft in [("ok", 200), ("ok", 400), ("ok", 900), ("error", None)]
    ]
    committed(model_calls_record, records=records)
    Group.objects.filter(id=personas.group.id).update(llm_token_budget=1000)
    page = text(as_("viewer").get("/g/research/model/"))
    assert 'id="usage-used">600<' in page
    assert 'id="usage-budget">1000 <span class="muted">(60 % used)' in page
    assert 'id="usage-calls">4<' in page and 'id="usage-errors">1<' in page
    assert 'id="usage-ttft">400 ms<' in page


def test_owners_set_the_budget_and_no_one_else_may(as_, personas):
    response = as_("owner").post("/g/research/model/budget/", {"budget": "5000"})
    assert response.status_code == 302 and response.url == "/g/research/model/"
    assert Group.objects.get(id=personas.group.id).llm_token_budget == 5000
    event = Event.objects.filter(group=personas.group, kind="llm.budget_set").get()
    assert event.payload == {"from": None, "to": 5000, "used": 0}
    assert event.actor_id == personas.owner.pk
    as_("owner").post("/g/research/model/budget/", {"budget": ""})
    assert Group.objects.get(id=personas.group.id).llm_token_budget is None
    response = as_("owner").post("/g/research/model/budget/", {"budget": "-1"}, follow=True)
    assert any("greater than or equal to 0" in str(m) for m in response.context["messages"])
    for persona in ("approver", "member", "viewer"):
        response = as_(persona).post("/g/research/model/budget/", {"budget": "1"})
        assert response.status_code == 403, persona
    assert Group.objects.get(id=personas.group.id).llm_token_budget is None


@pytest.mark.parametrize("status", ["down", "saturated"])
def test_every_page_shows_the_banner_while_the_backend_is_down_or_saturated(
    as_, committed, settings, status
):
    settings.CLAW_LLM_BASE_URL = "http://gpu.invalid:30000/v1"
    trouble = {"healthy": False, "error": "GET /health answered 503"}
    record(committed, settings, **(trouble if status == "down" else {"queued": 999}))
    client = as_("viewer")
    for url in ("/g/research/", "/g/research/agents/", "/g/research/model/", "/approvals/"):
        page = text(client.get(url))
        assert f'id="backend-banner" class="banner banner-{status}" role="alert"' in page, url
    record(committed, settings)
    page = text(client.get("/g/research/"))
    assert '<div id="backend-banner" hidden data-status="ok"' in page


def test_the_model_renderer_redraws_what_changed_with_a_fixed_number_of_queries(
    personas, committed, settings
):
    settings.CLAW_LLM_BASE_URL = "http://gpu.invalid:30000/v1"

    def render(events=(), resync=False):
        group = Group.objects.get(id=personas.group.id)
        ctx = LiveContext(
            user=personas.viewer,
            group=group,
            role="viewer",
            params={},
            events=list(events),
            resync=resync,
        )
        with CaptureQueriesContext(connection) as queries:
            fragments = PAGES["model"](ctx)
        return [re.search(r'id="([^"]+)"', f).group(1) for f in fragments], len(queries)

    probe_history(committed, settings, minutes=5)
    ids, few = render(resync=True)
    assert ids == ["model-backend", "model-usage"]
    probe_history(committed, settings, minutes=50)
    assert render(resync=True)[1] == few
    task = task_create(group=personas.group, actor=personas.member, title="T")
    assert render(Event.objects.filter(task=task))[0] == []
    committed(group_llm_budget_set, actor=personas.owner, group_id=personas.group.id, budget=20)
    budget_events = Event.objects.filter(group=personas.group, kind="llm.budget_set")
    assert render(budget_events)[0] == ["model-usage"]
    record(committed, settings, healthy=False, error="gone")
    status_events = Event.objects.filter(group=personas.group, kind="llm.backend")
    assert render(status_events)[0] == ["model-backend", "model-usage"]


# --- the page socket ----------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_the_model_page_redraws_after_each_probe_and_the_banner_on_a_change(
    personas, settings
):
    from channels.db import database_sync_to_async

    from tests.test_dashboard_live import ids_in, page_socket, seq_of

    settings.CLAW_LLM_BASE_URL = "http://gpu.invalid:30000/v1"
    settings.CLAW_LLM_PROBE_SECONDS = 15
    recorded = database_sync_to_async(backend_probe_record)
    await recorded(base_url=settings.CLAW_LLM_BASE_URL, result=ProbeResult(healthy=True))
    async with page_socket(
        personas.viewer, "page=model&group=research", resume=await seq_of(personas.group)
    ) as ws:
        assert ids_in(await ws.receive_from(timeout=5)) == ["approvals-badge"]
        await get_channel_layer().group_send("llm.backend", {"type": "live.redraw"})
        assert ids_in(await ws.receive_from(timeout=5)) == ["model-backend", "model-usage"]

        await recorded(
            base_url=settings.CLAW_LLM_BASE_URL, result=ProbeResult(healthy=False, error="gone")
        )
        frames = ""
        while 'id="backend-banner" class="banner banner-down"' not in frames:
            frames += await ws.receive_from(timeout=5)
        assert "model-backend" in ids_in(frames)
