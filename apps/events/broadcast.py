"""The one way services push live updates: high-level messages to channel-layer groups,
sent only after the surrounding transaction commits. The channel layer is a best-effort
pipe; the database stays the truth and live views resync from it."""

import asyncio
import logging
import os
import threading
import weakref

from asgiref.sync import SyncToAsync
from channels.layers import get_channel_layer
from django.db import transaction

logger = logging.getLogger(__name__)


def group_channel(group_id: int) -> str:
    return f"group.{group_id}"


def agent_channel(agent_id: int) -> str:
    return f"agent.{agent_id}"


def device_channel(device_id: int) -> str:
    return f"device.{device_id}"


def server_loop() -> asyncio.AbstractEventLoop | None:
    """The running event loop of the ASGI server (Daphne) whose worker thread this is, if
    it is one (a consumer's database_sync_to_async call); None in Celery, commands, tests."""
    loop = getattr(SyncToAsync.threadlocal, "main_event_loop", None)
    if getattr(SyncToAsync.threadlocal, "main_event_loop_pid", None) != os.getpid():
        return None
    return loop if loop is not None and loop.is_running() else None


SEND_TIMEOUT_S = 10
LAYER_CONCURRENCY = 50
_sender: tuple[int, asyncio.AbstractEventLoop] | None = None
_sender_lock = threading.Lock()


def sender_loop() -> asyncio.AbstractEventLoop:
    """This process's broadcasting loop, for threads that have no server loop (Celery
    workers, commands): one long-lived loop in a daemon thread, so the channel layer keeps
    its Redis connections instead of opening them for a new loop on every send."""
    global _sender
    with _sender_lock:
        if _sender is None or _sender[0] != os.getpid():  # none yet, or a forked child
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="claw-broadcast", daemon=True).start()
            _sender = (os.getpid(), loop)
        return _sender[1]


_loop_lanes: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore]" = (
    weakref.WeakKeyDictionary()
)


def layer_lanes() -> asyncio.Semaphore:
    """At most LAYER_CONCURRENCY channel-layer calls at once on this loop, for the calls
    that come in bursts (sends, and the group_discards of sockets closing): a server does
    not wait for its sends, so without a bound thousands of sockets closing at once (each
    recording an event and leaving its groups) would take every connection of the layer's
    pool and see "Too many connections"."""
    loop = asyncio.get_running_loop()
    if loop not in _loop_lanes:
        _loop_lanes[loop] = asyncio.Semaphore(LAYER_CONCURRENCY)
    return _loop_lanes[loop]


def send_now(channel_group: str, message: dict) -> None:
    send_many_now([(channel_group, message)])


def send_many_now(messages: list[tuple[str, dict]]) -> None:
    """Send several messages in one hop to an event loop, each channel group's in order
    (a group_send is a few Redis round trips, so a matcher's offers to many agents go
    several groups at a time, on the loop's lasting connections). From a server's
    worker thread they are handed to the server's loop without waiting: the thread (a
    socket's database call) goes on while the loop talks to Redis. Elsewhere they go
    through this process's sender loop, and the call waits until they are sent."""
    layer = get_channel_layer()
    if layer is None or not messages:
        return

    by_group: dict[str, list[dict]] = {}
    for channel_group, message in messages:
        by_group.setdefault(channel_group, []).append(message)

    async def send_all() -> None:
        from apps.events.layer import layer_outage

        lanes = layer_lanes()

        async def send_group(channel_group: str, group_messages: list[dict]) -> None:
            for message in group_messages:
                try:
                    async with lanes:
                        await layer.group_send(channel_group, message)
                except Exception:
                    outage = layer_outage(layer)
                    if not outage.ongoing:  # else logged once, when it began
                        logger.warning(
                            "broadcast to %s failed; live views will resync",
                            channel_group,
                            exc_info=True,
                        )
                    outage.report()

        await asyncio.gather(*(send_group(cg, ms) for cg, ms in by_group.items()))

    loop = server_loop()
    try:
        if loop is not None:
            asyncio.run_coroutine_threadsafe(send_all(), loop)
        else:
            asyncio.run_coroutine_threadsafe(send_all(), sender_loop()).result(SEND_TIMEOUT_S)
    except Exception:
        logger.warning("broadcast of %d messages failed", len(messages), exc_info=True)


def broadcast_on_commit(channel_group: str, message: dict) -> None:
    transaction.on_commit(lambda: send_now(channel_group, message), robust=True)


def broadcast_many_on_commit(messages: list[tuple[str, dict]]) -> None:
    """broadcast_on_commit for a batch: one hook, one hop, same order."""
    if messages:
        transaction.on_commit(lambda: send_many_now(messages), robust=True)
