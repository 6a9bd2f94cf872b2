"""Tasks (create, list, cancel, retry, dependencies) and their artifacts."""

from datetime import datetime
from typing import Annotated, Any

from django.http import HttpRequest
from django.urls import reverse
from ninja import Field, File, Form, Query, Router, Schema, Status, UploadedFile
from ninja.errors import AuthenticationError
from pydantic import StringConstraints

from apps.devices.models import Device
from apps.groups.api import InSchema
from apps.groups.models import CheckpointPolicy, DependencyFailurePolicy
from apps.groups.selectors import group_get_for_user
from apps.tasks.downloads import artifact_file_response
from apps.tasks.models import ArtifactKind, AttemptStatus, TaskStatus
from apps.tasks.planner import plan_request
from apps.tasks.selectors import (
    artifact_get_for_user,
    artifacts_for_task,
    dependency_get,
    running_attempt_for_device,
    task_get_for_user,
    tasks_for_group,
)
from apps.tasks.services import (
    MAX_DEPENDENCIES,
    MAX_STEPS,
    Step,
    artifact_create,
    task_cancel,
    task_create,
    task_dependency_add,
    task_retry,
)
from claw.errors import InvalidInput
from claw.schema import Id, NonNegative

router = Router()
# POST /tasks/{id}/artifacts also takes a device token (clawd_…), so its path is mounted
# with device-or-human auth in claw/api.py; every other artifact route is humans only.
artifact_upload_router = Router()
artifacts_router = Router()

ToolkitSlug = Annotated[
    str, StringConstraints(min_length=1, max_length=50, pattern=r"^[a-z0-9][a-z0-9_-]*$")
]


# --- tasks -------------------------------------------------------------------------------


class TaskCreateIn(InSchema):
    title: str = Field(min_length=1, max_length=200)
    instructions: str = Field("", max_length=100_000)
    steps: list[Step] = Field(default_factory=list, max_length=MAX_STEPS)
    required_toolkits: list[ToolkitSlug] = Field(default_factory=list, max_length=50)
    priority: int = Field(0, ge=-100, le=100)
    max_attempts: int | None = Field(None, ge=1, le=100)
    parent_id: Id | None = None
    depends_on: list[Id] = Field(default_factory=list, max_length=MAX_DEPENDENCIES)
    checkpoint_policy: CheckpointPolicy | None = Field(
        None, description="none, before_start or review_result; defaults to the group's."
    )
    dependency_failure_policy: DependencyFailurePolicy | None = Field(
        None,
        description="What a failed or cancelled dependency does to this task: block or "
        "cancel; defaults to the group's.",
    )


class TaskFilters(Schema):
    status: TaskStatus | None = None
    toolkit: ToolkitSlug | None = None
    agent: Id | None = Field(None, description="Tasks this agent ever attempted.")
    parent: Id | None = None
    limit: int = Field(50, ge=1, le=200)
    offset: NonNegative = 0


class TaskOut(Schema):
    id: int
    title: str
    status: TaskStatus
    priority: int
    max_attempts: int
    epoch: int
    parent_id: int | None
    root_id: int | None
    required_toolkits: list[str]
    checkpoint_policy: CheckpointPolicy
    dependency_failure_policy: DependencyFailurePolicy
    start_approved_at: datetime | None
    created_by_user_id: int | None
    created_by_agent_id: int | None
    created_at: datetime
    updated_at: datetime


class TaskPage(Schema):
    count: int
    limit: int
    offset: int
    items: list[TaskOut]


class Ref(Schema):
    id: int
    name: str


class AttemptOut(Schema):
    id: int
    epoch: int
    status: AttemptStatus
    agent: Ref
    device: Ref
    choice: dict[str, Any]
    offered_at: datetime
    started_at: datetime | None
    ended_at: datetime | None
    lease_expires_at: datetime | None
    failure_reason: str
    retryable: bool | None
    result: Any = None


class TaskDetailOut(TaskOut):
    instructions: str
    steps: list[dict[str, Any]]
    result: Any = None
    feedback: str = Field(description="The reviewer's note for the next attempt, if any.")
    depends_on: list[int]
    attempts: list[AttemptOut]

    @staticmethod
    def resolve_depends_on(obj) -> list[int]:
        return sorted(link.depends_on_id for link in obj.dependency_links.all())

    @staticmethod
    def resolve_attempts(obj) -> list:
        return list(obj.attempts.all())


class CancelIn(InSchema):
    reason: str = Field("", max_length=1000)


class CancelOut(Schema):
    cancelled: list[int] = Field(description="Ids of the tasks cancelled (the sub-tree).")


class DependencyIn(InSchema):
    depends_on: Id


@router.get("/groups/{slug}/tasks", response=TaskPage)
def task_list(request: HttpRequest, slug: str, filters: Query[TaskFilters]):
    group = group_get_for_user(user=request.auth, slug=slug)
    tasks = tasks_for_group(
        group=group,
        status=filters.status,
        toolkit=filters.toolkit,
        agent_id=filters.agent,
        parent_id=filters.parent,
    )
    return {
        "count": tasks.count(),
        "limit": filters.limit,
        "offset": filters.offset,
        "items": tasks[filters.offset : filters.offset + filters.limit],
    }


@router.post("/groups/{slug}/tasks", response={201: TaskDetailOut})
def task_create_view(request: HttpRequest, slug: str, payload: TaskCreateIn):
    group = group_get_for_user(user=request.auth, slug=slug)
    task = task_create(
        group=group,
        actor=request.auth,
        title=payload.title,
        instructions=payload.instructions,
        steps=[step.model_dump() for step in payload.steps],
        required_toolkits=payload.required_toolkits,
        priority=payload.priority,
        max_attempts=payload.max_attempts,
        parent_id=payload.parent_id,
        depends_on=payload.depends_on,
        checkpoint_policy=payload.checkpoint_policy,
        dependency_failure_policy=payload.dependency_failure_policy,
    )
    return Status(201, task_get_for_user(user=request.auth, task_id=task.id, detail=True))


