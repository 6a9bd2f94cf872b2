"""Task and attempt state changes. Every transition is a compare-and-set update; the
attempt's epoch is the fencing token, so a stale holder can never overwrite a newer one."""

import hashlib
import json
import uuid
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import IO, Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.files.storage import default_storage
from django.db import IntegrityError, connection, transaction
from django.db.models import Count, F, Max, Q
from django.utils import timezone
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from apps.devices.models import Agent, AgentStatus, Toolkit
from apps.devices.services import agent_record_outcome
from apps.events.broadcast import agent_channel, broadcast_many_on_commit, broadcast_on_commit
from apps.events.services import event_append, event_append_many, json_param
from apps.groups.models import CheckpointPolicy, DependencyFailurePolicy, Group, Role
from apps.groups.selectors import require_role
from apps.tasks.models import (
    LIVE_ATTEMPT_STATUSES,
    LIVE_TASK_STATUSES,
    TERMINAL_TASK_STATUSES,
    Artifact,
    ArtifactKind,
    Attempt,
    AttemptStatus,
    Task,
    TaskDependency,
    TaskStatus,
)
from claw import metrics
from claw.errors import DomainError, InvalidInput, InvalidTransition, NotFound, StaleAttempt

MAX_STEPS = 200
MAX_BACKOFF = timedelta(seconds=60)
MAX_DEPENDENCIES = 100
CHECKPOINT_POLICIES = frozenset(CheckpointPolicy.values)
DEPENDENCY_FAILURE_POLICIES = frozenset(DependencyFailurePolicy.values)


class Step(BaseModel):
    """One explicit tool call an agent can run without a model."""

    model_config = ConfigDict(extra="forbid")
    tool: str = Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.:-]+$")
    args: dict[str, Any] = Field(default_factory=dict)


def _validated_steps(steps: list | None) -> list[dict]:
    if not steps:
        return []
    if not isinstance(steps, list) or len(steps) > MAX_STEPS:
        raise InvalidInput(f"steps must be a list of at most {MAX_STEPS} tool calls.")
    try:
        return [Step.model_validate(step).model_dump() for step in steps]
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise InvalidInput(f"steps[{where}]: {first['msg']}", code="invalid_steps") from None


def _validated_toolkits(slugs: list[str] | None, *, known: set[str] | None = None) -> list[str]:
    """The slugs, sorted and unique, or unknown_toolkit. `known`: the registry's slugs when
    the caller already read them (a graph checks all its tasks against one read)."""
    slugs = sorted(set(slugs or []))
    if known is None:
        known = set(Toolkit.objects.filter(slug__in=slugs).values_list("slug", flat=True))
    unknown = [slug for slug in slugs if slug not in known]
    if unknown:
        raise InvalidInput(
            f"Unknown toolkit(s): {', '.join(unknown)}.",
            code="unknown_toolkit",
            details={"unknown": unknown},
        )
    return slugs


def _validated_task_fields(
    *,
    group: Group,
    title: str,
    priority: int,
    max_attempts: int | None,
    steps: list | None,
    checkpoint_policy: str | None,
    dependency_failure_policy: str | None,
) -> dict:
    """A new task's own fields, checked and with the group's defaults filled in, as Task
    keyword arguments. Shared by task_create and task_graph_create."""
    checkpoint_policy = checkpoint_policy or group.default_checkpoint_policy
    if checkpoint_policy not in CHECKPOINT_POLICIES:
        raise InvalidInput(
            f"checkpoint_policy must be one of {', '.join(CheckpointPolicy.values)}."
        )
    dependency_failure_policy = dependency_failure_policy or group.dependency_failure_policy
    if dependency_failure_policy not in DEPENDENCY_FAILURE_POLICIES:
        raise InvalidInput(
            f"dependency_failure_policy must be one of {', '.join(DependencyFailurePolicy.values)}."
        )
    title = (title or "").strip()
    if not title or len(title) > 200:
        raise InvalidInput("A task needs a title of 1 to 200 characters.")
    if not -100 <= priority <= 100:
        raise InvalidInput("priority must be from -100 to 100.")
    if max_attempts is not None and not 1 <= max_attempts <= 100:
        raise InvalidInput("max_attempts must be from 1 to 100.")
    return {
        "title": title,
        "priority": priority,
        "max_attempts": max_attempts or group.max_attempts,
        "steps": _validated_steps(steps),
        "checkpoint_policy": checkpoint_policy,
        "dependency_failure_policy": dependency_failure_policy,
    }


def _check_dependency_count(count: int) -> None:
    if count > MAX_DEPENDENCIES:
        raise InvalidInput(f"A task depends on at most {MAX_DEPENDENCIES} tasks.")


def _parent_roots(*, group_id: int, parent_ids: Iterable[int]) -> dict[int, int]:
    """The root of each parent task, by id; InvalidInput (details parent_id) for one that is
    not in the group."""
    parent_ids = sorted(set(parent_ids))
    if not parent_ids:
        return {}
    roots = dict(
        Task.objects.filter(id__in=parent_ids, group_id=group_id).values_list("id", "root_id")
    )
    for parent_id in parent_ids:
        if parent_id not in roots:
            raise InvalidInput(
                f"Parent task {parent_id} is not in this group.", details={"parent_id": parent_id}
            )
    return roots


def _lock_dependencies(*, group_id: int, dep_ids: Iterable[int]) -> dict[int, str]:
    """The status of each dependency a new task names, by id, the rows locked in id order;
    unknown_dependency (details missing) for those not in the group. Locked, like a
    dependent in _release_dependents: a dependency succeeding meanwhile could not see the
    uncommitted new task, and it would wait for ever."""
    dep_ids = sorted(set(dep_ids))
    if not dep_ids:
        return {}
    deps = dict(
        Task.objects.filter(id__in=dep_ids, group_id=group_id)
        .select_for_update(no_key=True)
        .order_by("id")
        .values_list("id", "status")
    )
    missing = [dep for dep in dep_ids if dep not in deps]
    if missing:
        raise InvalidInput(
            f"Dependencies not in this group: {', '.join(map(str, missing))}.",
            code="unknown_dependency",
            details={"missing": missing},
        )
    return deps


def _status_from_dependencies(statuses: Iterable[str]) -> str:
    statuses = list(statuses)
    if any(s in (TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.BLOCKED) for s in statuses):
        return TaskStatus.BLOCKED
    if all(s == TaskStatus.SUCCEEDED for s in statuses):
        return TaskStatus.READY
    return TaskStatus.WAITING


def _start_held(task: Task) -> bool:
    """Whether a task whose dependencies all succeeded must still wait for a human: its
    policy is before_start and nobody approved its start yet, or a before-start checkpoint
    on it is pending."""
    from apps.checkpoints.models import Checkpoint, CheckpointKind, CheckpointStatus

    if task.checkpoint_policy == CheckpointPolicy.BEFORE_START and task.start_approved_at is None:
        return True
    return Checkpoint.objects.filter(
        task_id=task.id, kind=CheckpointKind.BEFORE_START, status=CheckpointStatus.PENDING
    ).exists()


