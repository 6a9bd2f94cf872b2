"""Metering and budgets of the model gateway (apps.llm.gateway).

Every call that reached the backend is recorded after it ended: a ModelCall row, the
group's token counter (Group.llm_tokens_used) and an `llm.call` event, in one transaction
per group for a batch of calls (apps.llm.meter writes them off the request path). A group's
token budget (Group.llm_token_budget, null: unlimited) is checked before each call; the
batch that crosses 80 % appends an `llm.budget_alert`, the one that crosses 100 % another
and raises a `budget` checkpoint that humans approve with "+50%" or "+100%"; owners may
also set the budget outright (group_llm_budget_set).

The backend probe (apps.llm.probe, every CLAW_LLM_PROBE_SECONDS) is stored here too:
backend_probe_record keeps the time series and moves the backend's status (ok, saturated,
down) by compare-and-set; a change is an `llm.backend` event in every group, and when
the backend can take work again the groups with ready tasks are matched."""

import logging
import math
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.cache import cache
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from apps.checkpoints.models import Checkpoint, CheckpointKind, CheckpointSource, CheckpointStatus
from apps.events.broadcast import broadcast_on_commit
from apps.events.services import event_append, event_append_many
from apps.groups.models import Group, Role
from apps.groups.selectors import require_role
from apps.llm.models import Backend, BackendProbe, BackendStatus, ModelCall, ModelCallStatus
from apps.llm.probe import ProbeResult
from apps.llm.selectors import HOLDING, backend_state, backend_state_key
from claw import llm
from claw.errors import InvalidInput

logger = logging.getLogger(__name__)

ALERT_PERCENT = 80
# What approving a budget checkpoint raises the budget by, in percent.
BUDGET_OPTIONS = {"+50%": 50, "+100%": 100}
BUDGET_DEFAULT_OPTION = "+50%"
# After humans refused to raise the budget, refused calls do not ask again for this long.
REFUSED_BUDGET_QUIET = timedelta(hours=1)
# Error codes that say the backend itself is in trouble (for /healthz).
BACKEND_ERRORS = {"backend_unavailable", "backend_timeout", "backend_error"}


@dataclass
class CallRecord:
    """What the gateway knows about one finished call; model_calls_record stores it."""

    group_id: int
    device_id: int | None
    model: str
    stream: bool
    status: str
    http_status: int
    latency_ms: int
    created_at: datetime
    agent_id: int | None = None
    task_id: int | None = None
    attempt_id: int | None = None
    error_code: str = ""
    error: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _call_payload(call: ModelCall) -> dict:
    payload = {
        "call_id": call.id,
        "model": call.model,
        "status": call.status,
        "prompt_tokens": call.prompt_tokens,
        "completion_tokens": call.completion_tokens,
        "ttft_ms": call.ttft_ms,
        "latency_ms": call.latency_ms,
    }
    if call.error_code:
        payload["error_code"] = call.error_code
    return payload


def _add_tokens(group_id: int, tokens: int) -> tuple[int, int | None]:
    """Bump the group's counter; returns (used after, budget). Locks the group's row until
    commit, like event_append, so batches of one group count one at a time."""
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE groups_group SET llm_tokens_used = llm_tokens_used + %s WHERE id = %s "
            "RETURNING llm_tokens_used, llm_token_budget",
            [tokens, group_id],
        )
        row = cursor.fetchone()
    if row is None:
        raise ValueError(f"group {group_id} does not exist")
    return row[0], row[1]


