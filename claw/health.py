"""GET /healthz: the state of every component, as JSON. 200 when all are ok, else 503."""

import asyncio
import uuid
from datetime import timedelta

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.utils import timezone

from apps.events.models import ProcessBeat
from apps.llm.services import llm_status
from claw.celery import app as celery_app


def _check(fn) -> dict:
    try:
        return {"ok": True, **(fn() or {})}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:300]}


def _database() -> dict:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return {"engine": connection.vendor}


# How long each Redis check may take: a monitor polls /healthz with a timeout of its own,
# and a Redis that is down must read as down, not as a /healthz that does not answer.
REDIS_TIMEOUT_S = 1.0


async def _layer_roundtrip() -> None:
    layer = get_channel_layer()
    channel = await layer.new_channel()
    token = uuid.uuid4().hex
    await layer.send(channel, {"type": "health.ping", "token": token})
    message = await layer.receive(channel)
    if message.get("token") != token:
        raise RuntimeError("channel layer returned a different message")


def _channel_layer() -> dict:
    try:
        async_to_sync(asyncio.wait_for)(_layer_roundtrip(), REDIS_TIMEOUT_S)
    except TimeoutError:
        raise TimeoutError(f"no round trip within {REDIS_TIMEOUT_S}s") from None
    return {"backend": settings.CHANNEL_LAYERS["default"]["BACKEND"].rsplit(".", 1)[-1]}


def _broker() -> dict:
    # One attempt, no retry: kombu sleeps 2 s before its first retry.
    timeouts = {"socket_connect_timeout": REDIS_TIMEOUT_S, "socket_timeout": REDIS_TIMEOUT_S}
    with celery_app.connection_for_write(transport_options=timeouts) as conn:
        conn.ensure_connection(max_retries=0)
        return {
            "transport": conn.transport_cls if isinstance(conn.transport_cls, str) else "memory"
        }


def _stale_after() -> timedelta:
    return timedelta(seconds=max(3 * settings.CELERY_BEAT_TICK_SECONDS, 15))


def _workers() -> dict:
    cutoff = timezone.now() - _stale_after()
    names = list(
        ProcessBeat.objects.filter(
            name__startswith="worker:", last_seen_at__gte=cutoff
        ).values_list("name", flat=True)
    )
    if not names:
        raise RuntimeError("no worker has run the beat tick recently")
    return {"seen": [n.removeprefix("worker:") for n in names]}


def _beat() -> dict:
    beat = ProcessBeat.objects.filter(name="beat").first()
    if beat is None:
        raise RuntimeError("beat has not ticked yet")
    age = (timezone.now() - beat.last_seen_at).total_seconds()
    if age > _stale_after().total_seconds():
        raise RuntimeError(f"beat's last tick was {age:.0f}s ago")
    return {"last_tick": beat.last_seen_at.isoformat(), "age_s": round(age, 1)}


def _llm() -> dict:
    """The model backend as the probe (or, without a recent probe, the gateway) last saw it
    (apps.llm.services.llm_status): never a call to the backend, so /healthz stays fast.
    Advisory: a backend that is down makes this entry not ok but leaves /healthz at 200,
    since the server itself is fine; saturated is ok, with its status."""
    status = llm_status()
    if status["configured"] and status["reachable"] is False:
        return {**status, "ok": False, "error": status["last_error"] or "unreachable"}
    return status


# Reported, but not part of the overall status.
ADVISORY = {"llm"}


def healthz(request: HttpRequest) -> JsonResponse:
    components = {
        "database": _check(_database),
        "channel_layer": _check(_channel_layer),
        "broker": _check(_broker),
        "workers": _check(_workers),
        "beat": _check(_beat),
        "llm": _check(_llm),
    }
    ok = all(c["ok"] for name, c in components.items() if name not in ADVISORY)
    body = {
        "status": "ok" if ok else "degraded",
        "mode": "embedded" if settings.EMBEDDED else "services",
        "components": components,
    }
    return JsonResponse(body, status=200 if ok else 503)