@router.get("/tasks/{int:task_id}", response=TaskDetailOut)
def task_detail(request: HttpRequest, task_id: Id):
    return task_get_for_user(user=request.auth, task_id=task_id, detail=True)


@router.post("/tasks/{int:task_id}/cancel", response=CancelOut)
def task_cancel_view(request: HttpRequest, task_id: Id, payload: CancelIn):
    task = task_get_for_user(user=request.auth, task_id=task_id)
    return {"cancelled": task_cancel(actor=request.auth, task=task, reason=payload.reason)}


@router.post("/tasks/{int:task_id}/retry", response=TaskDetailOut)
def task_retry_view(request: HttpRequest, task_id: Id):
    task = task_get_for_user(user=request.auth, task_id=task_id)
    task_retry(actor=request.auth, task=task)
    return task_get_for_user(user=request.auth, task_id=task_id, detail=True)


class PlanRequestOut(Schema):
    task_id: int
    request_id: int = Field(description="The id of the plan.requested event.")
    status: str = Field(description="requested: the plan checkpoint follows (or plan.failed).")


@router.post("/tasks/{int:task_id}/plan", response={202: PlanRequestOut})
def task_plan_view(request: HttpRequest, task_id: Id):
    """Ask the model to break this goal task into sub-tasks (member+). The proposal comes
    as a `plan` checkpoint (event plan.proposed) to edit, approve or reject; a model that
    gives no valid plan twice ends in a plan.failed event. 503 model_unavailable without a
    model backend."""
    task = task_get_for_user(user=request.auth, task_id=task_id)
    event = plan_request(actor=request.auth, task=task)
    return Status(202, {"task_id": task.id, "request_id": event.id, "status": "requested"})


@router.post("/tasks/{int:task_id}/dependencies", response=TaskDetailOut)
def task_dependency_add_view(request: HttpRequest, task_id: Id, payload: DependencyIn):
    task = task_get_for_user(user=request.auth, task_id=task_id)
    depends_on = dependency_get(task=task, depends_on_id=payload.depends_on)
    task_dependency_add(actor=request.auth, task=task, depends_on=depends_on)
    return task_get_for_user(user=request.auth, task_id=task_id, detail=True)


# --- artifacts ---------------------------------------------------------------------------


class ArtifactOut(Schema):
    id: int
    task_id: int
    attempt_id: int | None
    name: str
    version: int
    kind: ArtifactKind
    content_type: str
    size: int
    sha256: str
    created_by_user_id: int | None
    created_by_agent_id: int | None
    created_at: datetime
    download_url: str

    @staticmethod
    def resolve_download_url(obj) -> str:
        return reverse("api:artifact_download", kwargs={"artifact_id": obj.id})


class ArtifactUploadForm(Schema):
    name: str | None = Field(
        None, min_length=1, max_length=200, description="Defaults to the file's name."
    )
    kind: ArtifactKind = ArtifactKind.FILE
    attempt_id: Id | None = Field(None, description="Device uploads: the attempt.")
    epoch: Id | None = Field(None, description="Device uploads: the attempt's epoch.")


def _human(request: HttpRequest):
    """The signed-in person; a device token is not enough here."""
    if isinstance(request.auth, Device):
        raise AuthenticationError()
    return request.auth


@artifact_upload_router.get("/tasks/{int:task_id}/artifacts", response=list[ArtifactOut])
def artifact_list(request: HttpRequest, task_id: Id):
    task = task_get_for_user(user=_human(request), task_id=task_id)
    return artifacts_for_task(task=task)


@artifact_upload_router.post("/tasks/{int:task_id}/artifacts", response={201: ArtifactOut})
def artifact_upload(
    request: HttpRequest,
    task_id: Id,
    file: File[UploadedFile],
    form: Form[ArtifactUploadForm],
):
    """Upload a new version of a named artifact: a group member (member role or above), or
    the device whose agent holds the task's running attempt (attempt_id + epoch; a stale
    epoch is refused with 409 stale_attempt)."""
    common = {
        "name": form.name or file.name or "",
        "upload": file,
        "content_type": file.content_type or "application/octet-stream",
        "kind": form.kind,
    }
    if isinstance(request.auth, Device):
        if form.attempt_id is None or form.epoch is None:
            raise InvalidInput(
                "A device uploads for its running attempt: send attempt_id and epoch.",
                code="attempt_required",
            )
        attempt = running_attempt_for_device(
            device=request.auth, task_id=task_id, attempt_id=form.attempt_id, epoch=form.epoch
        )
        return Status(201, artifact_create(task=attempt.task, attempt=attempt, **common))
    if form.attempt_id is not None or form.epoch is not None:
        raise InvalidInput("attempt_id and epoch are for device uploads only.")
    task = task_get_for_user(user=request.auth, task_id=task_id)
    return Status(201, artifact_create(task=task, actor=request.auth, **common))


@artifacts_router.get("/artifacts/{int:artifact_id}", response=ArtifactOut)
def artifact_detail(request: HttpRequest, artifact_id: Id):
    return artifact_get_for_user(user=request.auth, artifact_id=artifact_id)


@artifacts_router.get("/artifacts/{int:artifact_id}/download", url_name="artifact_download")
def artifact_download(request: HttpRequest, artifact_id: Id):
    """The file itself, as an attachment with its stored content type (application/
    octet-stream for types a browser would run, such as HTML and SVG)."""
    artifact = artifact_get_for_user(user=request.auth, artifact_id=artifact_id)
    return artifact_file_response(artifact)
