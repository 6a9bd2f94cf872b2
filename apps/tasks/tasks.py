"""Celery entry points for matching and lease sweeping: thin, id-taking, idempotent."""

from celery import shared_task

from apps.tasks.matching import tasks_match
from claw.maintenance import holder_name, maintenance_lead, match_everything, sweep_failures


@shared_task(name="claw.match_group", ignore_result=True, acks_late=True)
def match_group(group_id: int) -> int:
    return len(tasks_match(group_id=group_id))


# Beat's copies of the maintenance jobs (claw.maintenance): each runs only when it gets the
# maintenance lease, which normally a worker's maintainer thread holds.


@shared_task(name="claw.match_all", ignore_result=True)
def match_all() -> int:
    """The safety net: match every group that has ready tasks."""
    return match_everything() if maintenance_lead(holder_name("beat")) else 0


@shared_task(name="claw.sweep_leases", ignore_result=True)
def sweep_leases() -> int:
    """Silent agents first (their attempts go at once), then expired leases."""
    return sweep_failures() if maintenance_lead(holder_name("beat")) else 0


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
