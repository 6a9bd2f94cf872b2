from celery import shared_task

from apps.events.services import process_beat_record


@shared_task(bind=True, name="claw.beat_tick", ignore_result=True)
def beat_tick(self) -> None:
    """Scheduled by beat every few seconds; running it proves beat and a worker are alive."""
    process_beat_record(name="beat")
    process_beat_record(name=f"worker:{self.request.hostname}")
