"""Celery entry point of the backend probe: scheduled by beat every CLAW_LLM_PROBE_SECONDS
(claw.celery), idempotent (each run stores one probe; the status moves by compare-and-set),
and bounded: each of its three GETs gives up after CLAW_LLM_PROBE_TIMEOUT_S, and the task's
own time limits stop anything else."""

from celery import shared_task
from django.conf import settings

from apps.llm.probe import probe
from apps.llm.services import backend_probe_record


@shared_task(name="claw.probe_backend", ignore_result=True, soft_time_limit=30, time_limit=45)
def probe_backend() -> str:
    """Probe the configured backend and store what it saw; returns the status."""
    if not (settings.CLAW_LLM_BASE_URL and settings.CLAW_LLM_PROBE_SECONDS):
        return "off"
    result = probe(
        base_url=settings.CLAW_LLM_BASE_URL,
        api_key=settings.CLAW_LLM_API_KEY,
        model=settings.CLAW_LLM_MODEL,
        timeout=settings.CLAW_LLM_PROBE_TIMEOUT_S,
    )
    return backend_probe_record(base_url=settings.CLAW_LLM_BASE_URL, result=result).status
