from django.apps import AppConfig


class EventsConfig(AppConfig):
    name = "apps.events"
    label = "events"

    def ready(self) -> None:
        # Every Django process (web, worker, beat, commands) gets Claw's Celery app as the
        # current one with all its tasks registered, so work enqueued anywhere goes to
        # Claw's broker by name, never to a default app.
        import apps.checkpoints.tasks
        import apps.events.tasks
        import apps.tasks.tasks  # noqa: F401
        import claw.celery  # noqa: F401
