"""Reads for the model gateway: who is calling (device token, attempt), and usage."""

from dataclasses import dataclass

from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import Coalesce

from apps.devices.models import Device
from apps.llm.models import ModelCall, ModelCallStatus
from apps.tasks.models import LIVE_ATTEMPT_STATUSES, Attempt
from claw.tokens import token_hash


@dataclass(frozen=True)
class Caller:
    """A device calling the gateway, and the attempt it works on (if it said so)."""

    device_id: int
    group_id: int
    llm_token_budget: int | None
    llm_tokens_used: int
    agent_id: int | None = None
    task_id: int | None = None
    attempt_id: int | None = None

    @property
    def budget_exhausted(self) -> bool:
        return self.llm_token_budget is not None and self.llm_tokens_used >= self.llm_token_budget


class CallerError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def caller_for_token(
    *, raw_token: str, attempt_id: int | None = None, epoch: int | None = None
) -> Caller:
    """The unrevoked device holding this token (one query, with its group's budget), and
    the attempt it names: the attempt must be this device's (else not found: a device does
    not learn about other devices' attempts) and live at that epoch (else stale_attempt)."""
    device = (
        Device.objects.filter(token_hash=token_hash(raw_token), revoked_at=None)
        .select_related("group")
        .only("id", "group_id", "group__llm_token_budget", "group__llm_tokens_used")
        .first()
    )
    if device is None:
        raise CallerError(401, "invalid_api_key", "The device token is unknown or revoked.")
    found = {}
    if attempt_id is not None:
        attempt = (
            Attempt.objects.filter(id=attempt_id, device_id=device.id)
            .select_related("task")
            .only("id", "agent_id", "task_id", "epoch", "status", "task__epoch")
            .first()
        )
        if attempt is None:
            raise CallerError(404, "attempt_not_found", f"This device has no attempt {attempt_id}.")
        if (
            attempt.status not in LIVE_ATTEMPT_STATUSES
            or attempt.task.epoch != attempt.epoch
            or (epoch is not None and epoch != attempt.epoch)
        ):
            raise CallerError(
                409,
                "stale_attempt",
                f"Attempt {attempt_id} is no longer live (it is {attempt.status}, epoch "
                f"{attempt.epoch}; the task is at epoch {attempt.task.epoch}).",
            )
        found = {"agent_id": attempt.agent_id, "task_id": attempt.task_id, "attempt_id": attempt.id}
    return Caller(
        device_id=device.id,
        group_id=device.group_id,
        llm_token_budget=device.group.llm_token_budget,
        llm_tokens_used=device.group.llm_tokens_used,
        **found,
    )


# --- usage -------------------------------------------------------------------------------

USAGE_BY = {"agent": "agent_id", "task": "task_id", "attempt": "attempt_id", "device": "device_id"}


def _totals(calls: QuerySet[ModelCall]) -> QuerySet:
    return calls.aggregate(
        calls=Count("id"),
        errors=Count("id", filter=~Q(status=ModelCallStatus.OK)),
        prompt_tokens=Coalesce(Sum("prompt_tokens"), 0),
        completion_tokens=Coalesce(Sum("completion_tokens"), 0),
    )


def llm_usage(
    *,
    group_id: int,
    agent_id: int | None = None,
    task_id: int | None = None,
    attempt_id: int | None = None,
) -> dict:
    """Totals of a group's model calls, narrowed to an agent, task or attempt:
    {calls, errors, prompt_tokens, completion_tokens, total_tokens}."""
    calls = ModelCall.objects.filter(group_id=group_id)
    for name, value in (("agent_id", agent_id), ("task_id", task_id), ("attempt_id", attempt_id)):
        if value is not None:
            calls = calls.filter(**{name: value})
    totals = _totals(calls)
    totals["total_tokens"] = totals["prompt_tokens"] + totals["completion_tokens"]
    return totals


def llm_usage_by(*, group_id: int, by: str) -> list[dict]:
    """A group's usage per agent, task, attempt or device, most tokens first: one row per
    value ({by: id, calls, errors, prompt_tokens, completion_tokens, total_tokens})."""
    column = USAGE_BY[by]
    rows = (
        ModelCall.objects.filter(group_id=group_id)
        .values(column)
        .annotate(
            calls=Count("id"),
            errors=Count("id", filter=~Q(status=ModelCallStatus.OK)),
            prompt_tokens=Coalesce(Sum("prompt_tokens"), 0),
            completion_tokens=Coalesce(Sum("completion_tokens"), 0),
        )
    )
    result = [
        {
            by: row[column],
            "calls": row["calls"],
            "errors": row["errors"],
            "prompt_tokens": row["prompt_tokens"],
            "completion_tokens": row["completion_tokens"],
            "total_tokens": row["prompt_tokens"] + row["completion_tokens"],
        }
        for row in rows
    ]
    return sorted(result, key=lambda row: -row["total_tokens"])
