"""Matching ready tasks to agents (the sweepers that return work to the pool are in
apps/tasks/failover.py).

`tasks_match` reads the available agents and the ready queue, ranks candidates, and claims
its whole batch with `tasks_assign_many` (compare-and-set on the tasks, capacity counted
under the agents' row locks), so any number of matchers may run at once: a lost race is
skipped, never doubled.
"""

import asyncio
import json
import logging
from dataclasses import dataclass, field
from datetime import timedelta

from channels.db import database_sync_to_async
from django.db import connection, transaction
from django.db.models import BooleanField, Count, Exists, F, OuterRef, Q, Subquery
from django.db.models.expressions import RawSQL
from django.db.models.functions import Coalesce
from django.utils import timezone

from apps.devices.models import Agent, AgentStatus
from apps.events.broadcast import server_loop
from apps.llm.selectors import backend_holds_llm
from apps.tasks.models import LIVE_ATTEMPT_STATUSES, Attempt, AttemptStatus, Task, TaskStatus
from apps.tasks.services import tasks_assign_many
from claw.errors import DomainError
from claw.metrics import MATCH_SECONDS, assignments_observe

logger = logging.getLogger(__name__)

DECLINE_EXCLUSION = timedelta(seconds=60)
# A "busy" decline says the agent was full when the offer came (its count of free slots
# lagged the server's), not that it cannot do the task: it may have it again shortly,
# once it has had time to catch up, so an offer does not bounce back and forth.
BUSY_DECLINE_EXCLUSION = timedelta(seconds=2)
BUSY_DECLINE = "busy"
MAX_CANDIDATES_RECORDED = 10
# The toolkit of tasks a model works on: held while the model backend is down or saturated.
LLM_TOOLKIT = "llm"


@dataclass
class Candidate:
    agent: Agent
    live: int
    rates: dict[tuple[str, ...], float] = field(default_factory=dict)

    def rate(self, toolkits: list[str]) -> float:
        """The agent's track record for these toolkits, rounded (computed once per call)."""
        key = tuple(toolkits)
        if key not in self.rates:
            self.rates[key] = round(self.agent.success_rate_for(toolkits), 3)
        return self.rates[key]

    @property
    def free(self) -> int:
        return self.agent.capacity - self.live

    @property
    def load(self) -> float:
        return self.live / self.agent.capacity


def _available_agents(group_id: int, agent_id: int | None = None) -> list[Candidate]:
    only = {"id": agent_id} if agent_id is not None else {}
    # Live attempts only (the (agent, status) index), not every attempt the agents ever had.
    # Read without locks: tasks_assign_many counts again under the agents' row locks.
    live = (
        Attempt.objects.filter(agent_id=OuterRef("id"), status__in=LIVE_ATTEMPT_STATUSES)
        .order_by()
        .values("agent_id")
        .annotate(n=Count("id"))
        .values("n")
    )
    agents = (
        Agent.objects.filter(
            **only,
            group_id=group_id,
            status__in=[AgentStatus.ONLINE, AgentStatus.BUSY],
            device__revoked_at=None,
            device__draining=False,
        )
        .defer("tool_schemas")
        .annotate(live=Coalesce(Subquery(live), 0))
        .order_by("id")
    )
    candidates = [Candidate(agent=a, live=a.live) for a in agents]
    return [c for c in candidates if c.free > 0]


def _history(task_ids: list[int]) -> tuple[dict[int, set[int]], set[tuple[int, int]]]:
    """For each task, the devices whose attempts at it failed or were lost (retries go
    elsewhere), and the (task, agent) pairs declined in the last DECLINE_EXCLUSION."""
    now = timezone.now()
    failed: dict[int, set[int]] = {}
    decliners: set[tuple[int, int]] = set()
    rows = Attempt.objects.filter(
        task_id__in=task_ids,
        status__in=[AttemptStatus.FAILED, AttemptStatus.LOST, AttemptStatus.DECLINED],
    ).values_list("task_id", "device_id", "agent_id", "status", "ended_at", "failure_reason")
    for task_id, device_id, agent_id, status, ended_at, reason in rows:
        if status != AttemptStatus.DECLINED:
            failed.setdefault(task_id, set()).add(device_id)
        elif ended_at is not None and ended_at >= now - _decline_exclusion(reason):
            decliners.add((task_id, agent_id))
    return failed, decliners


