from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models


class Role(models.TextChoices):
    VIEWER = "viewer"
    MEMBER = "member"
    APPROVER = "approver"
    OWNER = "owner"

    @classmethod
    def rank(cls, role: str) -> int:
        return [cls.VIEWER, cls.MEMBER, cls.APPROVER, cls.OWNER].index(role)


class CheckpointPolicy(models.TextChoices):
    NONE = "none", "No checkpoints unless an agent asks"
    BEFORE_START = "before_start", "Approve before a task starts"
    REVIEW_RESULT = "review_result", "Review each result before it is accepted"


class Group(models.Model):
    """A Claw Group: humans and agents working on shared task graphs, with its policies."""

    name = models.CharField(max_length=100)
    slug = models.SlugField(max_length=50, unique=True)
    heartbeat_interval_s = models.PositiveIntegerField(
        default=10, validators=[MinValueValidator(1), MaxValueValidator(600)]
    )
    lease_timeout_s = models.PositiveIntegerField(
        default=30, validators=[MinValueValidator(2), MaxValueValidator(3600)]
    )
    max_attempts = models.PositiveIntegerField(
        default=3, validators=[MinValueValidator(1), MaxValueValidator(100)]
    )
    reconnect_grace_s = models.PositiveIntegerField(
        default=15, validators=[MinValueValidator(0), MaxValueValidator(3600)]
    )
    default_checkpoint_policy = models.CharField(
        max_length=20, choices=CheckpointPolicy.choices, default=CheckpointPolicy.NONE
    )
    # Last Event.seq handed out in this group; bumped in the writing transaction so
    # sequence numbers are gap-free (a rollback returns the number too).
    event_seq = models.BigIntegerField(default=0, editable=False)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=models.Q(lease_timeout_s__gt=models.F("heartbeat_interval_s")),
                name="group_lease_longer_than_heartbeat",
            )
        ]

    def __str__(self) -> str:
        return self.name


class Membership(models.Model):
    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="memberships")
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="memberships"
    )
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["group", "user"], name="membership_unique_user")
        ]

    def __str__(self) -> str:
        return f"{self.user} in {self.group} ({self.role})"


class ApiToken(models.Model):
    """A personal API token. Only its SHA-256 is stored; the token is shown once."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens"
    )
    name = models.CharField(max_length=100)
    token_hash = models.CharField(max_length=64, unique=True)
    prefix = models.CharField(max_length=16)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"
