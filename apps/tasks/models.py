from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models
from django.utils import timezone

from apps.devices.models import Agent, Device
from apps.groups.models import CheckpointPolicy, DependencyFailurePolicy, Group


class TaskStatus(models.TextChoices):
    WAITING = "waiting"  # dependencies not yet succeeded, or the start not yet approved
    READY = "ready"  # can be assigned
    ASSIGNED = "assigned"  # an attempt was offered to an agent
    RUNNING = "running"  # the agent accepted
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    BLOCKED = "blocked"  # a dependency failed or was cancelled
    REVIEW = "review"  # an attempt finished; its result waits for a human's review


TERMINAL_TASK_STATUSES = {TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.CANCELLED}
LIVE_TASK_STATUSES = {TaskStatus.ASSIGNED, TaskStatus.RUNNING}


class TaskQuerySet(models.QuerySet):
    def update(self, **kwargs):
        # Every move to ready is a compare-and-set update, in many services: stamping
        # ready_at here covers each of them, and any added later.
        if kwargs.get("status") == TaskStatus.READY:
            kwargs.setdefault("ready_at", timezone.now())
        return super().update(**kwargs)


class Task(models.Model):
    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="tasks")
    parent = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.CASCADE, related_name="children"
    )
    # Top of the decomposition tree (itself for a root); artifacts are shared within a root.
    root = models.ForeignKey(
        "self", null=True, blank=True, on_delete=models.CASCADE, related_name="+"
    )
    dependencies = models.ManyToManyField(
        "self", symmetrical=False, through="TaskDependency", related_name="dependents"
    )
    title = models.CharField(max_length=200)
    instructions = models.TextField(blank=True)
    # Explicit tool calls an agent can run without a model: [{"tool": ..., "args": {...}}].
    steps = models.JSONField(default=list, blank=True)
    required_toolkits = models.JSONField(default=list, blank=True)
    priority = models.IntegerField(
        default=0, validators=[MinValueValidator(-100), MaxValueValidator(100)]
    )
    status = models.CharField(max_length=10, choices=TaskStatus.choices, default=TaskStatus.READY)
    max_attempts = models.PositiveIntegerField(
        validators=[MinValueValidator(1), MaxValueValidator(100)]
    )
    # Fencing token: bumped for every new attempt; only the attempt holding the current
    # epoch may write.
    epoch = models.PositiveIntegerField(default=0)
    # Attempts with an epoch above this count against max_attempts (a retry raises it).
    attempt_floor = models.PositiveIntegerField(default=0)
    # Backoff after a lost or failed attempt: a ready task is not matched before this.
    not_before = models.DateTimeField(null=True, blank=True)
    result = models.JSONField(null=True, blank=True)
    # Checkpoints this task raises by itself (the group's default when it was created):
    # before_start holds it until a human approves its start; review_result holds each
    # result for review before it is accepted.
    checkpoint_policy = models.CharField(
        max_length=20, choices=CheckpointPolicy.choices, default=CheckpointPolicy.NONE
    )
    # What a failed or cancelled dependency does to this task (the group's default when it
    # was created).
    dependency_failure_policy = models.CharField(
        max_length=10,
        choices=DependencyFailurePolicy.choices,
        default=DependencyFailurePolicy.BLOCK,
    )
    # When a human approved the start (before_start); a retry after a rejection asks again.
    start_approved_at = models.DateTimeField(null=True, blank=True)
    # The reviewer's note when they asked for changes: sent to the next attempts with the
    # task (assignment.task.feedback) until a result is accepted.
    feedback = models.TextField(blank=True)
    created_by_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_by_agent = models.ForeignKey(
        Agent, null=True, blank=True, on_delete=models.SET_NULL, related_name="created_tasks"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    # When the task last became ready (its creation, for one created ready): the matcher
    # measures ready → offered from it (claw_assignment_latency_seconds).
    ready_at = models.DateTimeField(default=timezone.now)

    objects = TaskQuerySet.as_manager()

    class Meta:
        indexes = [
            models.Index(fields=["group", "status"]),
            models.Index(
                fields=["group", "-priority", "created_at"],
                condition=models.Q(status="ready"),
                name="task_ready_queue",
            ),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.title}"


class TaskDependency(models.Model):
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="dependency_links")
    depends_on = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="dependent_links")

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["task", "depends_on"], name="dependency_unique"),
            models.CheckConstraint(
                condition=~models.Q(task=models.F("depends_on")), name="dependency_not_self"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.task_id} depends on {self.depends_on_id}"


class AttemptStatus(models.TextChoices):
    OFFERED = "offered"  # pushed to the agent, waiting for accept/decline
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    LOST = "lost"  # lease expired or the agent vanished
    CANCELLED = "cancelled"
    DECLINED = "declined"  # the agent said no (busy, missing tool)
    REJECTED = "rejected"  # a human rejected the result at a review checkpoint


LIVE_ATTEMPT_STATUSES = {AttemptStatus.OFFERED, AttemptStatus.RUNNING}


class Attempt(models.Model):
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="attempts")
    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="attempts")
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="attempts")
    epoch = models.PositiveIntegerField()
    status = models.CharField(
        max_length=10, choices=AttemptStatus.choices, default=AttemptStatus.OFFERED
    )
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    offered_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    ended_at = models.DateTimeField(null=True, blank=True)
    failure_reason = models.TextField(blank=True)
    retryable = models.BooleanField(null=True, blank=True)
    # Why this agent: {"candidates": [...], "scores": {...}, "reason": "..."}.
    choice = models.JSONField(default=dict, blank=True)
    result = models.JSONField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["task", "epoch"], name="attempt_unique_epoch"),
            # The last line of defence against two owners: one live attempt per task.
            models.UniqueConstraint(
                fields=["task"],
                condition=models.Q(status__in=["offered", "running"]),
                name="attempt_one_live_per_task",
            ),
        ]
        indexes = [
            models.Index(
                fields=["lease_expires_at"],
                condition=models.Q(status__in=["offered", "running"]),
                name="attempt_live_lease",
            ),
            models.Index(fields=["agent", "status"]),
        ]

    def __str__(self) -> str:
        return f"attempt {self.epoch} of task {self.task_id} ({self.status})"


class ArtifactKind(models.TextChoices):
    DOCUMENT = "document"
    WEBSITE = "website"
    SPREADSHEET = "spreadsheet"
    SLIDES = "slides"
    IMAGE = "image"
    FILE = "file"


def artifact_upload_to(artifact: "Artifact", filename: str) -> str:
    return f"artifacts/{artifact.group_id}/{artifact.task_id}/{artifact.version}/{filename}"


class Artifact(models.Model):
    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="artifacts")
    task = models.ForeignKey(Task, on_delete=models.CASCADE, related_name="artifacts")
    attempt = models.ForeignKey(
        Attempt, null=True, blank=True, on_delete=models.SET_NULL, related_name="artifacts"
    )
    name = models.CharField(max_length=200)
    version = models.PositiveIntegerField()
    kind = models.CharField(max_length=12, choices=ArtifactKind.choices, default=ArtifactKind.FILE)
    content_type = models.CharField(max_length=100)
    size = models.PositiveBigIntegerField()
    sha256 = models.CharField(max_length=64)
    file = models.FileField(upload_to=artifact_upload_to, max_length=500)
    created_by_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    created_by_agent = models.ForeignKey(
        Agent, null=True, blank=True, on_delete=models.SET_NULL, related_name="artifacts"
    )
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["task", "name", "version"], name="artifact_unique_version"
            )
        ]

    def __str__(self) -> str:
        return f"{self.name} v{self.version}"