def _readiness(task: Task, statuses: Iterable[str]) -> str:
    """Ready = every dependency succeeded and the start is not held for approval."""
    status = _status_from_dependencies(statuses)
    if status == TaskStatus.READY and _start_held(task):
        return TaskStatus.WAITING
    return status


def _ask_to_start(task: Task) -> None:
    """Raise the before-start checkpoint of a task its policy holds, once (a pending one is
    not raised twice). Called after the task's own writes and events."""
    from apps.checkpoints.models import (
        Checkpoint,
        CheckpointKind,
        CheckpointSource,
        CheckpointStatus,
    )
    from apps.checkpoints.services import checkpoint_raise

    if task.checkpoint_policy != CheckpointPolicy.BEFORE_START or task.start_approved_at:
        return
    if Checkpoint.objects.filter(
        task_id=task.id, kind=CheckpointKind.BEFORE_START, status=CheckpointStatus.PENDING
    ).exists():
        return
    checkpoint_raise(
        group=task.group,
        task=task,
        source=CheckpointSource.POLICY,
        kind=CheckpointKind.BEFORE_START,
        title=f"Start task #{task.id}: {task.title}"[:200],
        details=task.instructions[:4000],
    )


def _require_writer(*, group_id: int, actor: AbstractBaseUser | None, agent: Agent | None) -> None:
    if agent is not None:
        if agent.group_id != group_id:
            raise NotFound("No such task in this agent's group.")
        return
    if actor is None:
        raise InvalidInput("A task change needs a human actor or an agent.")
    require_role(user=actor, group_id=group_id, role=Role.MEMBER)


def task_create(
    *,
    group: Group,
    title: str,
    actor: AbstractBaseUser | None = None,
    agent: Agent | None = None,
    instructions: str = "",
    steps: list | None = None,
    required_toolkits: list[str] | None = None,
    priority: int = 0,
    max_attempts: int | None = None,
    parent_id: int | None = None,
    depends_on: list[int] | None = None,
    checkpoint_policy: str | None = None,
    dependency_failure_policy: str | None = None,
) -> Task:
    """A new task. checkpoint_policy and dependency_failure_policy default to the group's.
    A whole graph at once: apps.tasks.graphs.task_graph_create."""
    _require_writer(group_id=group.id, actor=actor, agent=agent)
    fields = _validated_task_fields(
        group=group,
        title=title,
        priority=priority,
        max_attempts=max_attempts,
        steps=steps,
        checkpoint_policy=checkpoint_policy,
        dependency_failure_policy=dependency_failure_policy,
    )
    toolkits = _validated_toolkits(required_toolkits)
    dep_ids = sorted(set(depends_on or []))
    _check_dependency_count(len(dep_ids))

    with transaction.atomic():
        parent_ids = [] if parent_id is None else [parent_id]
        roots = _parent_roots(group_id=group.id, parent_ids=parent_ids)
        deps = _lock_dependencies(group_id=group.id, dep_ids=dep_ids)
        status = _status_from_dependencies(deps.values())
        held = (
            status == TaskStatus.READY
            and fields["checkpoint_policy"] == CheckpointPolicy.BEFORE_START
        )
        task = Task.objects.create(
            group=group,
            parent_id=parent_id,
            instructions=instructions,
            required_toolkits=toolkits,
            status=TaskStatus.WAITING if held else status,
            created_by_user=actor if agent is None else None,
            created_by_agent=agent,
            **fields,
        )
        task.root_id = roots[parent_id] if parent_id is not None else task.id
        Task.objects.filter(id=task.id).update(root_id=task.root_id)
        TaskDependency.objects.bulk_create(
            [TaskDependency(task=task, depends_on_id=dep) for dep in dep_ids]
        )
        event_append(
            group_id=group.id,
            kind="task.created",
            task_id=task.id,
            agent_id=agent.id if agent else None,
            actor_id=actor.pk if actor and not agent else None,
            payload={"title": task.title, "status": task.status, "depends_on": dep_ids},
        )
        if held:
            _ask_to_start(task)
        if task.status == TaskStatus.READY:
            request_matching(group.id)
    return task


def _would_cycle(*, task_id: int, depends_on_id: int, group_id: int) -> bool:
    """True when depends_on already (transitively) depends on task."""
    edges: dict[int, list[int]] = {}
    for src, dst in TaskDependency.objects.filter(task__group_id=group_id).values_list(
        "task_id", "depends_on_id"
    ):
        edges.setdefault(src, []).append(dst)
    seen, queue = set(), deque([depends_on_id])
    while queue:
        node = queue.popleft()
        if node == task_id:
            return True
        if node in seen:
            continue
        seen.add(node)
        queue.extend(edges.get(node, []))
    return False


def task_dependency_add(*, actor: AbstractBaseUser, task: Task, depends_on: Task) -> None:
    require_role(user=actor, group_id=task.group_id, role=Role.MEMBER)
    if depends_on.group_id != task.group_id:
        raise InvalidInput("Dependencies must be in the same group.")
    if task.id == depends_on.id or _would_cycle(
        task_id=task.id, depends_on_id=depends_on.id, group_id=task.group_id
    ):
        raise InvalidInput(
            f"Task {task.id} cannot depend on task {depends_on.id}: that would make a cycle.",
            code="dependency_cycle",
        )
    with transaction.atomic():
        current = Task.objects.select_for_update().get(id=task.id)
        if current.status not in (TaskStatus.WAITING, TaskStatus.READY, TaskStatus.BLOCKED):
            raise InvalidTransition(
                f"Dependencies can only be added before a task starts (it is {current.status})."
            )
        try:
            with transaction.atomic():
                TaskDependency.objects.create(task=current, depends_on=depends_on)
        except IntegrityError:
            raise InvalidTransition("That dependency already exists.", code="duplicate") from None
        statuses = list(
            current.dependencies.select_for_update(of=("self",), no_key=True)
            .order_by("id")
            .values_list("status", flat=True)
        )
        new_status = _readiness(current, statuses)
        Task.objects.filter(id=task.id, status=current.status).update(status=new_status)
        event_append(
            group_id=task.group_id,
            kind="task.dependency_added",
            task_id=task.id,
            actor_id=actor.pk,
            payload={"depends_on": depends_on.id, "status": new_status},
        )
        if _status_from_dependencies(statuses) == TaskStatus.READY:
            _ask_to_start(current)


