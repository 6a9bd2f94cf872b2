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


class DependencyFailurePolicy(models.TextChoices):
    """What happens to a task when one of its dependencies fails or is cancelled."""

    BLOCK = "block", "Block it until the dependency is retried"
    CANCEL = "cancel", "Cancel it (and what depends on it)"


class ExpiryAction(models.TextChoices):
    """What an unanswered checkpoint does when it expires."""

    REJECT = "reject", "Reject automatically"
    ESCALATE = "escalate", "Escalate to owners"


# Who may decide a checkpoint: approvers (and owners), or owners only.
DECIDER_ROLES = ("approver", "owner")


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
    # A socket that closed (or whose web process died) keeps its agent's work this long.
    # 10 s leaves a reconnect with backoff three tries, and keeps kill -9 of an agent ->
    # its task running elsewhere (grace + a sweep + the 1 s retry backoff + offer/accept)
    # under 15 s.
    reconnect_grace_s = models.PositiveIntegerField(
        default=10, validators=[MinValueValidator(0), MaxValueValidator(3600)]
    )
    default_checkpoint_policy = models.CharField(
        max_length=20, choices=CheckpointPolicy.choices, default=CheckpointPolicy.NONE
    )
    # The default for new tasks (a task may set its own).
    dependency_failure_policy = models.CharField(
        max_length=10,
        choices=DependencyFailurePolicy.choices,
        default=DependencyFailurePolicy.BLOCK,
    )
    # Defaults for the checkpoints raised in this group (by agents, policies and the system)
    # unless the raiser sets them: the quorum, who decides, and when an unanswered one
    # expires (0: never) with what effect.
    checkpoint_required_approvals = models.PositiveIntegerField(
        default=1, validators=[MinValueValidator(1), MaxValueValidator(20)]
    )
    checkpoint_decider_role = models.CharField(
        max_length=10,
        choices=[(role, role.capitalize()) for role in DECIDER_ROLES],
        default="approver",
    )
    checkpoint_expiry_s = models.PositiveIntegerField(
        default=0, validators=[MinValueValidator(0), MaxValueValidator(30 * 86400)]
    )
    checkpoint_expiry_action = models.CharField(
        max_length=10, choices=ExpiryAction.choices, default=ExpiryAction.REJECT
    )
    # Model tokens (prompt + completion) the group's agents may use through the gateway
    # (apps.llm); null: unlimited. llm_tokens_used counts every metered call, bumped in the
    # metering transaction like event_seq.
    llm_token_budget = models.PositiveBigIntegerField(null=True, blank=True)
    llm_tokens_used = models.PositiveBigIntegerField(default=0, editable=False)
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


class Invite(models.Model):
    """An invite link: whoever opens it while signed in joins the group with `role`, up to
    `max_uses` people, until it expires or an owner revokes it. Only the token's SHA-256 is
    stored; the link is shown once."""

    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="invites")
    role = models.CharField(max_length=10, choices=Role.choices, default=Role.MEMBER)
    token_hash = models.CharField(max_length=64, unique=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    max_uses = models.PositiveIntegerField(
        default=1, validators=[MinValueValidator(1), MaxValueValidator(1000)]
    )
    uses = models.PositiveIntegerField(default=0)
    revoked_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.CheckConstraint(
                condition=models.Q(uses__lte=models.F("max_uses")), name="invite_uses_within_max"
            )
        ]

    def __str__(self) -> str:
        return f"invite to {self.group} as {self.role} ({self.uses}/{self.max_uses})"
