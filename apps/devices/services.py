import re
from datetime import timedelta

from django.contrib.auth.models import AbstractBaseUser
from django.core.cache import cache
from django.db import IntegrityError, connection, transaction
from django.db.models import Case, F, Q, Value, When
from django.utils import timezone

from apps.devices.models import (
    Agent,
    AgentStatus,
    Device,
    DeviceKind,
    PairingCode,
    ServerProcess,
    Toolkit,
)
from apps.events.broadcast import broadcast_on_commit, device_channel
from apps.events.services import event_append
from apps.groups.models import Group, Role
from apps.groups.selectors import require_role
from claw.errors import InvalidInput, InvalidTransition, Throttled, Unauthorized
from claw.tokens import new_pairing_code, new_token, normalize_pairing_code, token_hash

PAIRING_CODE_TTL = timedelta(minutes=10)
# Web processes heartbeat every second (apps.devices.servers); one unseen this long, while
# another was seen all along, has stopped (apps.tasks.failover).
SERVER_SILENCE = timedelta(seconds=4)
PAIRING_FAILURES_ALLOWED = 10  # per client address and window
PAIRING_FAILURE_WINDOW_S = 600
TOOLKIT_SLUG = re.compile(r"^[a-z0-9][a-z0-9_-]{0,49}$")


def pairing_code_create(*, actor: AbstractBaseUser, group: Group) -> tuple[PairingCode, str]:
    require_role(user=actor, group_id=group.id, role=Role.OWNER)
    raw = new_pairing_code()
    with transaction.atomic():
        pairing = PairingCode.objects.create(
            group=group,
            code_hash=token_hash(raw),
            created_by=actor,
            expires_at=timezone.now() + PAIRING_CODE_TTL,
        )
        event_append(
            group_id=group.id,
            kind="device.pairing_code_created",
            actor_id=actor.pk,
            payload={"expires_at": pairing.expires_at.isoformat()},
        )
    return pairing, raw


def _pairing_failures_key(client: str) -> str:
    return f"claw:pairing-failures:{client}"


def device_pair(
    *,
    code: str,
    name: str,
    kind: str = DeviceKind.OTHER,
    platform: str = "",
    client: str = "",
) -> tuple[Device, str]:
    """Exchange a one-time pairing code for a device and its token (shown once).

    Wrong, used or expired codes count against the client's address; after
    PAIRING_FAILURES_ALLOWED failures in the window every attempt is refused, so the
    32^8 code space cannot be guessed online.
    """
    failures_key = _pairing_failures_key(client)
    if cache.get(failures_key, 0) >= PAIRING_FAILURES_ALLOWED:
        raise Throttled(
            "Too many failed pairing attempts from here; wait ten minutes and try again."
        )
    try:
        return _device_pair(code=code, name=name, kind=kind, platform=platform)
    except Unauthorized:
        cache.add(failures_key, 0, timeout=PAIRING_FAILURE_WINDOW_S)
        try:
            cache.incr(failures_key)
        except ValueError:  # expired between add and incr
            cache.set(failures_key, 1, timeout=PAIRING_FAILURE_WINDOW_S)
        raise


def _device_pair(*, code: str, name: str, kind: str, platform: str) -> tuple[Device, str]:
    name = name.strip()
    if not name or len(name) > 100:
        raise InvalidInput("A device needs a name of 1 to 100 characters.")
    if kind not in DeviceKind.values:
        raise InvalidInput(f"kind must be one of {', '.join(DeviceKind.values)}.")
    code_hash = token_hash(normalize_pairing_code(code))
    now = timezone.now()
    raw_token = new_token("clawd")
    with transaction.atomic():
        claimed = PairingCode.objects.filter(
            code_hash=code_hash, used_at=None, expires_at__gt=now
        ).update(used_at=now)
        if claimed != 1:
            pairing = PairingCode.objects.filter(code_hash=code_hash).first()
            if pairing is None:
                raise Unauthorized("This pairing code is not valid.", code="invalid_code")
            if pairing.used_at is not None:
                raise Unauthorized("This pairing code was already used.", code="code_used")
            raise Unauthorized("This pairing code has expired.", code="code_expired")
        pairing = PairingCode.objects.get(code_hash=code_hash)
        device = Device.objects.create(
            group_id=pairing.group_id,
            name=name,
            kind=kind,
            platform=platform[:100],
            token_hash=token_hash(raw_token),
            token_prefix=raw_token[:12],
            paired_at=now,
        )
        PairingCode.objects.filter(id=pairing.id).update(device=device)
        event_append(
            group_id=pairing.group_id,
            kind="device.paired",
            payload={"device_id": device.id, "name": name, "kind": kind},
        )
    return device, raw_token


