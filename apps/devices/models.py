from django.conf import settings
from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

from apps.groups.models import Group


class Toolkit(models.Model):
    """A named capability an agent can declare and a task can require."""

    slug = models.SlugField(max_length=50, unique=True)
    description = models.TextField(blank=True)
    tool_schemas = models.JSONField(default=list, blank=True)
    skill = models.TextField(blank=True, help_text="Optional instructions for using the toolkit.")
    created_at = models.DateTimeField(auto_now_add=True)

    def __str__(self) -> str:
        return self.slug


class DeviceKind(models.TextChoices):
    LAPTOP = "laptop"
    PHONE = "phone"
    CLOUD = "cloud"
    OTHER = "other"


class Device(models.Model):
    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="devices")
    name = models.CharField(max_length=100)
    kind = models.CharField(max_length=10, choices=DeviceKind.choices, default=DeviceKind.OTHER)
    platform = models.CharField(max_length=100, blank=True)
    token_hash = models.CharField(max_length=64, unique=True)
    token_prefix = models.CharField(max_length=16)
    paired_at = models.DateTimeField()
    revoked_at = models.DateTimeField(null=True, blank=True)
    draining = models.BooleanField(default=False)
    last_seen_at = models.DateTimeField(null=True, blank=True)

    def __str__(self) -> str:
        return f"{self.name} ({self.kind})"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None


class PairingCode(models.Model):
    """A short, single-use code a device exchanges for its token."""

    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="pairing_codes")
    code_hash = models.CharField(max_length=64, unique=True)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    used_at = models.DateTimeField(null=True, blank=True)
    device = models.OneToOneField(Device, null=True, blank=True, on_delete=models.SET_NULL)

    def __str__(self) -> str:
        return f"pairing code for {self.group} (expires {self.expires_at:%H:%M})"


class ServerProcess(models.Model):
    """A web process holding agent sockets, seen every second while it lives
    (apps.devices.servers). Agents name the process their socket is on, so when a process
    dies without closing its sockets (kill -9, a lost machine) the failover sweeper treats
    its agents as disconnected since it was last seen."""

    name = models.CharField(max_length=200, unique=True)  # "host:pid:token"
    started_at = models.DateTimeField()
    last_seen_at = models.DateTimeField(db_index=True)
    # Since when it has been seen without a gap (a heartbeat after a silence restarts it):
    # only a process seen all along can vouch that another one went silent.
    seen_since = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.name} @ {self.last_seen_at:%H:%M:%S}"


class AgentStatus(models.TextChoices):
    ONLINE = "online"
    BUSY = "busy"
    DRAINING = "draining"
    SUSPECT = "suspect"
    OFFLINE = "offline"


class Agent(models.Model):
    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="agents")
    device = models.ForeignKey(Device, on_delete=models.CASCADE, related_name="agents")
    name = models.CharField(max_length=100)
    # {"shell": "1.0", "python": "3.11"}: slug -> version the agent declared.
    toolkits = models.JSONField(default=dict, blank=True)
    tool_schemas = models.JSONField(default=dict, blank=True)
    capacity = models.PositiveIntegerField(
        default=1, validators=[MinValueValidator(1), MaxValueValidator(256)]
    )
    status = models.CharField(
        max_length=10, choices=AgentStatus.choices, default=AgentStatus.OFFLINE
    )
    client_version = models.CharField(max_length=50, blank=True)
    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    # The channel name of the live socket; a closing socket only marks the agent suspect
    # if it is still the current one (a reconnect may already have replaced it).
    connection = models.CharField(max_length=200, blank=True)
    # The web process that socket is on (null: none, or a server that does not register).
    server = models.ForeignKey(
        ServerProcess, null=True, blank=True, on_delete=models.SET_NULL, related_name="agents"
    )
    disconnected_at = models.DateTimeField(null=True, blank=True)
    succeeded_count = models.PositiveIntegerField(default=0)
    failed_count = models.PositiveIntegerField(default=0)
    # Track record per toolkit: {"shell": [succeeded, failed], ...}, counted for every
    # toolkit a finished task required.
    toolkit_stats = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["device", "name"], name="agent_unique_name_per_device")
        ]
        indexes = [
            models.Index(fields=["group", "status"]),
            models.Index(fields=["status", "last_heartbeat_at"]),
        ]

    def __str__(self) -> str:
        return f"{self.name}@{self.device_id}"

    @property
    def success_rate(self) -> float:
        # Laplace-smoothed, so a new agent starts at 0.5 rather than 0 or 1.
        return (self.succeeded_count + 1) / (self.succeeded_count + self.failed_count + 2)

    def success_rate_for(self, toolkits: list[str]) -> float:
        """Smoothed success rate on tasks needing these toolkits, where the agent has a
        record with them; its overall rate otherwise."""
        known = [self.toolkit_stats[slug] for slug in toolkits if slug in self.toolkit_stats]
        if not known:
            return self.success_rate
        succeeded = sum(s for s, _ in known)
        failed = sum(f for _, f in known)
        return (succeeded + 1) / (succeeded + failed + 2)


class AgentMessage(models.Model):
    """The answer given to an agent's frame, keyed by its client message id, written in the
    same transaction as the frame's effect: a replayed id gets this answer and no second
    effect."""

    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="messages")
    client_id = models.CharField(max_length=64)
    response = models.JSONField()
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["agent", "client_id"], name="agent_message_once")
        ]

    def __str__(self) -> str:
        return f"{self.agent_id}:{self.client_id}"


class SkillSource(models.TextChoices):
    DOCUMENT = "document"  # generated by the model from an uploaded document
    EDIT = "edit"  # written by a person


class SkillStatus(models.TextChoices):
    PENDING = "pending"  # the model is making it
    READY = "ready"
    FAILED = "failed"


class ToolkitSkill(models.Model):
    """One version of a group's skill for a toolkit: a concise procedure, checklist and
    constraints that agents read (in their system prompt) when a task requires the toolkit.

    Toolkits are global; skills belong to a group, numbered 1, 2, 3… per (group, toolkit).
    The current skill is the latest ready version (apps.devices.skills.skills_current).
    """

    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="toolkit_skills")
    toolkit = models.ForeignKey(Toolkit, on_delete=models.CASCADE, related_name="group_skills")
    version = models.PositiveIntegerField()
    source = models.CharField(max_length=10, choices=SkillSource.choices)
    status = models.CharField(max_length=10, choices=SkillStatus.choices, default=SkillStatus.READY)
    text = models.TextField(blank=True)
    error = models.TextField(blank=True)
    # The uploaded document (source document): its name, hash and size, and the text the
    # model was given (extracted, cut to the budget; the file itself is not kept).
    document_name = models.CharField(max_length=200, blank=True)
    document_sha256 = models.CharField(max_length=64, blank=True)
    document_size = models.PositiveIntegerField(null=True, blank=True)
    document_text = models.TextField(blank=True)
    document_chars = models.PositiveIntegerField(
        null=True, blank=True, help_text="Characters of text in the document, before any cut."
    )
    usage = models.JSONField(default=list, blank=True)
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["group", "toolkit", "version"], name="toolkit_skill_version_once"
            )
        ]

    def __str__(self) -> str:
        return f"{self.toolkit_id} skill v{self.version} ({self.status})"

    @property
    def document_truncated(self) -> bool:
        return self.document_chars is not None and self.document_chars > len(self.document_text)