def _decline_exclusion(reason: str) -> timedelta:
    busy = reason.split(":", 1)[0] == BUSY_DECLINE
    return BUSY_DECLINE_EXCLUSION if busy else DECLINE_EXCLUSION


def _rank(
    candidates: list[Candidate], avoid_devices: set[int], toolkits: list[str]
) -> list[tuple[tuple, Candidate]]:
    """Best first: another device than earlier failures, then track record (with the
    task's toolkits where known), then load."""
    return sorted(
        (
            (
                (
                    c.agent.device_id in avoid_devices,
                    -c.rate(toolkits),
                    round(c.load, 3),
                    c.agent.id,
                ),
                c,
            )
            for c in candidates
        ),
        key=lambda pair: pair[0],
    )


def _choice(
    ranked: list[tuple[tuple, Candidate]], avoid_devices: set[int], toolkits: list[str]
) -> dict:
    best = ranked[0][1]
    reasons = []
    if avoid_devices:
        reasons.append("on another device than the failed attempts")
    if len(ranked) > 1:
        reasons.append(f"best of {len(ranked)} capable agents by track record, then load")
    else:
        reasons.append("the only capable agent with free capacity")
    return {
        "reason": "; ".join(reasons),
        "chosen": best.agent.id,
        "candidates": [
            {
                "agent_id": c.agent.id,
                "name": c.agent.name,
                "device_id": c.agent.device_id,
                "success_rate": c.rate(toolkits),
                "load": round(c.load, 3),
                "avoided_device": c.agent.device_id in avoid_devices,
            }
            for _, c in ranked[:MAX_CANDIDATES_RECORDED]
        ],
    }


def _plan(ready: list[Task], candidates: list[Candidate]) -> list[tuple[int, int, dict]]:
    """(task id, agent id, choice) for each ready task some candidate can take, best agent
    first, counting each offer against the agent's free capacity as it goes."""
    failed_devices, decliners = _history([t.id for t in ready])
    plan = []
    free = sum(c.free for c in candidates)
    for task in ready:
        capable = [
            c
            for c in candidates
            if c.free > 0
            and all(slug in c.agent.toolkits for slug in task.required_toolkits)
            and (task.id, c.agent.id) not in decliners
        ]
        if not capable:
            continue
        avoid = failed_devices.get(task.id, set())
        ranked = _rank(capable, avoid, task.required_toolkits)
        best = ranked[0][1]
        plan.append((task.id, best.agent.id, _choice(ranked, avoid, task.required_toolkits)))
        best.live += 1
        free -= 1
        if free <= 0:
            break
    return plan


def _requires_toolkit(slug: str) -> Q | RawSQL:
    """A condition on tasks: `slug` is among its required toolkits (a JSON list)."""
    if connection.vendor == "postgresql":
        return Q(required_toolkits__contains=[slug])
    # SQLite has no JSON containment lookup; json_each reads the list.
    return RawSQL(
        "EXISTS (SELECT 1 FROM json_each(tasks_task.required_toolkits) WHERE value = %s)",
        [slug],
        output_field=BooleanField(),
    )


def _group_budget_spent() -> Q:
    """A condition on tasks: their group's model token budget is used up (the gateway
    refuses its calls until an owner raises it)."""
    return Q(
        group__llm_token_budget__isnull=False,
        group__llm_tokens_used__gte=F("group__llm_token_budget"),
    )


def _covered_by(toolkits: list[str]) -> Q | RawSQL:
    """A condition on tasks: every toolkit they require is among `toolkits`."""
    if connection.vendor == "postgresql":
        return Q(required_toolkits__contained_by=toolkits)
    return RawSQL(
        "NOT EXISTS (SELECT 1 FROM json_each(tasks_task.required_toolkits) "
        "WHERE value NOT IN (SELECT value FROM json_each(%s)))",
        [json.dumps(toolkits)],
        output_field=BooleanField(),
    )


