from datetime import timedelta

import time_machine
from django.utils import timezone

from apps.checkpoints.models import Checkpoint
from apps.devices.models import Agent, AgentStatus
from apps.devices.services import (
    agent_connection_closed,
    agent_connection_opened,
    agent_drain_self,
    agent_heartbeat,
    server_process_heartbeat,
    server_process_register,
)
from apps.events.models import Event
from apps.tasks.failover import SERVER_SILENCE, agents_sweep_silent, attempts_sweep_expired
from apps.tasks.matching import tasks_match
from apps.tasks.models import Attempt, Task, TaskStatus
from apps.tasks.services import (
    attempt_accept,
    attempt_complete,
    attempt_fail,
    attempt_lose,
    retry_backoff,
    task_assign,
    task_create,
)
from claw.protocol import AgentInfo
from tests.conftest import make_agent


def later(seconds: float):
    return time_machine.travel(timezone.now() + timedelta(seconds=seconds), tick=False)


def running(personas, task, agent=None):
    agent = agent or personas.agent
    attempt = task_assign(task_id=task.id, agent_id=agent.id)
    return attempt_accept(attempt_id=attempt.id, agent=agent, epoch=attempt.epoch)


def create(personas, **kwargs):
    return task_create(group=personas.group, actor=personas.member, title="job", **kwargs)


def connect(agent: Agent, connection: str = "chan-1") -> Agent:
    info = AgentInfo(name=agent.name, toolkits=agent.toolkits, capacity=agent.capacity)
    return agent_connection_opened(device_id=agent.device_id, info=info, connection=connection)


def test_backoff_doubles_and_is_capped():
    assert [retry_backoff(n).total_seconds() for n in (1, 2, 3, 4, 7, 20)] == [
        1,
        2,
        4,
        8,
        60,
        60,
    ]


def test_a_lost_task_waits_out_its_backoff_before_it_is_matched_again(personas):
    task = create(personas)
    attempt = running(personas, task)
    attempt_lose(attempt_id=attempt.id, reason="lease expired")
    task.refresh_from_db()
    assert task.status == TaskStatus.READY and task.not_before is not None
    assert tasks_match(group_id=personas.group.id) == []
    with later(1.5):
        assert len(tasks_match(group_id=personas.group.id)) == 1


def test_an_agent_that_does_not_reconnect_within_the_grace_loses_its_work(personas):
    agent = connect(personas.agent)
    task = create(personas)
    attempt = running(personas, task, agent)
    agent_connection_closed(agent_id=agent.id, connection="chan-1")
    with later(personas.group.reconnect_grace_s - 1):
        assert agents_sweep_silent() == 0  # still inside the grace period
    with later(personas.group.reconnect_grace_s + 1):
        assert agents_sweep_silent() == 1
        assert agents_sweep_silent() == 0  # idempotent
    attempt.refresh_from_db()
    assert (attempt.status, attempt.failure_reason) == ("lost", "agent disconnected")
    assert Agent.objects.get(id=agent.id).status == AgentStatus.OFFLINE
    assert Task.objects.get(id=task.id).status == TaskStatus.READY
    assert Event.objects.filter(kind="agent.offline", agent_id=agent.id).count() == 1


def test_an_agent_that_reconnects_inside_the_grace_keeps_its_work(personas):
    agent = connect(personas.agent)
    task = create(personas)
    attempt = running(personas, task, agent)
    agent_connection_closed(agent_id=agent.id, connection="chan-1")
    with later(5):
        agent = connect(agent, connection="chan-2")
    with later(personas.group.reconnect_grace_s + 1):
        agents_sweep_silent()
    attempt.refresh_from_db()
    assert attempt.status == "running"
    assert Agent.objects.get(id=agent.id).status == AgentStatus.BUSY


def test_a_replaced_socket_closing_late_does_not_make_the_agent_suspect(personas):
    agent = connect(personas.agent, connection="old")
    connect(agent, connection="new")
    assert agent_connection_closed(agent_id=agent.id, connection="old") is False
    assert Agent.objects.get(id=agent.id).status == AgentStatus.ONLINE


def test_an_agent_silent_for_a_whole_lease_goes_offline_and_gets_no_offers(personas):
    agent = connect(personas.agent)
    create(personas)
    with later(personas.group.lease_timeout_s - 5):
        agents_sweep_silent()
        assert Agent.objects.get(id=agent.id).status == AgentStatus.ONLINE
    with later(personas.group.lease_timeout_s + 1):
        agents_sweep_silent()
        assert Agent.objects.get(id=agent.id).status == AgentStatus.OFFLINE
        assert tasks_match(group_id=personas.group.id) == []


