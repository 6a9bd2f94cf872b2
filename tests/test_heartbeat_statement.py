"""A heartbeat is one statement on PostgreSQL: the agent's last_seen and its running
attempts' leases in one CTE (SQLite, in embedded mode, takes two)."""

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apps.devices.models import Agent, AgentStatus
from apps.devices.services import agent_heartbeat
from apps.tasks.models import Attempt, AttemptStatus
from apps.tasks.services import attempt_accept, task_assign, task_create
from tests.conftest import make_agent


def running(personas, agent):
    task = task_create(group=personas.group, actor=personas.member, title="job")
    attempt = task_assign(task_id=task.id, agent_id=agent.id)
    return attempt_accept(attempt_id=attempt.id, agent=agent, epoch=attempt.epoch)


def test_a_heartbeat_extends_only_running_leases_in_one_statement(personas):
    busy = make_agent(personas.group, "busy", capacity=3)
    first, second = running(personas, busy), running(personas, busy)
    offer = task_assign(
        task_id=task_create(group=personas.group, actor=personas.member, title="o").id,
        agent_id=busy.id,
    )
    Agent.objects.filter(id=busy.id).update(last_heartbeat_at=timezone.now() - timedelta(hours=1))
    with CaptureQueriesContext(connection) as queries:
        assert agent_heartbeat(agent_id=busy.id, lease_timeout_s=600) == 2
    if connection.vendor == "postgresql":
        assert len(queries) == 1, [q["sql"] for q in queries]
    soon = timezone.now() + timedelta(seconds=500)
    leases = dict(Attempt.objects.values_list("id", "lease_expires_at"))
    assert leases[first.id] > soon and leases[second.id] > soon
    assert leases[offer.id] < soon  # an offer keeps its deadline
    seen = Agent.objects.get(id=busy.id).last_heartbeat_at
    assert seen > timezone.now() - timedelta(seconds=5)
    assert Attempt.objects.filter(status=AttemptStatus.RUNNING).count() == 2


@pytest.mark.parametrize("connected", [True, False])
def test_a_heartbeat_from_an_offline_agent_takes_the_revival_path(personas, connected):
    agent = personas.agent
    Agent.objects.filter(id=agent.id).update(
        status=AgentStatus.OFFLINE, connection="chan-1" if connected else ""
    )
    assert agent_heartbeat(agent_id=agent.id, lease_timeout_s=30) == 0
    expected = AgentStatus.ONLINE if connected else AgentStatus.OFFLINE
    assert Agent.objects.get(id=agent.id).status == expected
