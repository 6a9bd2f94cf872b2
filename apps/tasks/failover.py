"""Failure detection: what happens when an agent goes silent, read top to bottom.

Two sweepers run every second in the maintenance loop, on whichever process holds the
maintenance lease (claw.maintenance; beat's schedule runs them too, through the same lease).
Each is a few indexed queries when nothing is due, and each change it makes is a service
call (a compare-and-set), so running them twice, or in two processes by mistake, or killing
a worker halfway, changes nothing twice.

1. `agents_sweep_silent`: an agent whose socket closed (suspect) and did not come back
   within its group's reconnect grace goes offline and loses its attempts now, without
   waiting for their leases. An agent whose web process stopped (killed without closing
   its sockets) is suspect as if its socket had closed when the process was last seen.
   An agent that stopped heartbeating for a whole lease goes offline too, so it gets no
   new offers; if its socket was still open and it heartbeats again, it comes back online
   (`agent_heartbeat`).
2. `attempts_sweep_expired`: an attempt whose lease (or offer deadline) passed is lost.

A lost attempt fences its holder (its writes are stale from then on), sends the task back to
the pool with a backoff, and the matcher prefers another device for the retry.
"""

from datetime import timedelta

from django.db import transaction
from django.db.models import Exists, OuterRef
from django.utils import timezone

from apps.devices.models import Agent, AgentStatus, ServerProcess
from apps.devices.services import SERVER_SILENCE, agent_server_lost
from apps.events.services import event_append
from apps.tasks.models import LIVE_ATTEMPT_STATUSES, Attempt
from apps.tasks.services import attempt_lose

# The shortest heartbeat interval a group may set: agents heartbeating fine are never
# older than this, so the silent-agent query stays empty and cheap.
MIN_SILENCE = timedelta(seconds=1)


def _agent_offline(agent: Agent, *, reason: str, keep_connection: bool = False) -> bool:
    """keep_connection: the socket may still be open (the agent went quiet, it did not
    hang up), so heartbeats arriving on it later bring the agent back (agent_heartbeat)."""
    with transaction.atomic():
        updated = (
            Agent.objects.filter(id=agent.id, status=agent.status, connection=agent.connection)
            .exclude(status=AgentStatus.OFFLINE)
            .update(
                status=AgentStatus.OFFLINE,
                connection=agent.connection if keep_connection else "",
            )
        )
        if updated:
            event_append(
                group_id=agent.group_id,
                kind="agent.offline",
                agent_id=agent.id,
                payload={"status": AgentStatus.OFFLINE, "reason": reason},
            )
    return bool(updated)


def _lose_attempts_of(agent: Agent, *, reason: str) -> int:
    live = Attempt.objects.filter(agent=agent, status__in=LIVE_ATTEMPT_STATUSES)
    return sum(
        attempt_lose(attempt_id=attempt_id, reason=reason) is not None
        for attempt_id in live.values_list("id", flat=True)
    )


def _stopped(server: ServerProcess, witnesses: list[tuple]) -> bool:
    """A process is taken for stopped only on the word of another one seen without a gap
    for SERVER_SILENCE after it went quiet: the clock alone would take a database outage,
    which held every heartbeat back, for every process dying."""
    return any(
        last_seen - max(server.last_seen_at, seen_since) > SERVER_SILENCE
        for seen_since, last_seen in witnesses
    )


def _agents_of_stopped_servers(now) -> int:
    """Make the agents of web processes that stopped suspect; returns how many."""
    live = [AgentStatus.ONLINE, AgentStatus.BUSY, AgentStatus.DRAINING]
    quiet = ServerProcess.objects.filter(last_seen_at__lt=now - SERVER_SILENCE).filter(
        Exists(Agent.objects.filter(server=OuterRef("pk"), status__in=live))
    )
    quiet = list(quiet)
    if not quiet:
        return 0
    witnesses = list(
        ServerProcess.objects.filter(last_seen_at__gte=now - SERVER_SILENCE).values_list(
            "seen_since", "last_seen_at"
        )
    )
    stopped = [server for server in quiet if _stopped(server, witnesses)]
    orphans = Agent.objects.filter(server__in=stopped, status__in=live).values_list(
        "id", "connection", "server_id", "server__last_seen_at"
    )
    return sum(
        agent_server_lost(agent_id=agent_id, connection=conn, server_id=server_id, since=seen)
        for agent_id, conn, server_id, seen in (orphans if stopped else [])
    )


def agents_sweep_silent() -> int:
    """Take silent agents offline; returns how many attempts were reassigned."""
    now = timezone.now()
    lost = 0
    _agents_of_stopped_servers(now)
    suspects = Agent.objects.select_related("group").filter(status=AgentStatus.SUSPECT)
    for agent in suspects:
        grace = timedelta(seconds=agent.group.reconnect_grace_s)
        overdue = agent.disconnected_at is not None and agent.disconnected_at + grace <= now
        # The connection stays when there is one (a stopped web process's agent, whose
        # socket may yet be alive): heartbeats on it bring the agent back.
        if overdue and _agent_offline(
            agent, reason="did not reconnect within the grace period", keep_connection=True
        ):
            lost += _lose_attempts_of(agent, reason="agent disconnected")
    quiet = Agent.objects.select_related("group").filter(
        status__in=[AgentStatus.ONLINE, AgentStatus.BUSY, AgentStatus.DRAINING],
        last_heartbeat_at__lt=now - MIN_SILENCE,
    )
    for agent in quiet:
        if agent.last_heartbeat_at + timedelta(seconds=agent.group.lease_timeout_s) <= now:
            # A draining agent stays offline for good; others come back if they heartbeat.
            keep = agent.status != AgentStatus.DRAINING
            _agent_offline(agent, reason="no heartbeat for a whole lease", keep_connection=keep)
    return lost


def attempts_sweep_expired(*, limit: int = 500) -> int:
    """Declare attempts whose lease (or offer deadline) has passed lost; their tasks go
    back to the pool. One query on the live-lease partial index when nothing is due."""
    now = timezone.now()
    due = list(
        Attempt.objects.filter(status__in=LIVE_ATTEMPT_STATUSES, lease_expires_at__lt=now)
        .order_by("lease_expires_at")
        .values_list("id", "status")[:limit]
    )
    lost = 0
    for attempt_id, status in due:
        reason = "offer not accepted in time" if status == "offered" else "lease expired"
        if attempt_lose(attempt_id=attempt_id, reason=reason, lease_expired_before=now):
            lost += 1
    return lost
