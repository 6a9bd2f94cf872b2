"""GET /metrics: who may read it, that one scrape adds up every process, and that a real
flow (match, accept, fail, sweep, complete) moves the counters and the status gauges."""

import os
import subprocess
import sys
from datetime import timedelta

import pytest
import time_machine
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import connection
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from apps.devices.models import Agent
from apps.devices.services import device_pair, pairing_code_create
from apps.llm.meter import METER
from apps.llm.services import CallRecord
from apps.tasks.matching import tasks_match
from apps.tasks.models import Attempt, TaskStatus
from apps.tasks.services import attempt_accept, attempt_complete, attempt_fail, task_create
from apps.tasks.tasks import sweep_leases
from claw import metrics
from claw.asgi import application


def scrape(client, **headers) -> dict[tuple[str, frozenset], float]:
    response = client.get("/metrics", **headers)
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    return samples(response.content.decode())


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of the exposition, by (name, labels); it must parse as Prometheus text."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(scraped, name: str, **labels) -> float:
    return scraped.get((name, frozenset(labels.items())), 0.0)


# --- access ---------------------------------------------------------------------------------


def test_loopback_reads_metrics_when_no_token_is_set(client, db):
    assert client.get("/metrics").status_code == 200  # the test client is 127.0.0.1
    assert client.get("/metrics", REMOTE_ADDR="::1").status_code == 200


def test_other_addresses_get_not_found_when_no_token_is_set(client, db):
    assert client.get("/metrics", REMOTE_ADDR="10.0.0.7").status_code == 404
    assert client.get("/metrics", REMOTE_ADDR="203.0.113.9").status_code == 404


def test_a_request_relayed_by_a_proxy_on_this_host_is_not_loopback(client, db):
    assert client.get("/metrics", HTTP_X_FORWARDED_FOR="203.0.113.9").status_code == 404
    assert client.get("/metrics", HTTP_FORWARDED="for=203.0.113.9").status_code == 404


def test_with_a_token_set_only_its_bearer_reads_metrics(client, db, settings):
    settings.METRICS_TOKEN = "s3cret-scraper-token"
    assert client.get("/metrics").status_code == 404  # loopback is not enough any more
    wrong = client.get("/metrics", HTTP_AUTHORIZATION="Bearer guess")
    assert wrong.status_code == 404
    right = client.get(
        "/metrics", REMOTE_ADDR="10.0.0.7", HTTP_AUTHORIZATION="Bearer s3cret-scraper-token"
    )
    assert right.status_code == 200


# --- several processes ----------------------------------------------------------------------


