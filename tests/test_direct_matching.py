"""An agent that frees capacity (complete, fail, decline) is matched at once, in the process
that recorded it, through the matcher's own claim; Celery matches the group only when the
change readied work for others, or when the direct match failed."""

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.utils import timezone

from apps.devices.models import Toolkit
from apps.tasks.models import Attempt, AttemptStatus, Task, TaskStatus
from apps.tasks.services import (
    attempt_accept,
    attempt_complete,
    attempt_decline,
    attempt_fail,
    task_assign,
    task_create,
    task_dependency_add,
)
from claw.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def requested(monkeypatch):
    """Groups whose matching went to Celery (nothing runs there in these tests)."""
    asked: list[int] = []
    monkeypatch.setattr("apps.tasks.tasks.match_group.delay", asked.append)
    monkeypatch.setattr("apps.tasks.tasks.match_group.apply_async", lambda *a, **k: None)
    return asked


def create(personas, title="job"):
    return task_create(group=personas.group, actor=personas.member, title=title)


def running(personas, task):
    attempt = task_assign(task_id=task.id, agent_id=personas.agent.id)
    return attempt_accept(attempt_id=attempt.id, agent=personas.agent, epoch=attempt.epoch)


def offered_to(agent, task) -> list[Attempt]:
    return list(Attempt.objects.filter(agent=agent, task=task, status=AttemptStatus.OFFERED))


def test_completing_offers_the_next_ready_task_without_celery(personas, requested):
    first = running(personas, create(personas, "first"))
    waiting = create(personas, "next")  # ready, but the agent (capacity 1) was full
    requested.clear()
    attempt_complete(attempt_id=first.id, agent=personas.agent, epoch=first.epoch, result=None)
    assert len(offered_to(personas.agent, waiting)) == 1
    assert requested == []


def test_completing_a_dependency_also_asks_celery_for_the_rest_of_the_group(personas, requested):
    first_task = create(personas, "first")
    dependent = create(personas, "dependent")
    task_dependency_add(actor=personas.member, task=dependent, depends_on=first_task)
    first = running(personas, first_task)
    requested.clear()
    attempt_complete(attempt_id=first.id, agent=personas.agent, epoch=first.epoch, result=None)
    assert len(offered_to(personas.agent, dependent)) == 1  # here and now
    assert requested == [personas.group.id]  # others may take more released work


def test_failing_and_declining_free_the_agent_at_once(personas, requested):
    failing = running(personas, create(personas, "failing"))
    spare = create(personas, "spare")
    attempt_fail(
        attempt_id=failing.id, agent=personas.agent, epoch=failing.epoch, error="x", retryable=False
    )
    [offer] = offered_to(personas.agent, spare)
    requested.clear()
    attempt_decline(attempt_id=offer.id, agent=personas.agent, epoch=offer.epoch, reason="busy")
    assert offered_to(personas.agent, spare) == []  # a declined task is not offered back
    assert requested == [personas.group.id]  # the declined task goes to someone else


def test_a_failing_direct_match_falls_back_to_celery(personas, requested, monkeypatch):
    first = running(personas, create(personas, "first"))
    waiting = create(personas, "next")

    def broken(**kwargs):
        raise RuntimeError("matcher down")

    monkeypatch.setattr("apps.tasks.matching.tasks_match", broken)
    requested.clear()
    attempt_complete(attempt_id=first.id, agent=personas.agent, epoch=first.epoch, result=None)
    assert offered_to(personas.agent, waiting) == []
    assert requested == [personas.group.id]


async def test_the_assignment_follows_the_complete_ack_on_the_same_socket(personas, requested):
    first = await database_sync_to_async(lambda: running(personas, create(personas, "first")))()
    waiting = await database_sync_to_async(create)(personas, "next")
    token = personas.agent.device.raw_token
    ws = WebsocketCommunicator(
        application, "/ws/agent/", headers=[(b"authorization", f"Bearer {token}".encode())]
    )
    assert (await ws.connect())[0]
    try:
        hello = {"type": "hello", "id": "h", "versions": [1]}
        hello["agent"] = {"name": "alpha", "toolkits": {"shell": "1"}, "capacity": 1}
        await ws.send_json_to(hello)
        assert (await ws.receive_json_from(timeout=5))["type"] == "welcome"
        complete = {"type": "complete", "id": "c", "attempt_id": first.id, "epoch": first.epoch}
        await ws.send_json_to(complete)
        frames = [await ws.receive_json_from(timeout=5) for _ in range(2)]
    finally:
        await ws.disconnect()
    by_type = {frame["type"]: frame for frame in frames}
    assert by_type["ack"]["result"] == {"status": "succeeded"}
    assert by_type["assignment"]["task"]["id"] == waiting.id


def test_a_freed_agent_gets_the_first_task_it_can_take(personas, requested):
    Toolkit.objects.get_or_create(slug="browser")
    first = running(personas, create(personas, "first"))
    needs_browser = task_create(
        group=personas.group,
        actor=personas.member,
        title="browse",
        required_toolkits=["browser"],
        priority=9,
    )
    declined = task_create(group=personas.group, actor=personas.member, title="no", priority=5)
    Attempt.objects.create(
        task=declined,
        agent=personas.agent,
        device=personas.agent.device,
        epoch=0,
        status=AttemptStatus.DECLINED,
        ended_at=timezone.now(),
    )
    fits = create(personas, "fits")
    attempt_complete(attempt_id=first.id, agent=personas.agent, epoch=first.epoch, result=None)
    assert len(offered_to(personas.agent, fits)) == 1
    assert offered_to(personas.agent, needs_browser) == offered_to(personas.agent, declined) == []
    assert Task.objects.get(id=needs_browser.id).status == TaskStatus.READY
