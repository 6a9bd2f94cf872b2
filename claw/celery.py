import os

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "claw.settings")

app = Celery("claw")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(
    ["apps.events", "apps.tasks", "apps.devices", "apps.checkpoints", "apps.llm"]
)


@app.on_after_finalize.connect
def schedule_periodic_tasks(sender: Celery, **kwargs) -> None:
    from django.conf import settings

    sender.add_periodic_task(
        settings.CELERY_BEAT_TICK_SECONDS, sender.signature("claw.beat_tick"), name="beat tick"
    )
    # The maintenance jobs run in the workers' maintainer threads (claw.maintenance), which
    # do not need beat; these copies run only when no maintainer holds the lease. Leases are
    # checked every second; matching normally runs on commit, and match_all is its safety net.
    sender.add_periodic_task(1.0, sender.signature("claw.sweep_leases"), name="sweep leases")
    sender.add_periodic_task(2.0, sender.signature("claw.match_all"), name="match all groups")
    sender.add_periodic_task(
        5.0, sender.signature("claw.sweep_checkpoints"), name="sweep checkpoints"
    )
    if settings.CLAW_LLM_PROBE_SECONDS:
        # The model backend probe (a no-op in the worker when no backend is configured, so
        # beat needs no model settings). A probe that waited past its turn is dropped; its
        # limits cover three timed-out GETs and the announcement of a status change.
        every = settings.CLAW_LLM_PROBE_SECONDS
        soft = 3 * settings.CLAW_LLM_PROBE_TIMEOUT_S + 20
        sender.add_periodic_task(
            every,
            sender.signature("claw.probe_backend"),
            name="probe the model backend",
            expires=every,
            soft_time_limit=soft,
            time_limit=soft + 15,
        )


@signals.worker_ready.connect
def start_maintainer(**kwargs) -> None:
    """Every worker contends for the maintenance lease (claw.maintenance), so failure
    detection goes on with beat, or any one worker, down."""
    from claw.maintenance import maintainer_start

    maintainer_start()


@signals.worker_shutdown.connect
def stop_maintainer(**kwargs) -> None:
    from claw.maintenance import maintainer_stop

    maintainer_stop()