def run_python(code: str, env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_one_scrape_adds_up_the_counters_of_every_process(client, db):
    assert os.environ["CLAW_METRICS_DIR"] == metrics.METRICS_DIR  # this run's own (settings)
    metrics.AGENT_FRAMES.labels(type="two-processes").inc(2)
    run_python(
        "from claw.metrics import AGENT_FRAMES; AGENT_FRAMES.labels(type='two-processes').inc(3)",
        env=dict(os.environ),
    )
    scraped = scrape(client)
    assert value(scraped, "claw_agent_frames_total", type="two-processes") == 5


def test_without_a_metrics_directory_a_process_reports_its_own_counters():
    env = {k: v for k, v in os.environ.items() if "MULTIPROC" not in k}
    env.pop("CLAW_METRICS_DIR")
    text = run_python(
        "from claw import metrics\n"
        "metrics.AGENT_FRAMES.labels(type='alone').inc()\n"
        "assert not metrics.METRICS_DIR\n"
        "print(metrics.exposition(with_database=False).decode())",
        env=env,
    )
    scraped = samples(text)
    assert value(scraped, "claw_agent_frames_total", type="alone") == 1
    assert any(name == "python_info" for name, _ in scraped)  # the default registry's


# --- a real flow ----------------------------------------------------------------------------


def live_attempt(task) -> Attempt:
    return Attempt.objects.get(task=task, status__in=["offered", "running"])


@pytest.mark.django_db(transaction=True)
def test_a_task_matched_failed_retried_and_completed_moves_the_metrics(client, personas):
    before = scrape(client)
    task = task_create(group=personas.group, actor=personas.member, title="build")
    tasks_match(group_id=personas.group.id)
    attempt = attempt_accept(
        attempt_id=live_attempt(task).id, agent=personas.agent, epoch=live_attempt(task).epoch
    )
    attempt_fail(
        attempt_id=attempt.id, agent=personas.agent, epoch=attempt.epoch, error="x", retryable=True
    )
    # The retry's backoff is 1 s: 5.5 s after the failure it has waited 4.5 s since then.
    with time_machine.travel(timezone.now() + timedelta(seconds=5.5)):
        tasks_match(group_id=personas.group.id)
        retry = live_attempt(task)
        attempt_accept(attempt_id=retry.id, agent=personas.agent, epoch=retry.epoch)
        attempt_complete(attempt_id=retry.id, agent=personas.agent, epoch=retry.epoch, result=1)
    after = scrape(client)

    def grew(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("claw_assignment_latency_seconds_count") == 2
    assert grew("claw_offer_accept_latency_seconds_count") == 2
    assert grew("claw_reassignments_total", kind="failed") == 1
    assert grew("claw_match_batch_duration_seconds_count") >= 2
    # A retry counts from the end of its backoff, not from the failure (5.5 s).
    assert grew("claw_assignment_latency_seconds_bucket", le="5.0") == 2
    assert value(after, "claw_tasks", status=TaskStatus.SUCCEEDED) == 1
    assert value(after, "claw_tasks", status=TaskStatus.READY) == 0  # zeros are reported
    assert value(after, "claw_agents", status="online") == 2  # personas: one per group


@pytest.mark.django_db(transaction=True)
def test_an_expired_lease_counts_a_sweep_and_a_lost_running_reassignment(client, personas):
    task = task_create(group=personas.group, actor=personas.member, title="build")
    tasks_match(group_id=personas.group.id)
    offered = live_attempt(task)
    attempt_accept(attempt_id=offered.id, agent=personas.agent, epoch=offered.epoch)
    before = scrape(client)
    later = timezone.now() + timedelta(seconds=personas.group.lease_timeout_s + 1)
    with time_machine.travel(later):
        Agent.objects.filter(id=personas.agent.id).update(last_heartbeat_at=later)  # not silent
        sweep_leases()
    after = scrape(client)
    lost, sweeps = "claw_reassignments_total", "claw_sweep_duration_seconds_count"
    assert value(after, lost, kind="lost_running") - value(before, lost, kind="lost_running") == 1
    assert value(after, sweeps) - value(before, sweeps) == 1
    assert value(after, "claw_tasks", status=TaskStatus.READY) == 1


def close_the_meters_connection() -> None:
    """The meter's thread keeps its connection, and a test database with a connection open
    cannot be dropped. Its next batch opens a new one (CONN_MAX_AGE=0 in tests)."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )


@pytest.mark.django_db(transaction=True)
def test_gateway_tokens_are_counted_by_kind(client, personas):
    before = scrape(client)
    METER.submit(
        CallRecord(
            group_id=personas.group.id,
            device_id=personas.agent.device_id,
            agent_id=personas.agent.id,
            model="kimi-k2.6",
            stream=False,
            status="ok",
            http_status=200,
            latency_ms=12,
            created_at=timezone.now(),
            prompt_tokens=120,
            completion_tokens=30,
        )
    )
    assert METER.flush()
    after = scrape(client)
    close_the_meters_connection()
    tokens = "claw_model_tokens_total"
    assert value(after, tokens, kind="prompt") - value(before, tokens, kind="prompt") == 120
    assert value(after, tokens, kind="completion") - value(before, tokens, kind="completion") == 30


@pytest.mark.django_db(transaction=True)
async def test_agent_frames_are_counted_by_type(personas):
    @database_sync_to_async
    def paired_token() -> str:
        _, code = pairing_code_create(actor=personas.owner, group=personas.group)
        return device_pair(code=code, name="laptop", kind="laptop")[1]

    frames = "claw_agent_frames_total"
    before = samples(metrics.exposition(with_database=False).decode())
    token = await paired_token()
    ws = WebsocketCommunicator(
        application, "/ws/agent/", headers=[(b"authorization", f"Bearer {token}".encode())]
    )
    assert (await ws.connect())[0]
    try:
        hello = {
            "type": "hello",
            "id": "h1",
            "versions": [1],
            "agent": {"name": "builder", "toolkits": {"shell": "1"}, "capacity": 1},
        }
        await ws.send_json_to(hello)
        assert (await ws.receive_json_from(timeout=5))["type"] == "welcome"
        for n in (1, 2):
            await ws.send_json_to({"type": "heartbeat", "id": f"b{n}"})
            assert (await ws.receive_json_from(timeout=5))["type"] == "ack"
    finally:
        await ws.disconnect()
    after = samples(metrics.exposition(with_database=False).decode())
    assert value(after, frames, type="hello") - value(before, frames, type="hello") == 1
    assert value(after, frames, type="heartbeat") - value(before, frames, type="heartbeat") == 2