def request_matching(group_id: int, *, after: timedelta | None = None) -> None:
    """Ask a worker to match the group's ready tasks once this transaction commits, or
    `after` that (when a retry's backoff ends; at most MAX_BACKOFF, well inside the Redis
    broker's visibility timeout). The periodic sweep catches anything a lost message
    misses."""
    from apps.tasks.tasks import match_group

    if after is None:
        transaction.on_commit(lambda: match_group.delay(group_id), robust=True)
    else:
        countdown = after.total_seconds() + 0.1  # never before the task's not_before
        transaction.on_commit(
            lambda: match_group.apply_async((group_id,), countdown=countdown), robust=True
        )


def _descendant_ids(task_id: int) -> list[int]:
    ids, frontier = [task_id], [task_id]
    while frontier:
        frontier = list(Task.objects.filter(parent_id__in=frontier).values_list("id", flat=True))
        ids.extend(frontier)
    return ids


# online <-> busy where the agent's live attempts say so: an online agent that is full, or
# a busy one that is not, flips. Raw SQL: built with the ORM (Case, Subquery) the statement
# took longer to compile than to run, on every attempt that starts or ends.
REFRESH_AGENT_LOAD = """
UPDATE devices_agent SET status = CASE WHEN status = %s THEN %s ELSE %s END
WHERE id = %s AND status IN (%s, %s)
  AND (status = %s) = (capacity <= (
      SELECT COUNT(*) FROM tasks_attempt WHERE agent_id = %s AND status IN (%s, %s)))
"""


def refresh_agent_load(agent_id: int) -> None:
    """online <-> busy from the number of live attempts; draining/offline stay as they are.
    One statement, which locks the agent's row only when its status changes."""
    online, busy = AgentStatus.ONLINE.value, AgentStatus.BUSY.value
    live = sorted(str(status) for status in LIVE_ATTEMPT_STATUSES)
    params = [online, busy, online, agent_id, online, busy, online, agent_id, *live]
    with connection.cursor() as cursor:
        cursor.execute(REFRESH_AGENT_LOAD, params)


@dataclass
class _Fallout:
    """What failed or cancelled tasks did to the tasks that depend on them."""

    blocked: list[tuple[int, int]] = field(default_factory=list)  # (task, its dependency)
    cancelled: list[tuple[int, str]] = field(default_factory=list)  # (task, why)
    freed_agents: bool = False  # cancelled attempts gave agents capacity back


def _propagate_block(task_ids: list[int]) -> _Fallout:
    """The not-yet-started dependents of these failed or cancelled tasks, transitively, by
    each dependent's dependency_failure_policy: `block` (blocked until the dependency is
    retried) or `cancel` (cancelled with its sub-tree, whose own dependents follow their
    policies in turn). A blocked task blocks its dependents whatever their policy: a block
    can still be lifted. Live work in a cancelled sub-tree is cancelled here (before the
    caller appends its events: events come last, after the agents are locked); the
    caller appends the fallout's events with _apply_fallout."""
    fallout = _Fallout()
    queue = deque((task_id, True) for task_id in task_ids)  # (task, failed or cancelled)
    while queue:
        dependency, final = queue.popleft()
        links = (
            TaskDependency.objects.filter(depends_on_id=dependency)
            .values_list("task_id", "task__dependency_failure_policy")
            .order_by("task_id")
        )
        for task_id, policy in links:
            if final and policy == DependencyFailurePolicy.CANCEL:
                for tid in _descendant_ids(task_id):
                    if (
                        Task.objects.filter(id=tid)
                        .exclude(status__in=TERMINAL_TASK_STATUSES)
                        .update(status=TaskStatus.CANCELLED)
                    ):
                        why = f"dependency #{dependency} did not succeed"
                        if tid != task_id:
                            why = f"its parent was cancelled ({why})"
                        fallout.cancelled.append((tid, why))
                        queue.append((tid, True))
            elif Task.objects.filter(
                id=task_id, status__in=[TaskStatus.WAITING, TaskStatus.READY]
            ).update(status=TaskStatus.BLOCKED):
                fallout.blocked.append((task_id, dependency))
                queue.append((task_id, False))
    cascaded = [task_id for task_id, _ in fallout.cancelled]
    if cascaded:
        fallout.freed_agents = bool(_cancel_live_work(cascaded))
    return fallout


def _cancel_live_work(task_ids: list[int]) -> list[dict]:
    """For tasks just cancelled: cancel their live attempts and pending checkpoints, update
    their agents' load, and tell the agents after commit. Returns the cancelled attempts."""
    from apps.checkpoints.services import checkpoints_cancel_for_tasks

    live = list(
        Attempt.objects.filter(task_id__in=task_ids, status__in=LIVE_ATTEMPT_STATUSES).values(
            "id", "agent_id", "epoch", "task_id"
        )
    )
    Attempt.objects.filter(id__in=[a["id"] for a in live]).update(
        status=AttemptStatus.CANCELLED, ended_at=timezone.now(), lease_expires_at=None
    )
    checkpoints_cancel_for_tasks(task_ids=task_ids)
    # Agents in id order, as the matcher locks them: two writers never wait on each other.
    for agent_id in sorted({attempt["agent_id"] for attempt in live}):
        refresh_agent_load(agent_id)
    for attempt in live:
        broadcast_on_commit(
            agent_channel(attempt["agent_id"]),
            {
                "type": "attempt.cancel",
                "attempt_id": attempt["id"],
                "epoch": attempt["epoch"],
                "task_id": attempt["task_id"],
            },
        )
    return live


def _apply_fallout(group_id: int, fallout: _Fallout) -> None:
    """The events of what _propagate_block did, and a match for the agents it freed."""
    for task_id, dependency in fallout.blocked:
        event_append(
            group_id=group_id,
            kind="task.blocked",
            task_id=task_id,
            payload={"status": TaskStatus.BLOCKED, "dependency": dependency},
        )
    for task_id, why in fallout.cancelled:
        event_append(
            group_id=group_id,
            kind="task.cancelled",
            task_id=task_id,
            payload={"status": TaskStatus.CANCELLED, "reason": why},
        )
    if fallout.freed_agents:
        request_matching(group_id)  # their agents have capacity again


def _release_dependents(task_id: int) -> tuple[list[int], list[Task]]:
    """After a task succeeded, its waiting dependents whose dependencies have now all
    succeeded: those that become ready (their ids), and the before_start ones that must
    first ask a human (the caller raises their checkpoints after its own events)."""
    released, to_ask = [], []
    # Locked first: when two dependencies of one task succeed at once, each transaction
    # would otherwise see the other still running and neither release it. The second now
    # waits here for the first to commit, then reads both as succeeded.
    dependents = (
        Task.objects.filter(dependency_links__depends_on_id=task_id, status=TaskStatus.WAITING)
        .select_related("group")
        .select_for_update(of=("self",), no_key=True)
        .order_by("id")
    )
    for dependent in dependents:
        statuses = dependent.dependencies.values_list("status", flat=True)
        if _status_from_dependencies(statuses) != TaskStatus.READY:
            continue
        if _start_held(dependent):
            if (
                dependent.checkpoint_policy == CheckpointPolicy.BEFORE_START
                and dependent.start_approved_at is None
            ):
                to_ask.append(dependent)
        elif Task.objects.filter(id=dependent.id, status=TaskStatus.WAITING).update(
            status=TaskStatus.READY
        ):
            released.append(dependent.id)
    return released, to_ask


