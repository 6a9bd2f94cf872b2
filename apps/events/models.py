from django.conf import settings
from django.db import models

from apps.groups.models import Group


class Event(models.Model):
    """Append-only log per group: every state change and progress item, gap-free by seq."""

    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="events")
    seq = models.BigIntegerField()
    kind = models.CharField(max_length=50)
    task = models.ForeignKey(
        "tasks.Task", null=True, blank=True, on_delete=models.CASCADE, related_name="events"
    )
    attempt = models.ForeignKey(
        "tasks.Attempt", null=True, blank=True, on_delete=models.SET_NULL, related_name="events"
    )
    agent = models.ForeignKey(
        "devices.Agent", null=True, blank=True, on_delete=models.SET_NULL, related_name="events"
    )
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL
    )
    payload = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["group", "seq"], name="event_unique_seq_per_group")
        ]
        indexes = [models.Index(fields=["task", "seq"])]
        ordering = ["group", "seq"]

    def __str__(self) -> str:
        return f"{self.group_id}#{self.seq} {self.kind}"


class ProcessBeat(models.Model):
    """Liveness of the platform's own processes (Celery workers, beat), for /healthz."""

    name = models.CharField(max_length=200, unique=True)  # "beat" or "worker:<hostname>"
    last_seen_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.name} @ {self.last_seen_at:%H:%M:%S}"


class Leader(models.Model):
    """A short lease on a platform-wide duty (the maintenance loop: failure detection, the
    matching safety net, checkpoint expiry). Whichever process holds it does the duty;
    the holder renews it every second, and when it dies another takes it once it lapses
    (apps.events.services.leader_elect)."""

    name = models.CharField(max_length=50, unique=True)
    holder = models.CharField(max_length=200)  # "host:pid:token" of the holding process
    expires_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"{self.name}: {self.holder} until {self.expires_at:%H:%M:%S}"
