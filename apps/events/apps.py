from django.apps import AppConfig


class EventsConfig(AppConfig):
    name = "apps.events"
    label = "events"

    def ready(self) -> None:
        # Every Django process (web, worker, beat, commands) gets the configured Celery app
        # as the current one, so shared tasks enqueue on Claw's broker, never on a default.
        import claw.celery  # noqa: F401