def _append_status_events(group_id: int, task_ids: list[int], status: str, **payload) -> None:
    for task_id in task_ids:
        event_append(
            group_id=group_id,
            kind=f"task.{status}",
            task_id=task_id,
            payload={"status": status, **payload},
        )


def task_cancel(*, actor: AbstractBaseUser, task: Task, reason: str = "") -> list[int]:
    """Cancel a task and its whole sub-tree; agents holding them are told to stop.
    Returns the ids of the tasks that were cancelled."""
    require_role(user=actor, group_id=task.group_id, role=Role.MEMBER)
    return _task_cancel(task=task, reason=reason)


def _task_cancel(*, task: Task, reason: str) -> list[int]:
    with transaction.atomic():
        current = Task.objects.get(id=task.id)
        if current.status in TERMINAL_TASK_STATUSES:
            raise InvalidTransition(
                f"Task {task.id} is already {current.status}.", code="already_finished"
            )
        tree = _descendant_ids(task.id)
        cancelled = [
            tid
            for tid in tree
            if Task.objects.filter(id=tid)
            .exclude(status__in=TERMINAL_TASK_STATUSES)
            .update(status=TaskStatus.CANCELLED)
        ]
        # Tasks before agents, as the matcher locks them.
        fallout = _propagate_block(cancelled)
        live = _cancel_live_work(cancelled)
        _append_status_events(task.group_id, cancelled, TaskStatus.CANCELLED, reason=reason)
        _apply_fallout(task.group_id, fallout)
        if live:
            request_matching(task.group_id)  # their agents have capacity again
    return cancelled


def task_retry(*, actor: AbstractBaseUser, task: Task) -> Task:
    """Give a failed, cancelled or blocked task a fresh set of attempts."""
    require_role(user=actor, group_id=task.group_id, role=Role.MEMBER)
    retryable = (TaskStatus.FAILED, TaskStatus.CANCELLED, TaskStatus.BLOCKED)
    with transaction.atomic():
        current = Task.objects.get(id=task.id)
        if current.status not in retryable:
            raise InvalidTransition(
                f"Only failed, cancelled or blocked tasks can be retried (this one is "
                f"{current.status}).",
                code="not_retryable",
            )
        new_status = _readiness(current, current.dependencies.values_list("status", flat=True))
        if new_status == TaskStatus.BLOCKED:
            raise InvalidTransition(
                "A dependency of this task failed or was cancelled; retry that first.",
                code="dependency_blocked",
            )
        updated = Task.objects.filter(id=task.id, status=current.status).update(
            status=new_status, attempt_floor=current.epoch, result=None, not_before=None
        )
        if updated != 1:
            raise InvalidTransition("The task changed meanwhile; reload it.", code="conflict")
        unblocked = _unblock_dependents(task.id)
        event_append(
            group_id=task.group_id,
            kind="task.retried",
            task_id=task.id,
            actor_id=actor.pk,
            payload={"status": new_status, "from": current.status},
        )
        _append_status_events(task.group_id, unblocked, TaskStatus.WAITING)
        if new_status == TaskStatus.READY:
            request_matching(task.group_id)
        elif _status_from_dependencies(current.dependencies.values_list("status", flat=True)) == (
            TaskStatus.READY
        ):
            _ask_to_start(current)
    current.refresh_from_db()
    return current


def _unblock_dependents(task_id: int) -> list[int]:
    unblocked: list[int] = []
    frontier = [task_id]
    while frontier:
        next_frontier = []
        for dependent in Task.objects.filter(
            dependency_links__depends_on_id__in=frontier, status=TaskStatus.BLOCKED
        ).distinct():
            statuses = dependent.dependencies.values_list("status", flat=True)
            if _status_from_dependencies(statuses) != TaskStatus.BLOCKED and (
                Task.objects.filter(id=dependent.id, status=TaskStatus.BLOCKED).update(
                    status=TaskStatus.WAITING
                )
            ):
                next_frontier.append(dependent.id)
        unblocked.extend(next_frontier)
        frontier = next_frontier
    return unblocked


# --- attempts ----------------------------------------------------------------------------


def task_assign(*, task_id: int, agent_id: int, choice: dict | None = None) -> Attempt:
    """Offer a ready task to an agent: a new attempt with the next epoch.

    Lock order is task, then agent, then the group (events), as in every attempt service,
    so an assignment and a completion touching the same rows cannot deadlock.
    """
    now = timezone.now()
    with transaction.atomic():
        task = Task.objects.filter(id=task_id).first()
        if task is None:
            raise NotFound(f"No task {task_id}.")
        epoch = task.epoch + 1
        updated = Task.objects.filter(id=task_id, status=TaskStatus.READY, epoch=task.epoch).update(
            status=TaskStatus.ASSIGNED, epoch=epoch
        )
        if updated != 1:
            raise InvalidTransition(f"Task {task_id} is not ready.", code="not_ready")
        # Any error below rolls the claim back.
        agent = (
            Agent.objects.select_for_update()
            .select_related("device", "group")
            .filter(id=agent_id, group_id=task.group_id)
            .first()
        )
        if agent is None:
            raise NotFound(f"No agent {agent_id} in the task's group.")
        if agent.status not in (AgentStatus.ONLINE, AgentStatus.BUSY):
            raise InvalidTransition(
                f"Agent {agent.name} is {agent.status}.", code="agent_unavailable"
            )
        if agent.device.revoked_at or agent.device.draining:
            raise InvalidTransition(
                "The agent's device is revoked or draining.", code="agent_unavailable"
            )
        missing = [slug for slug in task.required_toolkits if slug not in agent.toolkits]
        if missing:
            raise InvalidTransition(
                f"Agent {agent.name} lacks toolkit(s) {', '.join(missing)}.", code="missing_toolkit"
            )
        live = Attempt.objects.filter(agent=agent, status__in=LIVE_ATTEMPT_STATUSES).count()
        if live >= agent.capacity:
            raise InvalidTransition(f"Agent {agent.name} is at capacity.", code="agent_at_capacity")
        attempt = Attempt.objects.create(
            task_id=task_id,
            agent=agent,
            device_id=agent.device_id,
            epoch=epoch,
            lease_expires_at=now + timedelta(seconds=agent.group.lease_timeout_s),
            choice=choice or {},
        )
        refresh_agent_load(agent.id)
        event_append(
            group_id=task.group_id,
            kind="task.assigned",
            task_id=task_id,
            attempt_id=attempt.id,
            agent_id=agent.id,
            payload={"epoch": epoch, "device_id": agent.device_id, "choice": choice or {}},
        )
        broadcast_on_commit(
            agent_channel(agent.id),
            {"type": "attempt.offered", "attempt_id": attempt.id, "epoch": epoch},
        )
    return attempt