def model_calls_record(*, records: list[CallRecord]) -> list[ModelCall]:
    """Store finished calls: per group one transaction with the rows, the token counter,
    one `llm.call` event per call and, where the batch crossed 80 % or 100 % of the budget,
    an `llm.budget_alert` (and at 100 % the budget checkpoint)."""
    stored: list[ModelCall] = []
    by_group: dict[int, list[CallRecord]] = {}
    for record in records:
        by_group.setdefault(record.group_id, []).append(record)
    for group_id, group_records in by_group.items():
        with transaction.atomic():
            calls = ModelCall.objects.bulk_create(
                ModelCall(
                    group_id=group_id,
                    device_id=r.device_id,
                    agent_id=r.agent_id,
                    task_id=r.task_id,
                    attempt_id=r.attempt_id,
                    model=r.model[:200],
                    stream=r.stream,
                    status=r.status,
                    http_status=r.http_status,
                    error_code=r.error_code[:50],
                    error=r.error[:500],
                    prompt_tokens=r.prompt_tokens,
                    completion_tokens=r.completion_tokens,
                    ttft_ms=r.ttft_ms,
                    latency_ms=r.latency_ms,
                    created_at=r.created_at,
                )
                for r in group_records
            )
            tokens = sum(r.tokens for r in group_records)
            alerts: list[dict] = []
            exhausted = False
            if tokens:
                used, budget = _add_tokens(group_id, tokens)
                before = used - tokens
                if budget is not None:
                    for percent in (ALERT_PERCENT, 100):
                        line = math.ceil(budget * percent / 100)
                        if before < line <= used:
                            alerts.append(
                                {
                                    "kind": "llm.budget_alert",
                                    "payload": {"percent": percent, "used": used, "budget": budget},
                                }
                            )
                    exhausted = before < budget <= used
            event_append_many(
                group_id=group_id,
                events=[
                    {
                        "kind": "llm.call",
                        "task_id": call.task_id,
                        "attempt_id": call.attempt_id,
                        "agent_id": call.agent_id,
                        "payload": _call_payload(call),
                    }
                    for call in calls
                ]
                + alerts,
            )
            if exhausted:
                _budget_checkpoint_raise(group_id)
        stored += calls
    llm_status_note(records=records)
    return stored


def _charge(*, group_id: int, usage: list[dict], task_id: int | None = None) -> None:
    """Charge model calls Claw made itself for a group (planning a goal, turning a document
    into a skill) to the group's token budget, as its agents' calls are: ModelCall rows
    without a device, the counter, `llm.call` events, the 80 % and 100 % alerts. `usage`
    is complete_validated's, one entry per call."""
    if not usage:
        return
    now = timezone.now()
    model_calls_record(
        records=[
            CallRecord(
                group_id=group_id,
                device_id=None,
                task_id=task_id,
                model=settings.CLAW_LLM_MODEL,
                stream=True,
                status=ModelCallStatus.OK,
                http_status=200,
                prompt_tokens=int(used.get("prompt_tokens") or 0),
                completion_tokens=int(used.get("completion_tokens") or 0),
                latency_ms=int(used.get("latency_ms") or 0),
                created_at=now,
            )
            for used in usage
        ]
    )


def budget_exhausted_message(used: int, budget: int) -> str:
    return (
        f"The group's model token budget is used up ({used:,} of {budget:,} tokens). The "
        "group's owners were asked to raise it (a budget checkpoint)."
    )


def _budget_refusal(*, group_id: int) -> str:
    """Why the group may not call the model now, having asked its owners to raise the
    budget; empty while it may. For Claw's own calls, which the gateway does not see."""
    used, budget = Group.objects.values_list("llm_tokens_used", "llm_token_budget").get(id=group_id)
    if budget is None or used < budget:
        return ""
    budget_exhausted_refuse(group_id=group_id)
    return budget_exhausted_message(used, budget)


def group_complete_validated(
    *, group_id: int, task_id: int | None = None, **ask
) -> tuple[Any, str, list[dict]]:
    """claw.llm.complete_validated for a call Claw makes itself for a group (planning a
    goal, turning a document into a skill): refused while the group's token budget is used
    up (the error says so; no model call), and charged to the budget afterwards."""
    refusal = _budget_refusal(group_id=group_id)
    if refusal:
        return None, refusal, []
    value, error, usage = llm.complete_validated(**ask)
    _charge(group_id=group_id, usage=usage, task_id=task_id)
    return value, error, usage


