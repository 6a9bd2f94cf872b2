from django.db import models

from apps.devices.models import Agent, Device
from apps.groups.models import Group
from apps.tasks.models import Attempt, Task


class ModelCallStatus(models.TextChoices):
    OK = "ok"  # the backend answered in full
    ERROR = "error"  # the backend failed, timed out or refused (error_code says which)
    CANCELLED = "cancelled"  # the agent went away before the answer was complete


class ModelCall(models.Model):
    """One chat completion an agent made through the gateway (apps.llm.views), metered
    after it ended. Tokens are the backend's own count (its `usage`)."""

    group = models.ForeignKey(Group, on_delete=models.CASCADE, related_name="model_calls")
    device = models.ForeignKey(
        Device, null=True, blank=True, on_delete=models.SET_NULL, related_name="model_calls"
    )
    agent = models.ForeignKey(
        Agent, null=True, blank=True, on_delete=models.SET_NULL, related_name="model_calls"
    )
    task = models.ForeignKey(
        Task, null=True, blank=True, on_delete=models.SET_NULL, related_name="model_calls"
    )
    attempt = models.ForeignKey(
        Attempt, null=True, blank=True, on_delete=models.SET_NULL, related_name="model_calls"
    )
    model = models.CharField(max_length=200)
    stream = models.BooleanField(default=False)
    status = models.CharField(max_length=10, choices=ModelCallStatus.choices)
    # The status the agent got (for a stream that failed midway: 200, with an SSE error).
    http_status = models.PositiveSmallIntegerField()
    error_code = models.CharField(max_length=50, blank=True)
    error = models.CharField(max_length=500, blank=True)
    prompt_tokens = models.PositiveIntegerField(default=0)
    completion_tokens = models.PositiveIntegerField(default=0)
    # Milliseconds from the request to the first generated piece (content, reasoning or a
    # tool call); null when none came.
    ttft_ms = models.PositiveIntegerField(null=True, blank=True)
    latency_ms = models.PositiveIntegerField()
    created_at = models.DateTimeField()

    class Meta:
        indexes = [models.Index(fields=["group", "created_at"])]

    def __str__(self) -> str:
        return f"{self.model} call {self.pk} ({self.status})"

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
