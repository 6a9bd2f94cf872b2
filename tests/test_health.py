"""/healthz: 200 when every component is ok, else 503 naming the failing ones."""

from datetime import timedelta

import pytest
from django.utils import timezone

from apps.events.models import ProcessBeat
from apps.events.services import process_beat_record

pytestmark = pytest.mark.django_db


def healthz(client):
    response = client.get("/healthz")
    return response.status_code, response.json()


def failing(body: dict) -> set[str]:
    return {name for name, component in body["components"].items() if not component["ok"]}


def tick(worker: str = "worker:celery@box") -> None:
    """What one run of the claw.beat_tick task records."""
    process_beat_record(name="beat")
    process_beat_record(name=worker)


def test_it_is_ok_when_beat_ticked_and_a_worker_ran_the_tick(client):
    tick()
    status, body = healthz(client)
    assert status == 200, body
    assert body["status"] == "ok"
    assert failing(body) == set()
    assert body["components"]["workers"]["seen"] == ["celery@box"]
    assert body["mode"] in {"embedded", "services"}


def test_it_is_degraded_naming_beat_and_workers_before_the_first_tick(client):
    status, body = healthz(client)
    assert status == 503
    assert body["status"] == "degraded"
    assert failing(body) == {"beat", "workers"}
    assert body["components"]["beat"]["error"] == "RuntimeError: beat has not ticked yet"
    assert "no worker" in body["components"]["workers"]["error"]
    assert body["components"]["database"]["ok"] is True


def test_it_is_degraded_naming_beat_when_the_last_tick_is_stale(client):
    tick()
    ProcessBeat.objects.filter(name="beat").update(
        last_seen_at=timezone.now() - timedelta(seconds=120)
    )
    status, body = healthz(client)
    assert status == 503
    assert failing(body) == {"beat"}
    assert "last tick was 120s ago" in body["components"]["beat"]["error"]


def test_it_is_degraded_naming_workers_when_none_ran_the_tick_recently(client):
    tick()
    ProcessBeat.objects.filter(name__startswith="worker:").update(
        last_seen_at=timezone.now() - timedelta(minutes=5)
    )
    status, body = healthz(client)
    assert status == 503
    assert failing(body) == {"workers"}


def test_the_tick_task_records_beat_and_the_worker_that_ran_it(client):
    from apps.events.tasks import beat_tick

    beat_tick.apply()
    names = set(ProcessBeat.objects.values_list("name", flat=True))
    assert "beat" in names
    assert any(name.startswith("worker:") for name in names)
    assert healthz(client)[0] == 200