def tasks_assign_many(
    *,
    group_id: int,
    offers: list[tuple[int, int, dict]],
    locked_tasks: dict[int, tuple[int, list[str]]] | None = None,
) -> list[Attempt]:
    """Offer several ready tasks of one group to agents in one transaction: task_assign for
    the matcher's batches, with the same rules in the same lock order.

    `offers` are (task_id, agent_id, choice), in the order the matcher ranked them. An offer
    that no longer fits is left out and the rest go ahead: a task another claimer holds is
    skipped rather than waited for (SKIP LOCKED), and an agent that went away or filled up
    meanwhile gets only what its capacity allows, counted under its row lock. Agents are
    locked in id order, so matchers never deadlock one another; the events come last and
    the pushes go after commit. Returns the attempts made.

    `locked_tasks` spares reading the tasks again when the caller's transaction already
    holds their rows locked as ready: (epoch, required toolkits) by task id.
    """
    if not offers:
        return []
    now = timezone.now()
    # No savepoint inside a caller's transaction (two round trips fewer per batch): a
    # DomainError below rolls the caller's transaction back too.
    with transaction.atomic(savepoint=False):
        tasks = locked_tasks
        if tasks is None:
            tasks = {
                task_id: (epoch, toolkits)
                for task_id, epoch, toolkits in Task.objects.select_for_update(
                    skip_locked=True, no_key=True
                )
                .filter(id__in=[o[0] for o in offers], group_id=group_id, status=TaskStatus.READY)
                .values_list("id", "epoch", "required_toolkits")
            }
        offers = [o for o in offers if o[0] in tasks]
        agents = {
            agent.id: agent
            for agent in Agent.objects.select_for_update(no_key=True, of=("self",))
            .select_related("device", "group")
            .filter(
                id__in={o[1] for o in offers},
                group_id=group_id,
                status__in=[AgentStatus.ONLINE, AgentStatus.BUSY],
                device__revoked_at=None,
                device__draining=False,
            )
            .order_by("id")
        }
        live = dict(
            Attempt.objects.filter(agent_id__in=list(agents), status__in=LIVE_ATTEMPT_STATUSES)
            .values("agent_id")
            .annotate(n=Count("id"))
            .values_list("agent_id", "n")
        )
        kept, kept_ids = [], set()
        for task_id, agent_id, choice in offers:
            agent = agents.get(agent_id)
            if agent is None or live.get(agent_id, 0) >= agent.capacity or task_id in kept_ids:
                continue
            if any(slug not in agent.toolkits for slug in tasks[task_id][1]):
                continue
            live[agent_id] = live.get(agent_id, 0) + 1
            kept.append((task_id, agent, choice))
            kept_ids.add(task_id)
        if not kept:
            return []
        # Compare-and-set, as in task_assign (the rows are ours: it cannot miss).
        claimed = Task.objects.filter(
            id__in=[task_id for task_id, _, _ in kept], status=TaskStatus.READY
        ).update(status=TaskStatus.ASSIGNED, epoch=F("epoch") + 1)
        if claimed != len(kept):
            raise InvalidTransition("Ready tasks changed under their locks.", code="not_ready")
        attempts = Attempt.objects.bulk_create(
            Attempt(
                task_id=task_id,
                agent=agent,
                device_id=agent.device_id,
                epoch=tasks[task_id][0] + 1,
                lease_expires_at=now + timedelta(seconds=agent.group.lease_timeout_s),
                choice=json_param(choice or {}),
            )
            for task_id, agent, choice in kept
        )
        for attempt, (_, _, choice) in zip(attempts, kept, strict=True):
            attempt.choice = choice or {}
        touched = {agent.id: agent for _, agent, _ in kept}
        full = [a for a in touched if live[a] >= touched[a].capacity]
        if full:
            Agent.objects.filter(id__in=full, status=AgentStatus.ONLINE).update(
                status=AgentStatus.BUSY
            )
        if len(full) < len(touched):
            Agent.objects.filter(
                id__in=[a for a in touched if a not in full], status=AgentStatus.BUSY
            ).update(status=AgentStatus.ONLINE)
        # The offers go out first (the agents wait for them), then the events.
        broadcast_many_on_commit(
            [
                (
                    agent_channel(attempt.agent_id),
                    {"type": "attempt.offered", "attempt_id": attempt.id, "epoch": attempt.epoch},
                )
                for attempt in attempts
            ]
        )
        event_append_many(
            group_id=group_id,
            events=[
                {
                    "kind": "task.assigned",
                    "task_id": attempt.task_id,
                    "attempt_id": attempt.id,
                    "agent_id": attempt.agent_id,
                    "payload": {
                        "epoch": attempt.epoch,
                        "device_id": attempt.device_id,
                        "choice": attempt.choice,
                    },
                }
                for attempt in attempts
            ],
        )
    return attempts


def _fenced_attempt(
    *, attempt_id: int, agent: Agent, epoch: int, statuses: Iterable[str]
) -> Attempt:
    attempt = Attempt.objects.select_related("task").filter(id=attempt_id).first()
    if attempt is None or attempt.agent_id != agent.id:
        raise NotFound(f"Attempt {attempt_id} is not this agent's.")
    if attempt.epoch != epoch or attempt.task.epoch != epoch or attempt.status not in statuses:
        raise StaleAttempt(
            f"Attempt {attempt_id} (epoch {epoch}) no longer holds task {attempt.task_id} "
            f"(attempt is {attempt.status}, task epoch {attempt.task.epoch}).",
            details={"task_epoch": attempt.task.epoch, "attempt_status": attempt.status},
        )
    return attempt


def _cas_attempt(attempt: Attempt, old_status: str, **changes) -> None:
    if Attempt.objects.filter(id=attempt.id, status=old_status).update(**changes) != 1:
        raise StaleAttempt(f"Attempt {attempt.id} changed meanwhile.")


def _cas_task(attempt: Attempt, old_status: str, **changes) -> None:
    updated = Task.objects.filter(
        id=attempt.task_id, status=old_status, epoch=attempt.epoch
    ).update(**changes)
    if updated != 1:
        raise StaleAttempt(f"Task {attempt.task_id} moved past epoch {attempt.epoch}.")