def _budget_asked(group_id: int) -> bool:
    """A budget checkpoint is pending, or humans refused one lately."""
    quiet_since = timezone.now() - REFUSED_BUDGET_QUIET
    return (
        Checkpoint.objects.filter(group_id=group_id, kind=CheckpointKind.BUDGET)
        .filter(
            Q(status=CheckpointStatus.PENDING)
            | Q(
                status__in=[CheckpointStatus.REJECTED, CheckpointStatus.EXPIRED],
                resolved_at__gte=quiet_since,
            )
        )
        .exists()
    )


def _budget_checkpoint_raise(group_id: int) -> Checkpoint | None:
    """Raise the budget checkpoint unless one is pending, or humans refused one lately.
    Runs in the caller's transaction with the group's row locked, so it is raised once."""
    from apps.checkpoints.services import checkpoint_raise

    if _budget_asked(group_id):
        return None
    group = Group.objects.get(id=group_id)
    return checkpoint_raise(
        group=group,
        title="The model token budget is used up",
        details=(
            f"The group's agents used {group.llm_tokens_used:,} of {group.llm_token_budget:,} "
            "model tokens; new model calls are refused until the budget is raised. Approve "
            "with an option to raise it."
        ),
        source=CheckpointSource.SYSTEM,
        kind=CheckpointKind.BUDGET,
        options=list(BUDGET_OPTIONS),
        decider_role="owner",
    )


def budget_exhausted_refuse(*, group_id: int) -> None:
    """A call was refused for an exhausted budget: make sure humans were asked (a cheap
    read first; the raise takes the group's row lock and checks again)."""
    if _budget_asked(group_id):
        return
    with transaction.atomic():
        group = Group.objects.select_for_update(no_key=True).get(id=group_id)
        if group.llm_token_budget is None or group.llm_tokens_used < group.llm_token_budget:
            return
        _budget_checkpoint_raise(group_id)


def group_llm_budget_raise(
    *, group_id: int, option: str, actor_id: int | None = None, checkpoint_id: int | None = None
) -> int | None:
    """Raise the group's token budget by an option like "+50%" (of the current budget, or
    of what was used when the budget was 0). Returns the new budget; None when the group
    has no budget (unlimited) any more. Called when a budget checkpoint is approved."""
    option = option if option in BUDGET_OPTIONS else BUDGET_DEFAULT_OPTION
    percent = BUDGET_OPTIONS[option]
    with transaction.atomic():
        group = Group.objects.select_for_update(no_key=True).get(id=group_id)
        old = group.llm_token_budget
        if old is None:
            return None
        base = old or group.llm_tokens_used
        new = old + math.ceil(base * percent / 100)
        Group.objects.filter(id=group_id).update(llm_token_budget=new)
        from apps.tasks.services import request_matching

        request_matching(group_id)  # tasks held for the budget may go
        event_append(
            group_id=group_id,
            kind="llm.budget_raised",
            actor_id=actor_id,
            payload={
                "from": old,
                "to": new,
                "option": option,
                "checkpoint_id": checkpoint_id,
            },
        )
    return new


BUDGET_MAX = 10**13


def group_llm_budget_set(
    *, actor: AbstractBaseUser, group_id: int, budget: int | None
) -> int | None:
    """An owner sets the group's token budget (None: unlimited). Appends `llm.budget_set`
    with the old and new budget. Calls refused for an exhausted budget go through again
    as soon as it is above what was used."""
    require_role(user=actor, group_id=group_id, role=Role.OWNER)
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, int) or not 0 <= budget <= BUDGET_MAX
    ):
        raise InvalidInput(f"The budget must be a whole number of tokens from 0 to {BUDGET_MAX}.")
    with transaction.atomic():
        group = Group.objects.select_for_update(no_key=True).get(id=group_id)
        old = group.llm_token_budget
        if old == budget:
            return budget
        Group.objects.filter(id=group_id).update(llm_token_budget=budget)
        from apps.tasks.services import request_matching

        request_matching(group_id)  # tasks held for the budget may go
        event_append(
            group_id=group_id,
            kind="llm.budget_set",
            actor_id=actor.pk,
            payload={"from": old, "to": budget, "used": group.llm_tokens_used},
        )
    return budget