def test_a_silent_agent_whose_socket_stayed_open_comes_back_when_it_heartbeats(personas):
    agent = connect(personas.agent)
    with later(personas.group.lease_timeout_s + 1):
        agents_sweep_silent()
        assert Agent.objects.get(id=agent.id).status == AgentStatus.OFFLINE
        agent_heartbeat(agent_id=agent.id, lease_timeout_s=personas.group.lease_timeout_s)
    agent = Agent.objects.get(id=agent.id)
    assert (agent.status, agent.connection) == (AgentStatus.ONLINE, "chan-1")
    assert Event.objects.filter(kind="agent.online", agent_id=agent.id).last().payload == {
        "status": "online",
        "reason": "heartbeats resumed",
    }
    create(personas)
    assert len(tasks_match(group_id=personas.group.id)) == 1
    # Its socket closing later still makes it suspect.
    assert agent_connection_closed(agent_id=agent.id, connection="chan-1") is True


def test_agents_offline_for_other_reasons_stay_offline_when_a_heartbeat_arrives(personas):
    closed = connect(personas.agent)
    agent_connection_closed(agent_id=closed.id, connection="chan-1")
    draining = connect(make_agent(personas.group, "drainer"), connection="chan-2")
    agent_drain_self(agent_id=draining.id)
    with later(personas.group.lease_timeout_s + 1):
        agents_sweep_silent()
        for agent in (closed, draining):
            assert Agent.objects.get(id=agent.id).status == AgentStatus.OFFLINE
            agent_heartbeat(agent_id=agent.id, lease_timeout_s=30)
            assert Agent.objects.get(id=agent.id).status == AgentStatus.OFFLINE


def test_two_missed_heartbeats_do_not_reassign(personas):
    task = create(personas)
    attempt = running(personas, task)
    with later(2 * personas.group.heartbeat_interval_s + 1):
        assert agents_sweep_silent() == 0
        assert attempts_sweep_expired() == 0
    attempt.refresh_from_db()
    assert attempt.status == "running"


def test_running_out_of_attempts_fails_the_task_and_asks_humans(personas):
    task = create(personas, max_attempts=2)
    for _ in range(2):
        attempt = running(personas, task)
        attempt_fail(
            attempt_id=attempt.id,
            agent=personas.agent,
            epoch=attempt.epoch,
            error="network down",
            retryable=True,
        )
        Task.objects.filter(id=task.id).update(not_before=None)
    assert Task.objects.get(id=task.id).status == TaskStatus.FAILED
    checkpoint = Checkpoint.objects.get(task=task)
    assert (checkpoint.source, checkpoint.status) == ("system", "pending")
    assert checkpoint.options == ["retry", "reassign", "cancel"]
    assert "network down" in checkpoint.details


def test_a_permanent_failure_raises_no_checkpoint(personas):
    task = create(personas)
    attempt = running(personas, task)
    attempt_fail(attempt_id=attempt.id, agent=personas.agent, epoch=1, error="bad", retryable=False)
    assert not Checkpoint.objects.exists()


def test_the_track_record_per_toolkit_decides_between_agents(personas):
    shell_pro = make_agent(personas.group, "shell-pro", toolkits={"shell": "1", "python": "3"})
    # Better overall than personas.agent (a newcomer at 0.5), but poor with python.
    shell_pro.succeeded_count, shell_pro.failed_count = 30, 10
    shell_pro.toolkit_stats = {"shell": [30, 0], "python": [0, 10]}
    shell_pro.save()
    python_task = create(personas, required_toolkits=["python"])
    tasks_match(group_id=personas.group.id)
    assert Attempt.objects.get(task=python_task).agent_id == personas.agent.id


def test_finishing_an_attempt_counts_per_toolkit(personas):
    task = create(personas, required_toolkits=["shell"])
    attempt = running(personas, task)
    attempt_complete(attempt_id=attempt.id, agent=personas.agent, epoch=1, result=None)
    other = create(personas, required_toolkits=["shell", "python"])
    attempt = running(personas, other)
    attempt_fail(attempt_id=attempt.id, agent=personas.agent, epoch=1, error="x", retryable=False)
    agent = Agent.objects.get(id=personas.agent.id)
    assert agent.toolkit_stats == {"shell": [1, 1], "python": [0, 1]}
    assert (agent.succeeded_count, agent.failed_count) == (1, 1)


