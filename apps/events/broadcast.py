"""The one way services push live updates: high-level messages to channel-layer groups,
sent only after the surrounding transaction commits. The channel layer is a best-effort
pipe; the database stays the truth and live views resync from it."""

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

logger = logging.getLogger(__name__)


def group_channel(group_id: int) -> str:
    return f"group.{group_id}"


def agent_channel(agent_id: int) -> str:
    return f"agent.{agent_id}"


def device_channel(device_id: int) -> str:
    return f"device.{device_id}"


def send_now(channel_group: str, message: dict) -> None:
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        async_to_sync(layer.group_send)(channel_group, message)
    except Exception:
        logger.warning(
            "broadcast to %s failed; live views will resync", channel_group, exc_info=True
        )


def send_many_now(messages: list[tuple[str, dict]]) -> None:
    """Send several messages, in order, in one hop to the layer's event loop: each
    `send_now` pays for its own hop (a new loop and Redis connection, a few ms)."""
    layer = get_channel_layer()
    if layer is None or not messages:
        return

    async def send_all() -> None:
        for channel_group, message in messages:
            try:
                await layer.group_send(channel_group, message)
            except Exception:
                logger.warning(
                    "broadcast to %s failed; live views will resync", channel_group, exc_info=True
                )

    try:
        async_to_sync(send_all)()
    except Exception:
        logger.warning("broadcast of %d messages failed", len(messages), exc_info=True)


def broadcast_on_commit(channel_group: str, message: dict) -> None:
    transaction.on_commit(lambda: send_now(channel_group, message), robust=True)


def broadcast_many_on_commit(messages: list[tuple[str, dict]]) -> None:
    """broadcast_on_commit for a batch: one hook, one hop, same order."""
    if messages:
        transaction.on_commit(lambda: send_many_now(messages), robust=True)
