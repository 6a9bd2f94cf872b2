from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import connection
from django.db.models import Count, Prefetch, QuerySet

from apps.devices.models import Device
from apps.groups.models import Group, Role
from apps.groups.selectors import require_role
from apps.tasks.models import Artifact, Attempt, AttemptStatus, Task
from claw.errors import InvalidInput, NotFound, StaleAttempt


def tasks_for_group(
    *,
    group: Group,
    status: str | None = None,
    toolkit: str | None = None,
    agent_id: int | None = None,
    parent_id: int | None = None,
) -> QuerySet[Task]:
    """The group's tasks, newest first. `agent_id`: tasks that agent ever attempted."""
    tasks = Task.objects.filter(group=group)
    if status:
        tasks = tasks.filter(status=status)
    if toolkit:
        if connection.features.supports_json_field_contains:
            tasks = tasks.filter(required_toolkits__contains=[toolkit])
        else:  # SQLite: match the quoted slug in the stored JSON list
            tasks = tasks.filter(required_toolkits__icontains=f'"{toolkit}"')
    if agent_id is not None:
        tasks = tasks.filter(id__in=Attempt.objects.filter(agent_id=agent_id).values("task_id"))
    if parent_id is not None:
        tasks = tasks.filter(parent_id=parent_id)
    return tasks.order_by("-created_at", "-id")


def task_get_for_user(
    *,
    user: AbstractBaseUser | AnonymousUser,
    task_id: int,
    role: str = Role.VIEWER,
    detail: bool = False,
) -> Task:
    """A task of one of the user's groups. `detail` prefetches its attempts (with agent and
    device) and its dependency links."""
    tasks = Task.objects.all()
    if detail:
        tasks = tasks.prefetch_related(
            Prefetch(
                "attempts",
                queryset=Attempt.objects.select_related("agent", "device").order_by("epoch"),
            ),
            "dependency_links",
        )
    task = tasks.filter(id=task_id).first()
    if task is None:
        raise NotFound("No such task, or you are not a member of its group.")
    require_role(user=user, group_id=task.group_id, role=role)
    return task


def dependency_get(*, task: Task, depends_on_id: int) -> Task:
    """The task that `task` is to depend on; it must be in the same group."""
    depends_on = Task.objects.filter(id=depends_on_id, group_id=task.group_id).first()
    if depends_on is None:
        raise InvalidInput(
            f"Dependency {depends_on_id} is not in this group.", code="unknown_dependency"
        )
    return depends_on


def artifacts_for_task(*, task: Task) -> QuerySet[Artifact]:
    return Artifact.objects.filter(task=task).order_by("name", "version")


def artifact_get_for_user(
    *, user: AbstractBaseUser | AnonymousUser, artifact_id: int, role: str = Role.VIEWER
) -> Artifact:
    artifact = Artifact.objects.filter(id=artifact_id).first()
    if artifact is None:
        raise NotFound("No such artifact, or you are not a member of its group.")
    require_role(user=user, group_id=artifact.group_id, role=role)
    return artifact


def running_attempt_for_device(
    *, device: Device, task_id: int, attempt_id: int, epoch: int
) -> Attempt:
    """The device's running attempt on the task, if it still holds the task at `epoch`:
    not_found when the attempt is not this device's, stale_attempt when it moved on."""
    attempt = (
        Attempt.objects.select_related("task")
        .filter(id=attempt_id, task_id=task_id, device_id=device.id)
        .first()
    )
    if attempt is None:
        raise NotFound(f"Attempt {attempt_id} of task {task_id} is not this device's.")
    if (
        attempt.epoch != epoch
        or attempt.task.epoch != epoch
        or attempt.status != AttemptStatus.RUNNING
    ):
        raise StaleAttempt(
            f"Attempt {attempt_id} (epoch {epoch}) no longer holds task {task_id} "
            f"(attempt is {attempt.status}, task epoch {attempt.task.epoch}).",
            details={"task_epoch": attempt.task.epoch, "attempt_status": attempt.status},
        )
    return attempt


def task_counts_by_status() -> dict[str, int]:
    """Tasks of all groups by status (one GROUP BY; /metrics)."""
    rows = Task.objects.order_by().values_list("status").annotate(n=Count("id"))
    return dict(rows)
