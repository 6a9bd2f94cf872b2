from django.db import models

from apps.devices.models import Agent, Device
from apps.groups.models import Group
from apps.tasks.models import Attempt, Task


class ModelCallStatus(models.TextChoices):
    OK = "ok"  # the backend answered in full
    ERROR = "error"  # the backend failed, timed out or refused (error_code says which)
    CANCELLED = "cancelled"  # the agent went away before the answer was complete


class ModelCall(models.Model):
    """One chat completion an agent made through the gateway (apps.llm.gateway), or Claw
    made for the group itself (a plan, a skill: no device), metered after it ended. Tokens
    are the backend's own count (its `usage`)."""

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


class BackendStatus(models.TextChoices):
    UNKNOWN = "unknown"  # not probed yet
    OK = "ok"
    # Answering, but its queue or KV cache is over the threshold (CLAW_LLM_SATURATED_*).
    SATURATED = "saturated"
    DOWN = "down"  # /health failed, answered an error, or timed out


class Backend(models.Model):
    """The configured model backend (one row per base URL) and its current status, which
    only the probe moves, by compare-and-set (apps.llm.services.backend_probe_record)."""

    base_url = models.CharField(max_length=500, unique=True)
    status = models.CharField(
        max_length=10, choices=BackendStatus.choices, default=BackendStatus.UNKNOWN
    )
    status_since = models.DateTimeField()
    probed_at = models.DateTimeField(null=True, blank=True)
    # The latest probe's problem, when it had one.
    error = models.CharField(max_length=500, blank=True)

    def __str__(self) -> str:
        return f"{self.base_url} ({self.status})"


class BackendProbe(models.Model):
    """One probe of the backend (apps.llm.probe): a time series, pruned to PROBE_KEEP by
    the probe itself. Metrics are null where the backend does not report them (only SGLang
    serves /metrics)."""

    backend = models.ForeignKey(Backend, on_delete=models.CASCADE, related_name="probes")
    at = models.DateTimeField()
    status = models.CharField(max_length=10, choices=BackendStatus.choices)
    latency_ms = models.PositiveIntegerField(null=True, blank=True)  # of GET /health
    model_id = models.CharField(max_length=200, blank=True)
    context_length = models.PositiveIntegerField(null=True, blank=True)
    running = models.PositiveIntegerField(null=True, blank=True)
    queued = models.PositiveIntegerField(null=True, blank=True)
    gen_throughput = models.FloatField(null=True, blank=True)  # generated tokens per second
    # Mean time to first token of the requests that started since the previous probe.
    ttft_ms = models.FloatField(null=True, blank=True)
    kv_usage = models.FloatField(null=True, blank=True)  # KV cache in use, 0..1
    cache_hit_rate = models.FloatField(null=True, blank=True)
    # The backend's cumulative TTFT histogram, to take the next probe's difference from.
    ttft_sum_s = models.FloatField(null=True, blank=True)
    ttft_count = models.FloatField(null=True, blank=True)
    error = models.CharField(max_length=500, blank=True)

    class Meta:
        indexes = [models.Index(fields=["backend", "at"])]

    def __str__(self) -> str:
        return f"probe {self.pk} @ {self.at:%H:%M:%S} ({self.status})"