# --- the backend's last known state, for /healthz ---------------------------------------


def _status_key() -> str:
    return f"llm:status:{settings.CLAW_LLM_BASE_URL}"


def llm_status_note(*, records: list[CallRecord]) -> None:
    """Remember the backend's state from the last call that says something about it (an
    answer, or a backend failure; not an agent that went away or a refusal)."""
    telling = [
        r for r in records if r.status == ModelCallStatus.OK or r.error_code in BACKEND_ERRORS
    ]
    if not telling:
        return
    last = max(telling, key=lambda r: r.created_at)
    state = {
        "reachable": last.status == ModelCallStatus.OK,
        "last_call_at": last.created_at.isoformat(),
        "last_error": None if last.status == ModelCallStatus.OK else last.error[:300],
    }
    try:
        cache.set(_status_key(), state, timeout=None)
    except Exception:
        logger.warning("could not store the model backend's state", exc_info=True)


def llm_status() -> dict:
    """configured / status / reachable / last error, never calling the backend, so
    /healthz stays fast. While the probe runs, its status (apps.llm.selectors.backend_state,
    which the banner and the matcher read too) decides `reachable`: saturated is reachable,
    down is not. Without a recent probe, `reachable` is what the last call showed (None:
    no call yet)."""
    if not settings.CLAW_LLM_BASE_URL:
        return {"configured": False, "status": "unknown", "reachable": None, "last_error": None}
    try:
        state = cache.get(_status_key()) or {}
    except Exception as exc:
        state = {"last_error": f"state unavailable: {type(exc).__name__}"}
    backend = backend_state()
    reachable, last_error = state.get("reachable"), state.get("last_error")
    if backend.status != BackendStatus.UNKNOWN:
        reachable = backend.status != BackendStatus.DOWN
        if not reachable:
            last_error = backend.error or "the probe found the backend down"
    return {
        "configured": True,
        "model": settings.CLAW_LLM_MODEL,
        "status": backend.status,
        "status_since": backend.since.isoformat() if backend.since else None,
        "probed_at": backend.probed_at.isoformat() if backend.probed_at else None,
        "reachable": reachable,
        "last_call_at": state.get("last_call_at"),
        "last_error": last_error,
    }


# --- the backend probe -----------------------------------------------------------------

# Probes older than this are deleted by the probe itself.
PROBE_KEEP = timedelta(hours=24)
# The channel-layer group of pages that redraw on every probe (apps.dashboard.live).
BACKEND_CHANNEL = "llm.backend"
# Leaving saturation takes clearly lower numbers than entering it, so a backend hovering at
# a threshold does not flip (and tell every group) on every probe.
SATURATED_QUEUE_EXIT = 0.5
SATURATED_KV_EXIT = 0.05


def backend_status_of(*, result: ProbeResult, previous: str) -> str:
    """down when /health failed; saturated when the queue or the KV cache is over its
    threshold (settings CLAW_LLM_SATURATED_*), with hysteresis; else ok."""
    if not result.healthy:
        return BackendStatus.DOWN
    queue_limit = settings.CLAW_LLM_SATURATED_QUEUE
    kv_limit = settings.CLAW_LLM_SATURATED_KV
    if previous == BackendStatus.SATURATED:
        queue_limit = math.floor(queue_limit * SATURATED_QUEUE_EXIT)
        kv_limit -= SATURATED_KV_EXIT
    if result.queued is not None and result.queued > queue_limit:
        return BackendStatus.SATURATED
    if result.kv_usage is not None and result.kv_usage > kv_limit:
        return BackendStatus.SATURATED
    return BackendStatus.OK


