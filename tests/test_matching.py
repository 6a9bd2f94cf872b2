from datetime import timedelta

import pytest
import time_machine
from django.utils import timezone

from apps.devices.models import Agent, AgentStatus
from apps.events.models import Event
from apps.tasks.failover import attempts_sweep_expired
from apps.tasks.matching import tasks_match
from apps.tasks.models import Attempt, Task, TaskStatus
from apps.tasks.services import (
    attempt_accept,
    attempt_decline,
    attempt_lose,
    task_assign,
    task_cancel,
    task_create,
    tasks_assign_many,
)
from tests.conftest import make_agent


def create(personas, title="t", **kwargs):
    return task_create(group=personas.group, actor=personas.member, title=title, **kwargs)


def offers(personas) -> dict[int, int]:
    """task id -> agent id of every live attempt in the group."""
    return dict(
        Attempt.objects.filter(
            task__group=personas.group, status__in=["offered", "running"]
        ).values_list("task_id", "agent_id")
    )


def test_it_assigns_ready_tasks_to_agents_that_cover_their_toolkits(personas):
    browser = make_agent(personas.group, "surfer", toolkits={"browser": "1"})
    web = create(personas, "browse", required_toolkits=["browser"])
    shell = create(personas, "script", required_toolkits=["shell"])
    tasks_match(group_id=personas.group.id)
    assert offers(personas) == {web.id: browser.id, shell.id: personas.agent.id}


def test_it_never_exceeds_an_agents_capacity(personas):
    for i in range(3):
        create(personas, f"t{i}")
    tasks_match(group_id=personas.group.id)
    assert list(offers(personas).values()) == [personas.agent.id]  # capacity 1
    assert Task.objects.filter(status=TaskStatus.READY).count() == 2


def test_higher_priority_then_older_tasks_go_first(personas):
    old = create(personas, "old")
    create(personas, "new")
    urgent = create(personas, "urgent", priority=10)
    tasks_match(group_id=personas.group.id)
    assert list(offers(personas)) == [urgent.id]
    task_cancel(actor=personas.member, task=urgent)
    tasks_match(group_id=personas.group.id)
    assert old.id in offers(personas)


def test_agents_with_a_better_track_record_are_preferred(personas):
    veteran = make_agent(personas.group, "veteran")
    veteran.succeeded_count = 20
    veteran.save()
    task = create(personas)
    tasks_match(group_id=personas.group.id)
    assert offers(personas) == {task.id: veteran.id}
    choice = Attempt.objects.get(task=task).choice
    assert choice["chosen"] == veteran.id
    assert [c["agent_id"] for c in choice["candidates"]] == [veteran.id, personas.agent.id]
    assert "track record" in choice["reason"]


def test_a_retry_prefers_another_device(personas):
    other = make_agent(personas.group, "elsewhere")
    personas.agent.succeeded_count = 50  # better record, but its device just lost the task
    personas.agent.save()
    task = create(personas)
    attempt = task_assign(task_id=task.id, agent_id=personas.agent.id)
    attempt_lose(attempt_id=attempt.id, reason="lease expired")
    with time_machine.travel(timezone.now() + timedelta(seconds=2)):  # past the backoff
        tasks_match(group_id=personas.group.id)
    assert offers(personas) == {task.id: other.id}
    assert "another device" in Attempt.objects.get(task=task, epoch=2).choice["reason"]


def test_the_failed_device_is_used_when_it_is_the_only_capable_one(personas):
    task = create(personas)
    attempt = task_assign(task_id=task.id, agent_id=personas.agent.id)
    attempt_lose(attempt_id=attempt.id, reason="lease expired")
    with time_machine.travel(timezone.now() + timedelta(seconds=2)):
        tasks_match(group_id=personas.group.id)
    assert offers(personas) == {task.id: personas.agent.id}


def test_an_agent_that_declined_is_left_out_for_a_while(personas):
    other = make_agent(personas.group, "other")
    other.failed_count = 10  # would normally lose to personas.agent
    other.save()
    task = create(personas)
    attempt = task_assign(task_id=task.id, agent_id=personas.agent.id)
    attempt_decline(attempt_id=attempt.id, agent=personas.agent, epoch=1, reason="busy")
    tasks_match(group_id=personas.group.id)
    assert offers(personas) == {task.id: other.id}


def test_draining_offline_and_foreign_agents_get_nothing(personas):
    personas.agent.status = AgentStatus.DRAINING
    personas.agent.save()
    gone = make_agent(personas.group, "gone")
    gone.status = AgentStatus.OFFLINE
    gone.save()
    create(personas)
    assert tasks_match(group_id=personas.group.id) == []
    assert tasks_match(group_id=personas.other_group.id) == []


def test_waiting_tasks_are_not_matched_until_their_dependencies_succeed(personas):
    first = create(personas, "first")
    create(personas, "second", depends_on=[first.id])
    tasks_match(group_id=personas.group.id)
    assert list(offers(personas)) == [first.id]


def test_the_sweeper_declares_expired_leases_lost_and_the_task_ready_again(personas):
    task = create(personas)
    attempt = task_assign(task_id=task.id, agent_id=personas.agent.id)
    attempt_accept(attempt_id=attempt.id, agent=personas.agent, epoch=1)
    assert attempts_sweep_expired() == 0
    with time_machine.travel(timezone.now() + timedelta(seconds=31)):
        assert attempts_sweep_expired() == 1
        assert attempts_sweep_expired() == 0
    attempt.refresh_from_db()
    assert (attempt.status, attempt.failure_reason) == ("lost", "lease expired")
    assert Task.objects.get(id=task.id).status == TaskStatus.READY


