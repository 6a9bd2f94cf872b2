"""Tasks (create, list, cancel, retry, dependencies) and their artifacts."""

import functools
from datetime import datetime
from io import BytesIO
from typing import Annotated, Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest
from django.urls import reverse
from ninja import Field, File, Form, Query, Router, Schema, Status, UploadedFile
from ninja.decorators import decorate_view
from ninja.errors import AuthenticationError
from pydantic import BaseModel, ConfigDict, StringConstraints

from apps.devices.models import Device
from apps.groups.api import ErrorOut, InSchema
from apps.groups.models import CheckpointPolicy, DependencyFailurePolicy
from apps.groups.selectors import group_get_for_user
from apps.tasks.downloads import artifact_file_response
from apps.tasks.graphs import MAX_GRAPH_TASKS, MAX_KEY, GraphTask, task_graph_create
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


class TaskFieldsIn(BaseModel):
    """A new task's own fields (single and bulk creation). A plain pydantic model: ninja's
    Schema wraps every object it validates for attribute access, a third of a 4,000-task
    graph's time."""

    model_config = ConfigDict(extra="forbid")

    title: str = Field(min_length=1, max_length=200)
    instructions: str = Field("", max_length=100_000)
    steps: list[Step] = Field(default_factory=list, max_length=MAX_STEPS)
    required_toolkits: list[ToolkitSlug] = Field(default_factory=list, max_length=50)
    priority: int = Field(0, ge=-100, le=100)
    max_attempts: int | None = Field(None, ge=1, le=100)
    checkpoint_policy: CheckpointPolicy | None = Field(
        None, description="none, before_start or review_result; defaults to the group's."
    )
    dependency_failure_policy: DependencyFailurePolicy | None = Field(
        None,
        description="What a failed or cancelled dependency does to this task: block or "
        "cancel; defaults to the group's.",
    )


class TaskCreateIn(TaskFieldsIn):
    parent_id: Id | None = None
    depends_on: list[Id] = Field(default_factory=list, max_length=MAX_DEPENDENCIES)


GraphKey = Annotated[str, StringConstraints(min_length=1, max_length=MAX_KEY)]


class TaskGraphTaskIn(TaskFieldsIn):
    key: GraphKey = Field(description="The task's name in this request, unique in it.")
    depends_on: list[GraphKey] = Field(
        default_factory=list,
        max_length=MAX_DEPENDENCIES,
        description="Keys of tasks of this graph that must succeed first.",
    )
    depends_on_ids: list[Id] = Field(
        default_factory=list,
        max_length=MAX_DEPENDENCIES,
        description="Ids of existing tasks of the group that must succeed first (at most "
        f"{MAX_DEPENDENCIES} dependencies in all).",
    )
    parent: GraphKey | None = Field(None, description="The key of its parent in this graph.")
    parent_id: Id | None = Field(
        None, description="Or an existing task of the group as its parent."
    )


class TaskGraphIn(InSchema):
    tasks: list[TaskGraphTaskIn] = Field(min_length=1, max_length=MAX_GRAPH_TASKS)


class TaskGraphOut(Schema):
    ids: dict[str, int] = Field(description="The created tasks' ids by key.")
    statuses: dict[str, int] = Field(
        description="How many of them start in each status (ready, waiting, blocked)."
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


def body_up_to(limit_setting: str):
    """Let an operation read a request body of up to settings.<limit_setting> bytes;
    every other one keeps the global DATA_UPLOAD_MAX_MEMORY_SIZE."""

    def decorator(run):
        @functools.wraps(run)
        def wrapper(request: HttpRequest, *args, **kwargs):
            from claw.api import on_too_big  # claw.api imports this module

            limit = getattr(settings, limit_setting)
            if not hasattr(request, "_body"):
                length = int(request.META.get("CONTENT_LENGTH") or 0)
                body = request.read(limit + 1) if length <= limit else None
                if body is None or len(body) > limit:  # a chunked body has no length
                    return on_too_big(request, RequestDataTooBig())
                request._body, request._stream = body, BytesIO(body)
            return run(request, *args, **kwargs)

        return wrapper

    return decorator


GRAPH_ERRORS = frozenset({401, 403, 404, 413, 422})


@router.post("/groups/{slug}/tasks/graph", response={201: TaskGraphOut, GRAPH_ERRORS: ErrorOut})
@decorate_view(body_up_to("CLAW_TASK_GRAPH_MAX_BYTES"))
def task_graph_create_view(request: HttpRequest, slug: str, payload: TaskGraphIn):
    """Create a whole task graph at once (member+): up to 5,000 tasks that name each other
    by `key` (`depends_on`, `parent`) and may name existing tasks of the group by id
    (`depends_on_ids`, `parent_id`). Each task is checked as single creation checks it and
    starts as it would (ready, waiting, blocked, or held for a before_start approval); the
    graph is checked as a whole. All or nothing: on any error nothing is created, and the
    error's details name the task (`key`, `index`). 422 codes: validation_error (the
    schema; its errors carry the task's key and index too), duplicate_key, unknown_key,
    dependency_cycle (details.cycle: the keys round it), parent_cycle, unknown_toolkit,
    unknown_dependency, invalid_steps, invalid. 413 too_large over the body bound
    (CLAW_TASK_GRAPH_MAX_BYTES, 16 MiB). 403 below member, 404 outside the group."""
    group = group_get_for_user(user=request.auth, slug=slug)
    created = task_graph_create(
        group=group,
        actor=request.auth,
        tasks=[
            GraphTask(**dict(item))  # its Step models pass task_create's check as they are
            for item in payload.tasks
        ],
    )
    statuses: dict[str, int] = {}
    for task in created.values():
        statuses[task.status] = statuses.get(task.status, 0) + 1
    return Status(
        201, {"ids": {key: task.id for key, task in created.items()}, "statuses": statuses}
    )


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