def _ttft_ms(backend: Backend, result: ProbeResult) -> float | None:
    """The mean TTFT of the requests since the last probe that saw the histogram (the
    backend's sum and count are cumulative); since the backend started when there is no
    such probe or the counters went back (a restart). None: no request in between."""
    if result.ttft_sum_s is None or result.ttft_count is None:
        return None
    last = (
        BackendProbe.objects.filter(backend=backend)
        .exclude(ttft_count=None)
        .order_by("-at", "-id")
        .values_list("ttft_sum_s", "ttft_count")
        .first()
    )
    total_s, count = result.ttft_sum_s, result.ttft_count
    if last is not None and last[1] <= count and last[0] <= total_s:
        total_s, count = total_s - last[0], count - last[1]
    return round(1000 * total_s / count, 1) if count > 0 else None


def backend_probe_record(
    *, base_url: str, result: ProbeResult, at: datetime | None = None
) -> BackendProbe:
    """Store one probe: the row, the backend's status moved by compare-and-set, probes
    older than PROBE_KEEP deleted. After commit: the cached state is dropped, pages that
    follow the backend redraw and, when it can take work again (it was down or saturated),
    the groups with ready tasks are matched. A status change is then announced as an
    `llm.backend` event in every group (one short transaction each, so no group waits on
    the others); a first `ok` is not news."""
    from apps.tasks.matching import groups_with_ready_tasks
    from apps.tasks.services import request_matching

    at = at or timezone.now()
    error = result.error[:500]
    with transaction.atomic():
        backend, _ = Backend.objects.get_or_create(base_url=base_url, defaults={"status_since": at})
        old = backend.status
        new = backend_status_of(result=result, previous=old)
        probe = BackendProbe.objects.create(
            backend=backend,
            at=at,
            status=new,
            latency_ms=result.latency_ms,
            model_id=result.model_id[:200],
            context_length=result.context_length,
            running=result.running,
            queued=result.queued,
            gen_throughput=result.gen_throughput,
            ttft_ms=_ttft_ms(backend, result),
            kv_usage=result.kv_usage,
            cache_hit_rate=result.cache_hit_rate,
            ttft_sum_s=result.ttft_sum_s,
            ttft_count=result.ttft_count,
            error=error,
        )
        changed = (
            new != old
            and Backend.objects.filter(id=backend.id, status=old).update(
                status=new, status_since=at, probed_at=at, error=error
            )
            == 1
        )
        if not changed:  # the same status, or another probe moved it first
            Backend.objects.filter(id=backend.id).update(probed_at=at, error=error)
        BackendProbe.objects.filter(backend=backend, at__lt=at - PROBE_KEEP).delete()
        key = backend_state_key(base_url)
        transaction.on_commit(lambda: cache.delete(key), robust=True)
        if changed and old in HOLDING and new not in HOLDING:
            for group_id in groups_with_ready_tasks():
                request_matching(group_id)
        broadcast_on_commit(BACKEND_CHANNEL, {"type": "live.redraw", "source": "backend.probe"})
    if changed and not (old == BackendStatus.UNKNOWN and new == BackendStatus.OK):
        _backend_status_announce(old=old, new=new, error=error)
    return probe


def _backend_status_announce(*, old: str, new: str, error: str) -> None:
    payload = {"status": new, "from": old}
    if error and new == BackendStatus.DOWN:
        payload["error"] = error[:300]
    for group_id in Group.objects.order_by("id").values_list("id", flat=True):
        try:
            with transaction.atomic():
                event_append(group_id=group_id, kind="llm.backend", payload=payload)
        except Exception:  # a group deleted meanwhile; the others are still told
            logger.warning("could not tell group %s about the backend", group_id, exc_info=True)