def test_offers_that_lapse_do_not_use_up_the_task(personas):
    """Under load offers can lapse with no agent failing: each one hands the task back, and
    the task is still there to run when an agent finally accepts (max_attempts is 2)."""
    task = create(personas, max_attempts=2)
    for lapse in range(1, 5):
        with later(lapse * 40):
            offered = tasks_match(group_id=personas.group.id)
            assert len(offered) == 1, f"offer {lapse} was not made"
        with later(lapse * 40 + 35):
            assert attempts_sweep_expired() == 1
        task.refresh_from_db()
        assert task.status == TaskStatus.READY, f"after lapse {lapse}"
    with later(200):
        [attempt_id] = tasks_match(group_id=personas.group.id)
        attempt = Attempt.objects.get(id=attempt_id)
        attempt_accept(attempt_id=attempt_id, agent=personas.agent, epoch=attempt.epoch)
        attempt_complete(attempt_id=attempt_id, agent=personas.agent, epoch=attempt.epoch, result=1)
    task.refresh_from_db()
    assert task.status == TaskStatus.SUCCEEDED
    assert Checkpoint.objects.filter(task=task).count() == 0  # no "out of attempts" alarm


def test_work_that_started_and_was_lost_still_counts_against_max_attempts(personas):
    task = create(personas, max_attempts=2)
    for lost in range(2):
        with later(lost * 120):
            attempt = running(personas, task)
            attempt_lose(attempt_id=attempt.id, reason="lease expired")
    task.refresh_from_db()
    assert task.status == TaskStatus.FAILED


def test_the_sweeper_spares_an_attempt_whose_lease_was_renewed_after_it_looked(personas):
    """The sweeper lists the due attempts, then ends them one by one; under load that
    takes seconds, and an agent that heartbeats (or accepts) meanwhile keeps its work."""
    agent = connect(personas.agent)
    task = create(personas)
    attempt = running(personas, task, agent)
    with later(personas.group.lease_timeout_s + 1):
        sweep_started = timezone.now()
        due = list(
            Attempt.objects.filter(lease_expires_at__lt=sweep_started).values_list("id", flat=True)
        )
        assert due == [attempt.id]
        agent_heartbeat(agent_id=agent.id, lease_timeout_s=personas.group.lease_timeout_s)
        lost = attempt_lose(
            attempt_id=attempt.id, reason="lease expired", lease_expired_before=sweep_started
        )
    assert lost is None
    attempt.refresh_from_db()
    assert attempt.status == "running"
    assert Task.objects.get(id=task.id).status == TaskStatus.RUNNING


def test_the_sweeper_spares_an_offer_accepted_after_it_looked(personas):
    task = create(personas)
    offer = task_assign(task_id=task.id, agent_id=personas.agent.id)
    with later(personas.group.lease_timeout_s + 1):
        sweep_started = timezone.now()
        attempt_accept(attempt_id=offer.id, agent=personas.agent, epoch=offer.epoch)
        assert (
            attempt_lose(
                attempt_id=offer.id,
                reason="offer not accepted in time",
                lease_expired_before=sweep_started,
            )
            is None
        )
    offer.refresh_from_db()
    assert offer.status == "running"


# --- a web process that stopped without closing its sockets --------------------------------


def on_server(agent: Agent, server, connection: str = "chan-1") -> Agent:
    info = AgentInfo(name=agent.name, toolkits=agent.toolkits, capacity=agent.capacity)
    return agent_connection_opened(
        device_id=agent.device_id, info=info, connection=connection, server_id=server.id
    )


def seen_every_second(server, first: int, last: int) -> None:
    """The web process heartbeats each second from `first` to `last` seconds from now."""
    for second in range(first, last + 1):
        with later(second):
            server_process_heartbeat(server_id=server.id)


def test_agents_of_a_web_process_that_stopped_lose_their_work_after_the_grace(personas):
    web_1 = server_process_register(name="web-1")
    web_2 = server_process_register(name="web-2")
    agent = on_server(personas.agent, web_1)
    task = create(personas)
    attempt = running(personas, task, agent)
    grace = personas.group.reconnect_grace_s
    # web-1 is killed now; web-2 keeps being seen.
    lost = 0
    for second in range(1, grace + 2):
        with later(second):
            server_process_heartbeat(server_id=web_2.id)
            lost += agents_sweep_silent()
            status = Agent.objects.get(id=agent.id).status
            if second < SERVER_SILENCE.total_seconds():
                assert status == AgentStatus.BUSY, second
            elif second < grace:
                assert (lost, status) == (0, AgentStatus.SUSPECT), second
    assert lost == 1
    attempt.refresh_from_db()
    assert (attempt.status, attempt.failure_reason) == ("lost", "agent disconnected")
    disconnected = Event.objects.get(kind="agent.disconnected", agent_id=agent.id)
    assert disconnected.payload == {"status": "suspect", "reason": "its web process stopped"}
    # The grace ran from the process's last sign of life, not from when it was noticed.
    assert Agent.objects.get(id=agent.id).disconnected_at == web_1.last_seen_at


