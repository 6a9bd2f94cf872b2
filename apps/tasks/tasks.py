"""Celery entry points for matching and lease sweeping: thin, id-taking, idempotent."""

from celery import shared_task

from apps.tasks.failover import agents_sweep_silent, attempts_sweep_expired
from apps.tasks.matching import groups_with_ready_tasks, tasks_match


@shared_task(name="claw.match_group", ignore_result=True, acks_late=True)
def match_group(group_id: int) -> int:
    return len(tasks_match(group_id=group_id))


@shared_task(name="claw.match_all", ignore_result=True)
def match_all() -> int:
    """The safety net: match every group that has ready tasks."""
    return sum(len(tasks_match(group_id=group_id)) for group_id in groups_with_ready_tasks())


@shared_task(name="claw.sweep_leases", ignore_result=True)
def sweep_leases() -> int:
    """Silent agents first (their attempts go at once), then expired leases."""
    return agents_sweep_silent() + attempts_sweep_expired()
