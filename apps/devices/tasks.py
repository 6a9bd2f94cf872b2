"""Celery entry points of the devices app: thin, id-taking, idempotent."""

from celery import shared_task


@shared_task(
    name="claw.skill_generate",
    ignore_result=True,
    acks_late=True,
    soft_time_limit=1200,
    time_limit=1260,
)
def skill_generate_task(skill_id: int) -> str:
    """Make one skill version from its document (apps.devices.skills): idempotent per
    version. Its time limits cover two long model calls (a retry with the validation
    error)."""
    from apps.devices.skills import skill_generate

    return skill_generate(skill_id=skill_id)