def device_authenticate(*, raw_token: str) -> Device | None:
    return Device.objects.filter(token_hash=token_hash(raw_token), revoked_at=None).first()


def device_revoke(*, actor: AbstractBaseUser, device: Device) -> Device:
    require_role(user=actor, group_id=device.group_id, role=Role.OWNER)
    now = timezone.now()
    with transaction.atomic():
        if Device.objects.filter(id=device.id, revoked_at=None).update(revoked_at=now) != 1:
            raise InvalidTransition("This device is already revoked.", code="already_revoked")
        Agent.objects.filter(device=device).update(status=AgentStatus.OFFLINE)
        event_append(
            group_id=device.group_id,
            kind="device.revoked",
            actor_id=actor.pk,
            payload={"device_id": device.id, "name": device.name},
        )
        broadcast_on_commit(device_channel(device.id), {"type": "device.revoked"})
    device.revoked_at = now
    return device


def device_set_draining(*, actor: AbstractBaseUser, device: Device, draining: bool) -> Device:
    require_role(user=actor, group_id=device.group_id, role=Role.OWNER)
    with transaction.atomic():
        if Device.objects.filter(id=device.id, revoked_at=None).update(draining=draining) != 1:
            raise InvalidTransition("A revoked device cannot be drained.", code="revoked")
        event_append(
            group_id=device.group_id,
            kind="device.draining" if draining else "device.undrained",
            actor_id=actor.pk,
            payload={"device_id": device.id},
        )
    device.draining = draining
    return device


def _validate_toolkits(toolkits: dict[str, str]) -> None:
    if len(toolkits) > 100:
        raise InvalidInput("An agent declares at most 100 toolkits.")
    for slug, version in toolkits.items():
        if not TOOLKIT_SLUG.match(slug):
            raise InvalidInput(f"Toolkit {slug!r} is not a valid slug (a-z, 0-9, - and _).")
        if not isinstance(version, str) or len(version) > 50:
            raise InvalidInput(f"Toolkit {slug!r} needs a version string of at most 50 chars.")


def agent_register(
    *,
    device: Device,
    name: str,
    toolkits: dict[str, str],
    capacity: int = 1,
    client_version: str = "",
    tool_schemas: dict[str, list] | None = None,
    connection: str = "",
    server_id: int | None = None,
) -> Agent:
    """Register an agent on a device, or update it when it says hello again, and match it
    to work once committed. A few statements in one transaction: after a server restart a
    swarm's agents all say hello at once. Refuses a device revoked meanwhile."""
    from apps.tasks.matching import request_matching_for_agent
    from apps.tasks.services import refresh_agent_load

    name = name.strip()
    if not name or len(name) > 100:
        raise InvalidInput("An agent needs a name of 1 to 100 characters.")
    if not 1 <= capacity <= 256:
        raise InvalidInput("capacity must be from 1 to 256.")
    _validate_toolkits(toolkits)
    now = timezone.now()
    with transaction.atomic():
        seen = Device.objects.filter(id=device.id, revoked_at=None).update(last_seen_at=now)
        if not seen:
            raise Unauthorized("This device was revoked.", code="revoked")
        _toolkits_ensure(list(toolkits))
        fields = {
            "group_id": device.group_id,
            "toolkits": toolkits,
            "capacity": capacity,
            "client_version": client_version[:50],
            "tool_schemas": tool_schemas or {},
            "connection": connection,
            "server_id": server_id,
            "disconnected_at": None,
            "status": AgentStatus.DRAINING if device.draining else AgentStatus.ONLINE,
            "last_heartbeat_at": now,
        }
        agent, created = _agent_upsert(device=device, name=name, fields=fields)
        refresh_agent_load(agent.id)
        event_append(
            group_id=device.group_id,
            kind="agent.registered" if created else "agent.online",
            agent_id=agent.id,
            payload={"name": name, "toolkits": toolkits, "capacity": capacity},
        )
        request_matching_for_agent(device.group_id, agent.id, whole_group=False)
    return agent


def _toolkits_ensure(slugs: list[str]) -> None:
    known = set(Toolkit.objects.filter(slug__in=slugs).values_list("slug", flat=True))
    missing = [Toolkit(slug=slug) for slug in slugs if slug not in known]
    if missing:
        Toolkit.objects.bulk_create(missing, ignore_conflicts=True)


def _agent_upsert(*, device: Device, name: str, fields: dict) -> tuple[Agent, bool]:
    existing = Agent.objects.filter(device_id=device.id, name=name).values_list("id", flat=True)
    agent_id = existing.first()
    if agent_id is None:
        try:
            with transaction.atomic():
                return Agent.objects.create(device=device, name=name, **fields), True
        except IntegrityError:  # the same new agent's other socket said hello first
            agent_id = existing.get()
    Agent.objects.filter(id=agent_id).update(**fields)
    return Agent(id=agent_id, device=device, name=name, **fields), False