def test_an_agent_that_reconnects_to_another_web_process_inside_the_grace_keeps_its_work(
    personas,
):
    web_1 = server_process_register(name="web-1")
    web_2 = server_process_register(name="web-2")
    agent = on_server(personas.agent, web_1)
    task = create(personas)
    attempt = running(personas, task, agent)
    seen_every_second(web_2, 1, int(SERVER_SILENCE.total_seconds()) + 1)
    with later(SERVER_SILENCE.total_seconds() + 1):
        agents_sweep_silent()
        assert Agent.objects.get(id=agent.id).status == AgentStatus.SUSPECT
        on_server(agent, web_2, connection="chan-2")  # the agent's backoff brought it back
    seen_every_second(web_2, 6, personas.group.reconnect_grace_s + 5)
    with later(personas.group.reconnect_grace_s + 5):
        assert agents_sweep_silent() == 0
    attempt.refresh_from_db()
    assert attempt.status == "running"
    agent = Agent.objects.get(id=agent.id)
    assert (agent.status, agent.server_id) == (AgentStatus.BUSY, web_2.id)


def test_a_restarted_web_process_gives_its_old_agents_the_grace_too(personas):
    old = server_process_register(name="web-1")
    agent = on_server(personas.agent, old)
    attempt = running(personas, create(personas), agent)
    with later(3):
        new = server_process_register(name="web-1-restarted")  # the only process, back
    seen_every_second(new, 4, int(SERVER_SILENCE.total_seconds()) + 4)
    with later(SERVER_SILENCE.total_seconds() + 4):
        agents_sweep_silent()
        assert Agent.objects.get(id=agent.id).status == AgentStatus.SUSPECT
        on_server(agent, new, connection="chan-2")
    seen_every_second(new, 9, personas.group.reconnect_grace_s + 5)
    with later(personas.group.reconnect_grace_s + 5):
        agents_sweep_silent()
    attempt.refresh_from_db()
    assert attempt.status == "running"


def test_when_every_web_process_went_unseen_at_once_none_is_declared_stopped(personas):
    """A database outage holds every heartbeat back; the sweep that runs first after it
    must not take that for every web process dying."""
    web_1 = server_process_register(name="web-1")
    web_2 = server_process_register(name="web-2")
    agents = [on_server(personas.agent, web_1), on_server(make_agent(personas.group, "b"), web_2)]
    with later(personas.group.lease_timeout_s - 5):
        assert agents_sweep_silent() == 0
        server_process_heartbeat(server_id=web_2.id)  # the first one back
        agents_sweep_silent()
    assert {Agent.objects.get(id=a.id).status for a in agents} == {AgentStatus.ONLINE}


def test_a_slow_web_process_whose_socket_still_works_comes_back_after_the_grace(personas):
    web_1 = server_process_register(name="web-1")
    web_2 = server_process_register(name="web-2")
    agent = on_server(personas.agent, web_1)
    attempt = running(personas, create(personas), agent)
    seen_every_second(web_2, 1, personas.group.reconnect_grace_s + 1)
    with later(personas.group.reconnect_grace_s + 1):
        assert agents_sweep_silent() == 1  # taken for dead: its work went elsewhere
        # ... but its socket was alive: its next heartbeat brings it back for new work.
        agent_heartbeat(agent_id=agent.id, lease_timeout_s=personas.group.lease_timeout_s)
    attempt.refresh_from_db()
    assert attempt.status == "lost"
    assert Agent.objects.get(id=agent.id).status == AgentStatus.ONLINE


def test_a_socket_closing_normally_leaves_no_web_process_on_the_agent(personas):
    web_1 = server_process_register(name="web-1")
    agent = on_server(personas.agent, web_1)
    assert agent.server_id == web_1.id
    agent_connection_closed(agent_id=agent.id, connection="chan-1")
    assert Agent.objects.get(id=agent.id).server_id is None


def test_a_web_process_seen_again_after_the_sweeper_looked_keeps_its_agents(personas):
    """The sweeper reads which processes went silent, then marks their agents one by one:
    a process that heartbeats in between (it was only slow) keeps its agents online."""
    from apps.devices.services import agent_server_lost

    web_1 = server_process_register(name="web-1")
    agent = on_server(personas.agent, web_1)
    silent_since = web_1.last_seen_at
    with later(SERVER_SILENCE.total_seconds() + 1):
        server_process_heartbeat(server_id=web_1.id)  # after the sweeper's read
        marked = agent_server_lost(
            agent_id=agent.id, connection="chan-1", server_id=web_1.id, since=silent_since
        )
    assert marked is False
    assert Agent.objects.get(id=agent.id).status == AgentStatus.ONLINE