def attempt_accept(*, attempt_id: int, agent: Agent, epoch: int) -> Attempt:
    now = timezone.now()
    with transaction.atomic():
        attempt = _fenced_attempt(
            attempt_id=attempt_id, agent=agent, epoch=epoch, statuses=[AttemptStatus.OFFERED]
        )
        lease = now + timedelta(seconds=agent.group.lease_timeout_s)
        _cas_attempt(
            attempt,
            AttemptStatus.OFFERED,
            status=AttemptStatus.RUNNING,
            started_at=now,
            lease_expires_at=lease,
        )
        _cas_task(attempt, TaskStatus.ASSIGNED, status=TaskStatus.RUNNING)
        waited = (now - attempt.offered_at).total_seconds()
        transaction.on_commit(lambda: metrics.ACCEPT_SECONDS.observe(waited))
        event_append(
            group_id=attempt.task.group_id,
            kind="task.running",
            task_id=attempt.task_id,
            attempt_id=attempt.id,
            agent_id=agent.id,
            payload={"status": TaskStatus.RUNNING, "epoch": epoch},
        )
    attempt.refresh_from_db()
    return attempt


def attempt_decline(*, attempt_id: int, agent: Agent, epoch: int, reason: str) -> None:
    now = timezone.now()
    with transaction.atomic():
        attempt = _fenced_attempt(
            attempt_id=attempt_id, agent=agent, epoch=epoch, statuses=[AttemptStatus.OFFERED]
        )
        _cas_attempt(
            attempt,
            AttemptStatus.OFFERED,
            status=AttemptStatus.DECLINED,
            ended_at=now,
            failure_reason=reason[:1000],
            lease_expires_at=None,
        )
        _cas_task(attempt, TaskStatus.ASSIGNED, status=TaskStatus.READY)
        refresh_agent_load(agent.id)
        event_append(
            group_id=attempt.task.group_id,
            kind="task.declined",
            task_id=attempt.task_id,
            attempt_id=attempt.id,
            agent_id=agent.id,
            payload={"status": TaskStatus.READY, "reason": reason[:1000]},
        )
        from apps.tasks.matching import request_matching_for_agent

        request_matching_for_agent(attempt.task.group_id, agent.id, whole_group=True)


def attempt_complete(*, attempt_id: int, agent: Agent, epoch: int, result: Any) -> Attempt:
    now = timezone.now()
    with transaction.atomic():
        attempt = _fenced_attempt(
            attempt_id=attempt_id, agent=agent, epoch=epoch, statuses=[AttemptStatus.RUNNING]
        )
        _cas_attempt(
            attempt,
            AttemptStatus.RUNNING,
            status=AttemptStatus.SUCCEEDED,
            ended_at=now,
            result=result,
            lease_expires_at=None,
        )
        # review_result: the result waits for a human (task_result_accept) before it counts.
        review = attempt.task.checkpoint_policy == CheckpointPolicy.REVIEW_RESULT
        _cas_task(
            attempt,
            TaskStatus.RUNNING,
            status=TaskStatus.REVIEW if review else TaskStatus.SUCCEEDED,
            result=None if review else result,
        )
        agent_record_outcome(
            agent_id=agent.id, succeeded=True, toolkits=attempt.task.required_toolkits
        )
        refresh_agent_load(agent.id)
        released, to_ask = ([], []) if review else _release_dependents(attempt.task_id)
        group_id = attempt.task.group_id
        # The agent's freed capacity, and released dependents. Asked first, so that on
        # commit the matcher is on its way before the events are broadcast.
        from apps.tasks.matching import request_matching_for_agent

        request_matching_for_agent(group_id, agent.id, whole_group=bool(released))
        status = TaskStatus.REVIEW if review else TaskStatus.SUCCEEDED
        event_append(
            group_id=group_id,
            kind=f"task.{status}",
            task_id=attempt.task_id,
            attempt_id=attempt.id,
            agent_id=agent.id,
            payload={"status": status, "epoch": epoch},
        )
        _append_status_events(group_id, released, TaskStatus.READY)
        if review:
            _raise_review_checkpoint(task=attempt.task, attempt=attempt, result=result)
        for dependent in to_ask:
            _ask_to_start(dependent)
    attempt.status, attempt.ended_at, attempt.result = AttemptStatus.SUCCEEDED, now, result
    attempt.lease_expires_at = None
    return attempt


def _attempts_used(task: Task) -> int:
    """Attempts at the work since the last retry: failures, and losses of attempts that had
    started. An offer that lapsed or whose agent vanished before accepting never ran the
    work, so it does not use up the task (under load offers lapse with no agent failing)."""
    return (
        Attempt.objects.filter(task_id=task.id, epoch__gt=task.attempt_floor)
        .filter(
            Q(status=AttemptStatus.FAILED) | Q(status=AttemptStatus.LOST, started_at__isnull=False)
        )
        .count()
    )


def _end_attempt(
    *, attempt: Attempt, outcome: str, reason: str, retryable: bool, agent_id: int | None = None
) -> str:
    """Close a live attempt as failed or lost and decide what the task does next."""
    now = timezone.now()
    _cas_attempt(
        attempt,
        attempt.status,
        status=outcome,
        ended_at=now,
        failure_reason=reason[:2000],
        retryable=retryable,
        lease_expires_at=None,
    )
    task = Task.objects.get(id=attempt.task_id)
    started = attempt.started_at is not None
    used = _attempts_used(task)
    out_of_attempts = used >= task.max_attempts
    next_status = TaskStatus.FAILED if (not retryable or out_of_attempts) else TaskStatus.READY
    not_before = now + retry_backoff(used) if next_status == TaskStatus.READY else None
    if next_status == TaskStatus.READY:
        kind = "failed" if outcome == AttemptStatus.FAILED else f"lost_{attempt.status}"
        transaction.on_commit(metrics.REASSIGNMENTS.labels(kind=kind).inc)
    updated = Task.objects.filter(
        id=attempt.task_id, epoch=attempt.epoch, status__in=LIVE_TASK_STATUSES
    ).update(status=next_status, not_before=not_before)
    if updated != 1:
        raise StaleAttempt(f"Task {attempt.task_id} moved past epoch {attempt.epoch}.")
    if started or outcome == AttemptStatus.FAILED:
        agent_record_outcome(
            agent_id=attempt.agent_id, succeeded=False, toolkits=task.required_toolkits
        )
    refresh_agent_load(attempt.agent_id)
    failed = next_status == TaskStatus.FAILED
    fallout = _propagate_block([attempt.task_id]) if failed else _Fallout()
    event_append(
        group_id=task.group_id,
        kind=f"attempt.{outcome}",
        task_id=task.id,
        attempt_id=attempt.id,
        agent_id=agent_id,
        payload={"status": next_status, "reason": reason[:2000], "retryable": retryable},
    )
    _apply_fallout(task.group_id, fallout)
    if retryable and out_of_attempts:
        _raise_exhausted_checkpoint(task=task, attempts=used, reason=reason)
    from apps.tasks.matching import request_matching_for_agent

    request_matching_for_agent(task.group_id, attempt.agent_id, whole_group=False)
    if not_before is not None:
        request_matching(task.group_id, after=not_before - now)  # the task, when it may go
    return next_status


