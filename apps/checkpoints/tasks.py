"""Celery entry point for checkpoint expiry: thin and idempotent."""

from celery import shared_task

from apps.checkpoints.services import checkpoints_sweep_expired


@shared_task(name="claw.sweep_checkpoints", ignore_result=True)
def sweep_checkpoints() -> int:
    """Expire (or escalate) every pending checkpoint whose deadline passed."""
    return checkpoints_sweep_expired()
