"""Celery entry points for matching and lease sweeping: thin, id-taking, idempotent."""

from celery import shared_task

from apps.tasks.failover import agents_sweep_silent, attempts_sweep_expired
from apps.tasks.matching import groups_with_ready_tasks, tasks_match
from claw.metrics import SWEEP_SECONDS


@shared_task(name="claw.match_group", ignore_result=True, acks_late=True)
def match_group(group_id: int) -> int:
    return len(tasks_match(group_id=group_id))


@shared_task(name="claw.match_all", ignore_result=True)
def match_all() -> int:
    """The safety net: match every group that has ready tasks."""
    return sum(len(tasks_match(group_id=group_id)) for group_id in groups_with_ready_tasks())


@shared_task(name="claw.sweep_leases", ignore_result=True)
@SWEEP_SECONDS.time()
def sweep_leases() -> int:
    """Silent agents first (their attempts go at once), then expired leases."""
    return agents_sweep_silent() + attempts_sweep_expired()


@shared_task(
    name="claw.plan_task",
    ignore_result=True,
    acks_late=True,
    soft_time_limit=1200,
    time_limit=1260,
)
def plan_task(task_id: int, request_id: int) -> str:
    """Make the plan for one request (apps.tasks.planner): idempotent per request. Its
    time limits cover two long model calls (a retry with the validation error)."""
    from apps.tasks.planner import plan_generate

    return plan_generate(task_id=task_id, request_id=request_id)
