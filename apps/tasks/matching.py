"""Matching ready tasks to agents (the sweepers that return work to the pool are in
apps/tasks/failover.py).

`tasks_match` reads the ready queue and the available agents, ranks candidates, and claims
each task with `task_assign` (a compare-and-set on the task, a row lock on the agent), so
any number of matchers may run at once: a lost race is skipped, never doubled.
"""

from dataclasses import dataclass
from datetime import timedelta

from django.db.models import Count, Q
from django.utils import timezone

from apps.devices.models import Agent, AgentStatus
from apps.tasks.models import LIVE_ATTEMPT_STATUSES, Attempt, AttemptStatus, Task, TaskStatus
from apps.tasks.services import task_assign
from claw.errors import DomainError

DECLINE_EXCLUSION = timedelta(seconds=60)
MAX_CANDIDATES_RECORDED = 10


@dataclass
class Candidate:
    agent: Agent
    live: int

    @property
    def free(self) -> int:
        return self.agent.capacity - self.live

    @property
    def load(self) -> float:
        return self.live / self.agent.capacity


def _available_agents(group_id: int) -> list[Candidate]:
    agents = (
        Agent.objects.filter(
            group_id=group_id,
            status__in=[AgentStatus.ONLINE, AgentStatus.BUSY],
            device__revoked_at=None,
            device__draining=False,
        )
        .annotate(live=Count("attempts", filter=Q(attempts__status__in=LIVE_ATTEMPT_STATUSES)))
        .order_by("id")
    )
    return [Candidate(agent=a, live=a.live) for a in agents if a.live < a.capacity]


def _failed_devices(task_ids: list[int]) -> dict[int, set[int]]:
    """Devices whose attempts at each task failed or were lost: retries go elsewhere."""
    failed: dict[int, set[int]] = {}
    rows = Attempt.objects.filter(
        task_id__in=task_ids, status__in=[AttemptStatus.FAILED, AttemptStatus.LOST]
    ).values_list("task_id", "device_id")
    for task_id, device_id in rows:
        failed.setdefault(task_id, set()).add(device_id)
    return failed


def _recent_decliners(task_ids: list[int]) -> set[tuple[int, int]]:
    since = timezone.now() - DECLINE_EXCLUSION
    return set(
        Attempt.objects.filter(
            task_id__in=task_ids, status=AttemptStatus.DECLINED, ended_at__gte=since
        ).values_list("task_id", "agent_id")
    )


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
                    -round(c.agent.success_rate_for(toolkits), 3),
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
                "success_rate": round(c.agent.success_rate_for(toolkits), 3),
                "load": round(c.load, 3),
                "avoided_device": c.agent.device_id in avoid_devices,
            }
            for _, c in ranked[:MAX_CANDIDATES_RECORDED]
        ],
    }


def tasks_match(*, group_id: int, limit: int = 200) -> list[int]:
    """Assign the group's ready tasks (highest priority, then oldest first) to the best
    available agents. Returns the ids of the attempts offered."""
    candidates = _available_agents(group_id)
    if not candidates:
        return []
    now = timezone.now()
    ready = list(
        Task.objects.filter(group_id=group_id, status=TaskStatus.READY)
        .filter(Q(not_before__isnull=True) | Q(not_before__lte=now))
        .order_by("-priority", "created_at", "id")[:limit]
    )
    task_ids = [t.id for t in ready]
    failed_devices = _failed_devices(task_ids)
    decliners = _recent_decliners(task_ids)
    offered = []
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
        for _, candidate in ranked:
            try:
                attempt = task_assign(
                    task_id=task.id,
                    agent_id=candidate.agent.id,
                    choice=_choice(ranked, avoid, task.required_toolkits),
                )
            except DomainError as exc:
                if exc.code == "not_ready":
                    break  # another matcher took the task
                continue  # the agent changed meanwhile; try the next one
            candidate.live += 1
            offered.append(attempt.id)
            break
        if not any(c.free > 0 for c in candidates):
            break
    return offered


def groups_with_ready_tasks() -> list[int]:
    return list(
        Task.objects.filter(status=TaskStatus.READY).values_list("group_id", flat=True).distinct()
    )