def _recently_declined_by(agent_id: int) -> Exists:
    now = timezone.now()
    busy = Q(failure_reason=BUSY_DECLINE) | Q(failure_reason__startswith=f"{BUSY_DECLINE}:")
    return Exists(
        Attempt.objects.filter(
            task_id=OuterRef("id"), agent_id=agent_id, status=AttemptStatus.DECLINED
        ).filter(
            (~busy & Q(ended_at__gte=now - DECLINE_EXCLUSION))
            | (busy & Q(ended_at__gte=now - BUSY_DECLINE_EXCLUSION))
        )
    )


@MATCH_SECONDS.time()
def tasks_match(*, group_id: int, limit: int = 200, agent_id: int | None = None) -> list[int]:
    """Assign the group's ready tasks (highest priority, then oldest first) to the best
    available agents (or only to `agent_id`). Returns the ids of the attempts offered.

    One transaction per call: the ready tasks are locked as they are read, skipping those
    another matcher holds (so matchers running at once take different tasks instead of
    racing for the same ones), then `tasks_assign_many` claims them all.

    While the model backend is down or saturated (apps.llm.selectors.backend_holds_llm: a
    cached read), or the group's token budget is used up, tasks that need the `llm` toolkit
    are left out: they stay ready, nothing fails, and the probe (or raising the budget)
    asks for matching when the model can take work again.

    Matching one agent reads and locks only the tasks it could take, no more of them than
    its free capacity: the rest of the queue stays free for other matchers."""
    candidates = _available_agents(group_id, agent_id)
    if not candidates:
        return []
    now = timezone.now()
    with transaction.atomic():
        ready = (
            Task.objects.select_for_update(skip_locked=True, no_key=True, of=("self",))
            .defer("instructions", "steps", "result")
            .filter(group_id=group_id, status=TaskStatus.READY)
            .filter(Q(not_before__isnull=True) | Q(not_before__lte=now))
        )
        if backend_holds_llm():
            ready = ready.exclude(_requires_toolkit(LLM_TOOLKIT))
        else:
            ready = ready.exclude(_requires_toolkit(LLM_TOOLKIT) & _group_budget_spent())
        if agent_id is not None:
            [only] = candidates
            ready = ready.filter(_covered_by(list(only.agent.toolkits))).exclude(
                _recently_declined_by(agent_id)
            )
            limit = min(limit, only.free)
        ready = list(ready.order_by("-priority", "created_at", "id")[:limit])
        plan = _plan(ready, candidates)
        try:
            attempts = tasks_assign_many(
                group_id=group_id,
                offers=plan,
                locked_tasks={t.id: (t.epoch, t.required_toolkits) for t in ready},
            )
        except DomainError:
            return []  # the batch rolled back; its tasks stay ready for the next round
    assignments_observe(ready=ready, attempts=attempts)
    return [attempt.id for attempt in attempts]


def request_matching_for_agent(group_id: int, agent_id: int, *, whole_group: bool) -> None:
    """An agent freed capacity (its attempt ended): once this transaction commits, match
    that agent here and now, through the same claim as the matcher, instead of waiting for
    a Celery worker to pick the group up (enqueue, worker, match: ~100 ms more). If that
    fails, or the change also readied work others may take (`whole_group`), the group is
    matched through Celery as before; the periodic match_all still backs both."""
    from apps.tasks.services import request_matching

    def match_agent() -> None:
        try:
            tasks_match(group_id=group_id, agent_id=agent_id)
        except Exception:
            logger.warning(
                "matching agent %s failed; leaving it to a worker", agent_id, exc_info=True
            )
            if not whole_group:
                request_matching(group_id)  # outside a transaction: enqueued now

    def after_commit() -> None:
        loop = server_loop()
        if loop is None:
            match_agent()
            return
        # In a server's worker thread, answering the agent's own frame (complete, fail,
        # decline): the answer goes out now and the match runs beside it, so the ack does
        # not wait for the next offer. The socket handles the offer's push after the ack.
        asyncio.run_coroutine_threadsafe(
            database_sync_to_async(match_agent, thread_sensitive=False)(), loop
        )

    transaction.on_commit(after_commit, robust=True)
    if whole_group:
        request_matching(group_id)


def groups_with_ready_tasks() -> list[int]:
    return list(
        Task.objects.filter(status=TaskStatus.READY).values_list("group_id", flat=True).distinct()
    )