def retry_backoff(attempts_used: int) -> timedelta:
    """1 s, 2 s, 4 s … capped at MAX_BACKOFF: a flapping task does not hog the agents."""
    return min(timedelta(seconds=2 ** max(attempts_used - 1, 0)), MAX_BACKOFF)


def _raise_exhausted_checkpoint(*, task: Task, attempts: int, reason: str) -> None:
    from apps.checkpoints.models import CheckpointKind, CheckpointSource
    from apps.checkpoints.services import checkpoint_raise

    checkpoint_raise(
        group=task.group,
        task=task,
        source=CheckpointSource.SYSTEM,
        kind=CheckpointKind.MAX_ATTEMPTS,
        title=f"Task #{task.id} failed after {attempts} attempts",
        details=f"{task.title}\n\nLast failure: {reason[:1000]}",
        options=["retry", "reassign", "cancel"],
    )


def attempt_fail(*, attempt_id: int, agent: Agent, epoch: int, error: str, retryable: bool) -> str:
    """The agent reports a failure. Returns the task's new status (ready or failed)."""
    with transaction.atomic():
        attempt = _fenced_attempt(
            attempt_id=attempt_id, agent=agent, epoch=epoch, statuses=LIVE_ATTEMPT_STATUSES
        )
        return _end_attempt(
            attempt=attempt,
            outcome=AttemptStatus.FAILED,
            reason=error,
            retryable=retryable,
            agent_id=agent.id,
        )


def attempt_lose(
    *, attempt_id: int, reason: str, lease_expired_before: datetime | None = None
) -> str | None:
    """The system gives up on a live attempt (lease expired, agent gone). Idempotent:
    returns None when the attempt had already ended, or when another transaction holds it
    right now (another sweeper ending it, its agent finishing it or extending its lease):
    the next sweep looks again. So overlapping sweeps never fail or queue on each other.

    `lease_expired_before`: lose it only if its lease (or offer deadline) is still before
    this moment under the row lock. A sweeper's list of due attempts is stale by the time
    it gets to each one: the agent may have accepted or heartbeated meanwhile."""
    live = Attempt.objects.filter(id=attempt_id, status__in=LIVE_ATTEMPT_STATUSES)
    if lease_expired_before is not None:
        live = live.filter(lease_expires_at__lt=lease_expired_before)
    with transaction.atomic():
        attempt = live.select_for_update(no_key=True, skip_locked=True).first()
        if attempt is None:
            return None
        return _end_attempt(
            attempt=attempt,
            outcome=AttemptStatus.LOST,
            reason=reason,
            retryable=True,
            agent_id=attempt.agent_id,
        )


PROGRESS_KINDS = {"step", "tool_call", "log", "artifact"}


def attempt_progress(*, attempt_id: int, agent: Agent, epoch: int, kind: str, payload: dict) -> int:
    """Record a progress item from the running attempt; returns its event seq."""
    if kind not in PROGRESS_KINDS:
        raise InvalidInput(f"Progress kind must be one of {', '.join(sorted(PROGRESS_KINDS))}.")
    with transaction.atomic():
        attempt = _fenced_attempt(
            attempt_id=attempt_id, agent=agent, epoch=epoch, statuses=[AttemptStatus.RUNNING]
        )
        event = event_append(
            group_id=attempt.task.group_id,
            kind=f"progress.{kind}",
            task_id=attempt.task_id,
            attempt_id=attempt.id,
            agent_id=agent.id,
            payload=payload,
        )
    return event.seq


# --- checkpoint outcomes -----------------------------------------------------------------
# Called by apps.checkpoints.services inside the decision's (or expiry's) transaction, after
# it checked the decider's role and locked the task row: no role checks here.


def _raise_review_checkpoint(*, task: Task, attempt: Attempt, result: Any) -> None:
    from apps.checkpoints.models import CheckpointKind, CheckpointSource
    from apps.checkpoints.services import checkpoint_raise

    shown = json.dumps(result, ensure_ascii=False, default=str)
    checkpoint_raise(
        group=task.group,
        task=task,
        attempt=attempt,
        source=CheckpointSource.POLICY,
        kind=CheckpointKind.REVIEW,
        title=f"Review the result of task #{task.id}: {task.title}"[:200],
        details=f"Result of attempt {attempt.epoch}:\n{shown[:8000]}",
    )


def task_start_approve(*, task_id: int, actor_id: int | None = None) -> str:
    """A human approved the task's start: it becomes ready once its dependencies have all
    succeeded (and no other before-start checkpoint is pending). Returns its status."""
    now = timezone.now()
    with transaction.atomic():
        Task.objects.filter(id=task_id).update(start_approved_at=now)
        task = Task.objects.get(id=task_id)
        statuses = task.dependencies.values_list("status", flat=True)
        if task.status != TaskStatus.WAITING or _readiness(task, statuses) != TaskStatus.READY:
            return task.status
        if not Task.objects.filter(id=task_id, status=TaskStatus.WAITING).update(
            status=TaskStatus.READY
        ):
            raise InvalidTransition("The task changed meanwhile; reload it.", code="conflict")
        request_matching(task.group_id)
        event_append(
            group_id=task.group_id,
            kind="task.ready",
            task_id=task_id,
            actor_id=actor_id,
            payload={"status": TaskStatus.READY, "reason": "start approved"},
        )
    return TaskStatus.READY


def task_start_reject(*, task_id: int, reason: str) -> list[int]:
    """A human rejected the task's start (or the before-start checkpoint expired): the task
    is cancelled with its sub-tree; its dependents follow their policies."""
    task = Task.objects.get(id=task_id)
    if task.status in TERMINAL_TASK_STATUSES:
        return []
    return _task_cancel(task=task, reason=reason)


def _attempt_under_review(task_id: int) -> tuple[Task, Attempt]:
    task = Task.objects.get(id=task_id)
    attempt = Attempt.objects.filter(
        task_id=task_id, epoch=task.epoch, status=AttemptStatus.SUCCEEDED
    ).first()
    if task.status != TaskStatus.REVIEW or attempt is None:
        raise InvalidTransition(
            f"Task {task_id} has no result under review (it is {task.status}).",
            code="not_in_review",
        )
    return task, attempt


def task_result_accept(*, task_id: int, actor_id: int | None = None) -> Task:
    """The reviewed result is accepted: the task succeeds with it and its dependents are
    released, as if the attempt had just completed without a review."""
    with transaction.atomic():
        task, attempt = _attempt_under_review(task_id)
        updated = Task.objects.filter(
            id=task_id, status=TaskStatus.REVIEW, epoch=attempt.epoch
        ).update(status=TaskStatus.SUCCEEDED, result=attempt.result, feedback="")
        if updated != 1:
            raise InvalidTransition("The task changed meanwhile; reload it.", code="conflict")
        released, to_ask = _release_dependents(task_id)
        if released:
            request_matching(task.group_id)
        event_append(
            group_id=task.group_id,
            kind="task.succeeded",
            task_id=task_id,
            attempt_id=attempt.id,
            agent_id=attempt.agent_id,
            actor_id=actor_id,
            payload={"status": TaskStatus.SUCCEEDED, "epoch": attempt.epoch, "reviewed": True},
        )
        _append_status_events(task.group_id, released, TaskStatus.READY)
        for dependent in to_ask:
            _ask_to_start(dependent)
    task.refresh_from_db()
    return task


