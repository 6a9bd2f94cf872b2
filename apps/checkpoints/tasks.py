"""Celery entry point for checkpoint expiry: thin and idempotent."""

from celery import shared_task

from claw.maintenance import holder_name, maintenance_lead
from claw.maintenance import sweep_checkpoints as checkpoints_sweep


@shared_task(name="claw.sweep_checkpoints", ignore_result=True)
def sweep_checkpoints() -> int:
    """Expire (or escalate) every pending checkpoint whose deadline passed (beat's copy of
    the maintenance job: only when it gets the maintenance lease)."""
    return checkpoints_sweep() if maintenance_lead(holder_name("beat")) else 0