def test_an_offer_that_is_never_accepted_lapses(personas):
    task = create(personas)
    attempt = task_assign(task_id=task.id, agent_id=personas.agent.id)
    with time_machine.travel(timezone.now() + timedelta(seconds=31)):
        attempts_sweep_expired()
    attempt.refresh_from_db()
    assert (attempt.status, attempt.failure_reason) == ("lost", "offer not accepted in time")


@pytest.mark.django_db(transaction=True)
def test_matching_is_requested_after_commit_when_work_becomes_ready(personas, monkeypatch):
    requested = []
    monkeypatch.setattr("apps.tasks.tasks.match_group.delay", requested.append)
    task = create(personas)
    assert requested == [personas.group.id]
    attempt = task_assign(task_id=task.id, agent_id=personas.agent.id)
    attempt_decline(attempt_id=attempt.id, agent=personas.agent, epoch=1, reason="busy")
    assert requested == [personas.group.id] * 2


def test_one_match_claims_its_batch_in_one_transaction_and_announces_it_once(
    personas, broadcasts, django_capture_on_commit_callbacks
):
    make_agent(personas.group, "wide", capacity=5)
    tasks = [create(personas, f"t{i}") for i in range(4)]
    before = Event.objects.filter(group=personas.group).count()
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        attempt_ids = tasks_match(group_id=personas.group.id)
    assert len(callbacks) == 2  # the offers, then the events: one hop each
    attempts = Attempt.objects.filter(id__in=attempt_ids).order_by("id")
    assert [a.task_id for a in attempts] == [t.id for t in tasks]
    assert all(a.choice["chosen"] == a.agent_id for a in attempts)
    events = list(Event.objects.filter(group=personas.group).order_by("seq"))[before:]
    assert [(e.kind, e.attempt_id) for e in events] == [("task.assigned", a.id) for a in attempts]
    assert [e.payload["choice"] for e in events] == [a.choice for a in attempts]
    assert [e.seq for e in events] == list(range(before + 1, before + 5))
    assert broadcasts == [
        *[
            (f"agent.{a.agent_id}", {"type": "attempt.offered", "attempt_id": a.id, "epoch": 1})
            for a in attempts
        ],
        (
            f"group.{personas.group.id}",
            {
                "type": "events.appended",
                "group_id": personas.group.id,
                "first_seq": before + 1,
                "last_seq": before + 4,
            },
        ),
    ]


def test_a_batch_gives_an_agent_only_what_its_capacity_allows_under_its_lock(personas):
    tasks = [create(personas, f"t{i}") for i in range(3)]
    planned = [(t.id, personas.agent.id, {}) for t in tasks]  # capacity 1, offered 3
    attempts = tasks_assign_many(group_id=personas.group.id, offers=planned)
    assert [a.task_id for a in attempts] == [tasks[0].id]
    assert Agent.objects.get(id=personas.agent.id).status == AgentStatus.BUSY
    assert tasks_assign_many(group_id=personas.group.id, offers=planned[1:]) == []
    assert Task.objects.filter(status=TaskStatus.READY).count() == 2  # left as they were
    assert set(Task.objects.filter(status=TaskStatus.READY).values_list("epoch", flat=True)) == {0}


def test_a_batch_skips_tasks_that_are_no_longer_ready_and_agents_that_left(personas):
    spare = make_agent(personas.group, "spare", capacity=3)
    taken, free, other = (create(personas, f"t{i}") for i in range(3))
    task_assign(task_id=taken.id, agent_id=personas.agent.id)
    spare.status = AgentStatus.OFFLINE
    spare.save()
    attempts = tasks_assign_many(
        group_id=personas.group.id,
        offers=[(taken.id, spare.id, {}), (free.id, spare.id, {}), (other.id, spare.id, {})],
    )
    assert attempts == []
    assert Attempt.objects.filter(task=taken).count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_lost_task_is_matched_again_when_its_backoff_ends(personas, monkeypatch):
    later = []
    monkeypatch.setattr("apps.tasks.tasks.match_group.delay", lambda group_id: None)
    monkeypatch.setattr(
        "apps.tasks.tasks.match_group.apply_async",
        lambda args, countdown: later.append((args, countdown)),
    )
    task = create(personas)
    attempt = task_assign(task_id=task.id, agent_id=personas.agent.id)
    attempt_lose(attempt_id=attempt.id, reason="agent disconnected")
    assert later == [((personas.group.id,), pytest.approx(1.1))]  # retry_backoff(1) + margin


@pytest.mark.parametrize("only_this_agent", [False, True], ids=["group", "agent"])
def test_a_busy_decline_keeps_the_task_away_for_seconds_other_declines_for_a_minute(
    personas, only_this_agent
):
    """An agent whose count of free slots lagged the server's says "busy": the only agent
    that can run the task gets it again in seconds, not after a minute."""

    def match():
        agent_id = personas.agent.id if only_this_agent else None
        return tasks_match(group_id=personas.group.id, agent_id=agent_id)

    busy, unable = create(personas, "busy"), create(personas, "unable")
    for task, reason in ((busy, "busy: the agent is at capacity (1)"), (unable, "missing_tool")):
        attempt = task_assign(task_id=task.id, agent_id=personas.agent.id)
        attempt_decline(
            attempt_id=attempt.id, agent=personas.agent, epoch=attempt.epoch, reason=reason
        )
    with time_machine.travel(timezone.now() + timedelta(seconds=3), tick=False):
        assert len(match()) == 1
        assert offers(personas) == {busy.id: personas.agent.id}
        task_cancel(actor=personas.member, task=busy)
        assert match() == []  # "unable" is still left out
    with time_machine.travel(timezone.now() + timedelta(seconds=61), tick=False):
        assert len(match()) == 1
        assert offers(personas) == {unable.id: personas.agent.id}