def _reject_reviewed_attempt(attempt: Attempt, reason: str) -> None:
    if not Attempt.objects.filter(id=attempt.id, status=AttemptStatus.SUCCEEDED).update(
        status=AttemptStatus.REJECTED, failure_reason=reason[:2000]
    ):
        raise InvalidTransition("The attempt changed meanwhile; reload it.", code="conflict")


def task_result_reject(*, task_id: int, note: str = "", actor_id: int | None = None) -> Task:
    """The reviewed result is rejected (or its review expired): the attempt becomes
    `rejected` and the task fails for good, whatever attempts it has left (a reviewer who
    wants another try asks for changes instead; a member may still retry it). Its
    dependents follow their dependency-failure policies."""
    with transaction.atomic():
        task, attempt = _attempt_under_review(task_id)
        reason = f"rejected at review: {note}" if note else "rejected at review"
        _reject_reviewed_attempt(attempt, reason)
        updated = Task.objects.filter(
            id=task_id, status=TaskStatus.REVIEW, epoch=attempt.epoch
        ).update(status=TaskStatus.FAILED)
        if updated != 1:
            raise InvalidTransition("The task changed meanwhile; reload it.", code="conflict")
        fallout = _propagate_block([task_id])
        event_append(
            group_id=task.group_id,
            kind="attempt.rejected",
            task_id=task_id,
            attempt_id=attempt.id,
            agent_id=attempt.agent_id,
            actor_id=actor_id,
            payload={"status": TaskStatus.FAILED, "reason": reason},
        )
        _apply_fallout(task.group_id, fallout)
    task.refresh_from_db()
    return task


def task_result_request_changes(
    *, task_id: int, note: str, actor_id: int | None = None
) -> Attempt | None:
    """The reviewer asks for changes: the attempt becomes `rejected` (not counted against
    max_attempts), the task goes back to ready with the note as its `feedback` (sent with
    the task in the next assignments), and is offered at once to the agent that made the
    result when it can take it; otherwise the matcher finds one. Returns that offer."""
    with transaction.atomic():
        task, attempt = _attempt_under_review(task_id)
        _reject_reviewed_attempt(attempt, f"changes requested: {note}" if note else "changes")
        updated = Task.objects.filter(
            id=task_id, status=TaskStatus.REVIEW, epoch=attempt.epoch
        ).update(status=TaskStatus.READY, feedback=note, not_before=None)
        if updated != 1:
            raise InvalidTransition("The task changed meanwhile; reload it.", code="conflict")
        event_append(
            group_id=task.group_id,
            kind="attempt.changes_requested",
            task_id=task_id,
            attempt_id=attempt.id,
            agent_id=attempt.agent_id,
            actor_id=actor_id,
            payload={"status": TaskStatus.READY, "note": note},
        )
        try:
            return task_assign(
                task_id=task_id,
                agent_id=attempt.agent_id,
                choice={"reason": "changes requested at review: the agent that made the result"},
            )
        except DomainError:  # that agent cannot take it now (its savepoint rolled back)
            request_matching(task.group_id)
            return None


# --- artifacts ---------------------------------------------------------------------------


def artifact_create(
    *,
    task: Task,
    name: str,
    upload: IO[bytes],
    content_type: str = "application/octet-stream",
    kind: str = ArtifactKind.FILE,
    actor: AbstractBaseUser | None = None,
    attempt: Attempt | None = None,
) -> Artifact:
    """Store a new version of a named artifact. The file is written before the short
    transaction that numbers it; a failed transaction removes the file again."""
    name = name.strip()
    if not name or len(name) > 200 or "/" in name or "\\" in name or name in {".", ".."}:
        raise InvalidInput("An artifact needs a file name of 1 to 200 characters, without slashes.")
    if not name.isprintable():
        # A NUL reached the file system (ValueError) and PostgreSQL (which refuses it in
        # text); other control characters would end up in Content-Disposition headers.
        raise InvalidInput("An artifact's file name may not contain control characters.")
    if kind not in ArtifactKind.values:
        raise InvalidInput(f"kind must be one of {', '.join(ArtifactKind.values)}.")
    if attempt is None:
        if actor is None:
            raise InvalidInput("An artifact needs a human actor or an attempt.")
        require_role(user=actor, group_id=task.group_id, role=Role.MEMBER)
    elif attempt.task_id != task.id or attempt.status != AttemptStatus.RUNNING:
        raise StaleAttempt("Only the running attempt of this task can add artifacts.")

    digest, size = hashlib.sha256(), 0
    for chunk in iter(lambda: upload.read(64 * 1024), b""):
        digest.update(chunk)
        size += len(chunk)
        if size > settings.CLAW_ARTIFACT_MAX_BYTES:
            raise InvalidInput(
                f"Artifacts are limited to {settings.CLAW_ARTIFACT_MAX_BYTES} bytes.",
                code="too_large",
            )
    upload.seek(0)
    path = default_storage.save(
        f"artifacts/{task.group_id}/{task.id}/{uuid.uuid4().hex}/{name}", upload
    )
    try:
        with transaction.atomic():
            locked = Task.objects.select_for_update().get(id=task.id)
            # Re-check the fence under the task's lock: the attempt may have been lost (and
            # the task re-offered) since the caller loaded it.
            if attempt is not None and (
                locked.epoch != attempt.epoch
                or not Attempt.objects.filter(id=attempt.id, status=AttemptStatus.RUNNING).exists()
            ):
                raise StaleAttempt(f"Attempt {attempt.id} no longer holds task {task.id}.")
            latest = Artifact.objects.filter(task=task, name=name).aggregate(v=Max("version"))["v"]
            artifact = Artifact.objects.create(
                group_id=task.group_id,
                task=task,
                attempt=attempt,
                name=name,
                version=(latest or 0) + 1,
                kind=kind,
                content_type=content_type[:100],
                size=size,
                sha256=digest.hexdigest(),
                file=path,
                created_by_user=actor,
                created_by_agent_id=attempt.agent_id if attempt else None,
            )
            event_append(
                group_id=task.group_id,
                kind="artifact.created",
                task_id=task.id,
                attempt_id=attempt.id if attempt else None,
                agent_id=attempt.agent_id if attempt else None,
                actor_id=actor.pk if actor else None,
                payload={
                    "artifact_id": artifact.id,
                    "name": name,
                    "version": artifact.version,
                    "size": size,
                    "kind": kind,
                },
            )
    except BaseException:
        default_storage.delete(path)
        raise
    return artifact