def agent_heartbeat(*, agent_id: int, lease_timeout_s: int) -> int:
    """Keep the agent alive and extend the leases of its running attempts.

    An offer keeps its deadline: an agent whose assignment frame was lost keeps
    heartbeating without knowing of the offer, so extending it would hold the task (and
    the agent's capacity) forever. One statement on PostgreSQL (two updates in a CTE; two
    statements on SQLite) and no event (heartbeats are not history). Returns how many
    leases were extended.
    """
    from apps.tasks.models import Attempt, AttemptStatus

    now = timezone.now()
    lease = now + timedelta(seconds=lease_timeout_s)
    if connection.vendor == "postgresql":
        alive, extended = _heartbeat_in_one_statement(agent_id=agent_id, now=now, lease=lease)
    else:
        alive = (
            Agent.objects.filter(id=agent_id)
            .exclude(status=AgentStatus.OFFLINE)
            .update(last_heartbeat_at=now)
        )
        extended = Attempt.objects.filter(agent_id=agent_id, status=AttemptStatus.RUNNING).update(
            lease_expires_at=lease
        )
    if not alive:
        _agent_heartbeats_resumed(agent_id=agent_id, now=now)
    return extended


def _heartbeat_in_one_statement(*, agent_id: int, now, lease) -> tuple[int, int]:
    """Both of a heartbeat's updates in one round trip: (agents updated, leases extended)."""
    from apps.tasks.models import AttemptStatus

    with connection.cursor() as cursor:
        cursor.execute(
            """
            WITH alive AS (
                UPDATE devices_agent SET last_heartbeat_at = %s
                WHERE id = %s AND status <> %s RETURNING 1
            ), extended AS (
                UPDATE tasks_attempt SET lease_expires_at = %s
                WHERE agent_id = %s AND status = %s RETURNING 1
            )
            SELECT (SELECT count(*) FROM alive), (SELECT count(*) FROM extended)
            """,
            [now, agent_id, AgentStatus.OFFLINE, lease, agent_id, AttemptStatus.RUNNING],
        )
        return cursor.fetchone()


def _agent_heartbeats_resumed(*, agent_id: int, now) -> None:
    """A heartbeat from an agent the failover sweeper took offline for silence while its
    socket stayed open (a frozen process, a sleeping laptop): it is back and may get work
    again. Agents that went offline otherwise stay offline: a closed socket left no
    connection (it cannot heartbeat), a revoked device is refused, and a draining agent's
    connection was cleared when it went offline."""
    from apps.tasks.services import refresh_agent_load, request_matching

    with transaction.atomic():
        agent = (
            Agent.objects.select_related("device")
            .filter(id=agent_id, status=AgentStatus.OFFLINE, device__revoked_at=None)
            .exclude(connection="")
            .first()
        )
        if agent is None:
            Agent.objects.filter(id=agent_id).update(last_heartbeat_at=now)
            return
        status = AgentStatus.DRAINING if agent.device.draining else AgentStatus.ONLINE
        revived = Agent.objects.filter(id=agent_id, status=AgentStatus.OFFLINE).update(
            status=status, last_heartbeat_at=now, disconnected_at=None
        )
        if not revived:
            return
        refresh_agent_load(agent_id)
        event_append(
            group_id=agent.group_id,
            kind="agent.online",
            agent_id=agent_id,
            payload={"status": status, "reason": "heartbeats resumed"},
        )
        request_matching(agent.group_id)


def agent_connection_opened(
    *, device_id: int, info, connection: str, server_id: int | None = None
) -> Agent:
    """A device socket said hello: register or refresh the agent and make this socket its
    current connection, on web process `server_id` (apps.devices.servers).
    `info` is a claw.protocol.AgentInfo."""
    device = Device.objects.filter(id=device_id, revoked_at=None).first()
    if device is None:
        raise Unauthorized("This device was revoked.", code="revoked")
    return agent_register(
        device=device,
        name=info.name,
        toolkits=dict(info.toolkits),
        tool_schemas=dict(info.tool_schemas),
        capacity=info.capacity,
        client_version=info.client_version,
        connection=connection,
        server_id=server_id,
    )


