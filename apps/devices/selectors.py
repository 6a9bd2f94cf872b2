from dataclasses import dataclass, field

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Count, QuerySet

from apps.devices.models import Agent, Device
from apps.devices.skills import skills_current
from apps.groups.models import Group, Role
from apps.groups.selectors import require_role
from claw import protocol
from claw.errors import NotFound


def devices_for_group(*, group: Group) -> QuerySet[Device]:
    return Device.objects.filter(group=group).order_by("name", "id")


def device_get_for_user(
    *, user: AbstractBaseUser | AnonymousUser, device_id: int, role: str = Role.VIEWER
) -> Device:
    """A device of one of the user's groups; outsiders learn nothing (not_found)."""
    device = Device.objects.filter(id=device_id).first()
    if device is None:
        raise NotFound("No such device, or you are not a member of its group.")
    require_role(user=user, group_id=device.group_id, role=role)
    return device


def agents_for_group(*, group: Group) -> QuerySet[Agent]:
    return Agent.objects.filter(group=group).order_by("name", "id")


def agent_get_for_user(
    *, user: AbstractBaseUser | AnonymousUser, agent_id: int, role: str = Role.VIEWER
) -> Agent:
    agent = Agent.objects.filter(id=agent_id).first()
    if agent is None:
        raise NotFound("No such agent, or you are not a member of its group.")
    require_role(user=user, group_id=agent.group_id, role=role)
    return agent


def assignment_frame(*, attempt_id: int) -> protocol.Assignment | None:
    """The assignment frame for a live attempt, read from committed state (None once the
    attempt has ended: an offer that lapsed or was cancelled is not delivered)."""
    from apps.tasks.models import LIVE_ATTEMPT_STATUSES, Attempt

    attempt = (
        Attempt.objects.select_related("task")
        .filter(id=attempt_id, status__in=LIVE_ATTEMPT_STATUSES)
        .first()
    )
    if attempt is None:
        return None
    return _assignment(attempt, _skills(attempt.task.group_id, [attempt.task]))


def _skills(group_id: int, tasks) -> dict[str, str]:
    """The group's current skills for these tasks' required toolkits (one query; none
    without required toolkits)."""
    slugs = sorted({slug for task in tasks for slug in task.required_toolkits})
    return skills_current(group_id=group_id, slugs=slugs)


def _assignment(attempt, skills: dict[str, str]) -> protocol.Assignment:
    task = attempt.task
    return protocol.Assignment(
        attempt_id=attempt.id,
        epoch=attempt.epoch,
        status=attempt.status,
        deadline=attempt.lease_expires_at.isoformat(),
        task=protocol.TaskSpec(
            id=task.id,
            title=task.title,
            instructions=task.instructions,
            steps=task.steps,
            required_toolkits=task.required_toolkits,
            parent_id=task.parent_id,
            root_id=task.root_id,
            feedback=task.feedback or None,
            skills={s: skills[s] for s in task.required_toolkits if s in skills},
        ),
    )


def welcome_frame(
    *, agent_id: int, re: str, version: int, limits: protocol.Limits
) -> protocol.Welcome:
    """What the agent needs after hello: its settings, the attempts it still owns and the
    checkpoint outcomes it has not seen yet."""
    from apps.tasks.models import LIVE_ATTEMPT_STATUSES, Attempt

    agent = Agent.objects.select_related("group").get(id=agent_id)
    owned = list(
        Attempt.objects.select_related("task")
        .filter(agent_id=agent_id, status__in=LIVE_ATTEMPT_STATUSES)
        .order_by("id")
    )
    skills = _skills(agent.group_id, [attempt.task for attempt in owned])
    return protocol.Welcome(
        re=re,
        version=version,
        agent_id=agent.id,
        device_id=agent.device_id,
        group=agent.group.slug,
        heartbeat_interval_s=agent.group.heartbeat_interval_s,
        lease_timeout_s=agent.group.lease_timeout_s,
        limits=limits,
        owned=[_assignment(a, skills) for a in owned],
        decisions=_unseen_decisions(agent_id),
    )


def _unseen_decisions(agent_id: int) -> list[protocol.Decision]:
    """Outcomes of the agent's checkpoints it has not confirmed (decision_received)."""
    from apps.checkpoints.models import Checkpoint, CheckpointStatus

    unseen = Checkpoint.objects.filter(attempt__agent_id=agent_id, delivered_at=None).exclude(
        status=CheckpointStatus.PENDING
    )
    return [
        protocol.Decision(
            checkpoint_id=c.id, attempt_id=c.attempt_id, status=c.status, note=_decision_note(c)
        )
        for c in unseen.order_by("id")
    ]


@dataclass
class MissedPushes:
    revoked: bool = False
    replaced: bool = False
    frames: list[protocol.Frame] = field(default_factory=list)


def missed_pushes(*, device_id: int, agent_id: int | None, connection: str) -> MissedPushes:
    """What a socket's pushes said, from committed state, for a socket that may have missed
    some (a channel-layer outage): whether its device was revoked or a newer socket took its
    agent over, else the agent's offers and unconfirmed decisions."""
    from apps.tasks.models import Attempt, AttemptStatus

    if Device.objects.filter(id=device_id).exclude(revoked_at=None).exists():
        return MissedPushes(revoked=True)
    if agent_id is None:
        return MissedPushes()
    agent = Agent.objects.filter(id=agent_id).values("group_id", "connection").first()
    if agent is None or agent["connection"] not in ("", connection):
        return MissedPushes(replaced=True)
    offered = list(
        Attempt.objects.select_related("task")
        .filter(agent_id=agent_id, status=AttemptStatus.OFFERED)
        .order_by("id")
    )
    skills = _skills(agent["group_id"], [attempt.task for attempt in offered])
    return MissedPushes(
        frames=[*(_assignment(a, skills) for a in offered), *_unseen_decisions(agent_id)]
    )


def _decision_note(checkpoint) -> str:
    last = checkpoint.decisions.order_by("-created_at").first()
    return last.note if last else ""


def agent_counts_by_status() -> dict[str, int]:
    """Agents of all groups by status (one GROUP BY; /metrics)."""
    rows = Agent.objects.order_by().values_list("status").annotate(n=Count("id"))
    return dict(rows)
