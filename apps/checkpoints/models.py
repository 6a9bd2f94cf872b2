from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from apps.groups.models import ExpiryAction, Group, Role
from apps.tasks.models import Attempt, Task


class CheckpointSource(models.TextChoices):
    AGENT = "agent"
    POLICY = "policy"
    PLANNER = "planner"
    SYSTEM = "system"
    HUMAN = "human"


class CheckpointKind(models.TextChoices):
    """What the checkpoint is about, which decides what its outcome does."""

    REQUEST = "request", "An agent asks"
    MAX_ATTEMPTS = "max_attempts", "A task ran out of attempts: retry, reassign or give up"
    BEFORE_START = "before_start", "Approve before the task starts"
    REVIEW = "review", "Review the result"
    PLAN = "plan", "Approve a plan"
    BUDGET = "budget", "Raise a budget"


class CheckpointStatus(models.TextChoices):
    PENDING = "pending"
    APPROVED = "approved"
    REJECTED = "rejected"
    CHANGES_REQUESTED = "changes_requested"
    EXPIRED = "expired"
    CANCELLED = "cancelled"


class Checkpoint(models.Model):
    """A pause that needs a human decision."""

    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="checkpoints")
    task = models.ForeignKey(
        Task, null=True, blank=True, on_delete=models.CASCADE, related_name="checkpoints"
    )
    attempt = models.ForeignKey(
        Attempt, null=True, blank=True, on_delete=models.CASCADE, related_name="checkpoints"
    )
    source = models.CharField(max_length=10, choices=CheckpointSource.choices)
    kind = models.CharField(
        max_length=20, choices=CheckpointKind.choices, default=CheckpointKind.REQUEST
    )
    title = models.CharField(max_length=200)
    details = models.TextField(blank=True)
    options = models.JSONField(default=list, blank=True)
    # A plan checkpoint's proposal (apps.tasks.planner): {"summary", "tasks": [...]}, edited
    # by humans (plan_edit) until it is approved, which creates the tasks.
    proposal = models.JSONField(null=True, blank=True)
    required_approvals = models.PositiveIntegerField(
        default=1, validators=[MinValueValidator(1), MaxValueValidator(20)]
    )
    decider_role = models.CharField(max_length=10, choices=Role.choices, default=Role.APPROVER)
    expires_at = models.DateTimeField(null=True, blank=True)
    expiry_action = models.CharField(
        max_length=10, choices=ExpiryAction.choices, default=ExpiryAction.REJECT
    )
    status = models.CharField(
        max_length=20, choices=CheckpointStatus.choices, default=CheckpointStatus.PENDING
    )
    created_at = models.DateTimeField(auto_now_add=True)
    resolved_at = models.DateTimeField(null=True, blank=True)
    # When the waiting agent received the outcome (decisions made while it was away are
    # pushed again on reconnect until this is set).
    delivered_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        indexes = [
            models.Index(fields=["group", "status"]),
            models.Index(
                fields=["expires_at"],
                condition=models.Q(status="pending"),
                name="checkpoint_pending_expiry",
            ),
        ]

    def __str__(self) -> str:
        return f"checkpoint {self.pk}: {self.title} ({self.status})"


class Verdict(models.TextChoices):
    APPROVE = "approve"
    REJECT = "reject"
    REQUEST_CHANGES = "request_changes"


class Decision(models.Model):
    checkpoint = models.ForeignKey(Checkpoint, on_delete=models.CASCADE, related_name="decisions")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    verdict = models.CharField(max_length=20, choices=Verdict.choices)
    # With an approval of a checkpoint that offers options: the one chosen.
    option = models.CharField(max_length=100, blank=True)
    note = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["checkpoint", "user"], name="decision_one_per_user")
        ]

    def __str__(self) -> str:
        return f"{self.user} {self.verdict} on {self.checkpoint_id}"