def agent_connection_closed(*, agent_id: int, connection: str) -> bool:
    """The agent's current socket closed: it becomes suspect (the failover sweeper decides
    after the group's grace period). A socket that was already replaced changes nothing."""
    now = timezone.now()
    with transaction.atomic():
        agent = Agent.objects.filter(id=agent_id, connection=connection).first()
        if agent is None:
            return False
        updated = (
            Agent.objects.filter(id=agent_id, connection=connection)
            .exclude(status=AgentStatus.OFFLINE)
            .update(status=AgentStatus.SUSPECT, connection="", server=None, disconnected_at=now)
        )
        if updated:
            event_append(
                group_id=agent.group_id,
                kind="agent.disconnected",
                agent_id=agent_id,
                payload={"status": AgentStatus.SUSPECT},
            )
    return bool(updated)


def agent_server_lost(*, agent_id: int, connection: str, server_id: int, since) -> bool:
    """The web process holding the agent's socket stopped (it was last seen at `since`)
    without closing it: the agent is suspect as if its socket had closed then, so the
    group's grace counts from there. Its connection is kept: if the process was only slow
    and the socket still works, its heartbeats bring the agent back once the sweeper has
    taken it offline (agent_heartbeat). A reconnect, or a socket already replaced, wins."""
    with transaction.atomic():
        agent = Agent.objects.filter(id=agent_id).only("group_id").first()
        updated = (
            Agent.objects.filter(id=agent_id, connection=connection, server_id=server_id)
            .filter(status__in=[AgentStatus.ONLINE, AgentStatus.BUSY, AgentStatus.DRAINING])
            # Still unseen since the sweeper looked: a process that was only slow and has
            # heartbeated meanwhile keeps its agents.
            .filter(server__last_seen_at__lte=since)
            .update(status=AgentStatus.SUSPECT, disconnected_at=since)
        )
        if updated:
            event_append(
                group_id=agent.group_id,
                kind="agent.disconnected",
                agent_id=agent_id,
                payload={"status": AgentStatus.SUSPECT, "reason": "its web process stopped"},
            )
    return bool(updated)


def server_process_register(*, name: str) -> ServerProcess:
    """A web process announces itself (apps.devices.servers), before its first agent."""
    now = timezone.now()
    server, _ = ServerProcess.objects.update_or_create(
        name=name, defaults={"started_at": now, "last_seen_at": now, "seen_since": now}
    )
    return server


def server_process_heartbeat(*, server_id: int) -> bool:
    """The web process is alive; a heartbeat after a silence starts a new unbroken run.
    False: its row is gone; register again."""
    now = timezone.now()
    broken = Q(last_seen_at__lt=now - SERVER_SILENCE)
    return bool(
        ServerProcess.objects.filter(id=server_id).update(
            seen_since=Case(When(broken, then=Value(now)), default=F("seen_since")),
            last_seen_at=now,
        )
    )


def agent_drain_self(*, agent_id: int) -> None:
    """The agent itself says it is shutting down: no new work."""
    with transaction.atomic():
        agent = Agent.objects.get(id=agent_id)
        if (
            Agent.objects.filter(id=agent_id)
            .exclude(status=AgentStatus.DRAINING)
            .update(status=AgentStatus.DRAINING)
        ):
            event_append(group_id=agent.group_id, kind="agent.draining", agent_id=agent_id)


def agent_set_draining(*, actor: AbstractBaseUser, agent: Agent, draining: bool) -> Agent:
    require_role(user=actor, group_id=agent.group_id, role=Role.OWNER)
    new_status = AgentStatus.DRAINING if draining else AgentStatus.ONLINE
    with transaction.atomic():
        updated = Agent.objects.filter(id=agent.id).exclude(status=AgentStatus.OFFLINE)
        if updated.update(status=new_status) != 1:
            raise InvalidTransition("An offline agent cannot change drain state.", code="offline")
        event_append(
            group_id=agent.group_id,
            kind="agent.draining" if draining else "agent.online",
            agent_id=agent.id,
            actor_id=actor.pk,
        )
    agent.status = new_status
    return agent


def agent_record_outcome(*, agent_id: int, succeeded: bool, toolkits: list[str]) -> None:
    """Count a finished attempt in the agent's track record, overall and per toolkit."""
    field = "succeeded_count" if succeeded else "failed_count"
    if not toolkits:
        Agent.objects.filter(id=agent_id).update(**{field: F(field) + 1})
        return
    agent = Agent.objects.select_for_update().filter(id=agent_id).only("toolkit_stats").first()
    if agent is None:
        return
    stats = dict(agent.toolkit_stats)
    for slug in toolkits:
        succeeded_n, failed_n = stats.get(slug, [0, 0])
        stats[slug] = [succeeded_n + succeeded, failed_n + (not succeeded)]
    Agent.objects.filter(id=agent_id).update(**{field: F(field) + 1}, toolkit_stats=stats)
