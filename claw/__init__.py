"""Claw. The Celery app is loaded on first use (`claw.celery_app`, `celery -A claw`) rather
than on import, so the parts that run on devices (claw.protocol, claw.device) import neither
Celery nor Django."""


def __getattr__(name: str):
    if name == "celery_app":
        from claw.celery import app

        return app
    raise AttributeError(f"module 'claw' has no attribute {name!r}")
