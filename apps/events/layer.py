"""Sockets that outlive the channel layer (docs/architecture.md, rule 4: the layer is a
best-effort pipe, the database the truth).

Channels' consumers read their layer channel in the same loop as their socket
(`await_many_dispatch`), so a layer receive that raises (Redis down) ends the consumer and
closes its socket with 1011; a `group_add` that raises in `connect` refuses the socket. A
consumer with `LayerTolerant` instead waits out an outage: while the layer is down it only
loses pushes; its socket stays open and its frames keep reaching the database. When the
layer answers again it joins its groups again (a restarted Redis has forgotten them) and
calls `layer_restored`, where each consumer re-reads from the database what the pushes it
missed would have told it.

One prober per event loop asks the layer whether it is back, so an outage costs one Redis
connection attempt per interval per process, not one per socket."""

import asyncio
import logging
import random
import time
import weakref

from apps.events.broadcast import layer_lanes

logger = logging.getLogger(__name__)

PROBE_FIRST_S = 0.1
PROBE_MAX_S = 1.0
# Thousands of sockets re-join and re-read at once when the layer returns; spread them.
REJOIN_SPREAD_S = 0.5
PROBE_GROUP = "claw.layer-probe"
PROBE_CHANNEL = "claw.layer-probe"


class LayerOutage:
    """The channel layer is unreachable from this event loop: a prober asks it again (a
    harmless group_discard), backing off to PROBE_MAX_S, until it answers."""

    def __init__(self, layer) -> None:
        self.layer = layer
        self.prober: asyncio.Task | None = None

    @property
    def ongoing(self) -> bool:
        return self.prober is not None and not self.prober.done()

    def report(self) -> asyncio.Task:
        """A layer call failed: the prober (started if none is running), done when the
        layer answers again."""
        if not self.ongoing:
            logger.warning("the channel layer is unreachable; pushes are lost until it is back")
            self.prober = asyncio.get_running_loop().create_task(self._probe())
        return self.prober

    async def _probe(self) -> None:
        started, delay = time.monotonic(), PROBE_FIRST_S
        while True:
            await asyncio.sleep(delay)
            try:
                await self.layer.group_discard(PROBE_GROUP, PROBE_CHANNEL)
                break
            except Exception:
                delay = min(delay * 2, PROBE_MAX_S)
        logger.warning(
            "the channel layer answers again after %.1f s; sockets re-join their groups",
            time.monotonic() - started,
        )


_outages: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LayerOutage]" = (
    weakref.WeakKeyDictionary()
)


def layer_outage(layer) -> LayerOutage:
    """This event loop's outage tracker for `layer`."""
    loop = asyncio.get_running_loop()
    outage = _outages.get(loop)
    if outage is None or outage.layer is not layer:
        outage = _outages[loop] = LayerOutage(layer)
    return outage


class LayerTolerant:
    """A mixin for AsyncWebsocketConsumer subclasses (put it first): join and leave
    channel-layer groups with `layer_join` / `layer_leave`, send with `layer_send`; none
    of them raises. Override `layer_restored` to repair what lost pushes would have said."""

    _layer_groups: frozenset[str] = frozenset()
    _layer_repair: asyncio.Task | None = None

    # AsyncConsumer.__call__ sets channel_receive to the layer's receive and hands it to
    # its dispatch loop; it gets the receive that survives outages instead.
    @property
    def channel_receive(self):
        return self._receive_through_outages

    @channel_receive.setter
    def channel_receive(self, receive) -> None:
        self._layer_receive = receive

    async def _receive_through_outages(self) -> dict:
        while True:
            if self._layer_repair is not None:
                await self._layer_repair
            try:
                return await self._layer_receive()
            except Exception:
                self._layer_failed("receiving")

    async def layer_join(self, group: str) -> None:
        self._layer_groups = self._layer_groups | {group}
        try:
            await self.channel_layer.group_add(group, self.channel_name)
        except Exception:
            self._layer_failed(f"joining {group}")

    async def layer_leave(self, group: str) -> None:
        self._layer_groups = self._layer_groups - {group}
        try:
            async with layer_lanes():
                await self.channel_layer.group_discard(group, self.channel_name)
        except Exception:  # the membership expires with the layer's group_expiry
            self._log_failure(f"leaving {group}")

    async def layer_send(self, group: str, message: dict) -> None:
        try:
            async with layer_lanes():
                await self.channel_layer.group_send(group, message)
        except Exception:
            self._log_failure(f"sending {message.get('type')} to {group}")

    async def layer_restored(self) -> None:
        """The layer is back and this socket is in its groups again; pushes sent meanwhile
        were lost."""

    async def websocket_disconnect(self, message: dict) -> None:
        if self._layer_repair is not None:
            self._layer_repair.cancel()
        await super().websocket_disconnect(message)

    def _layer_failed(self, what: str) -> None:
        self._log_failure(what)
        layer_outage(self.channel_layer).report()  # now: the next failures log quietly
        if self._layer_repair is None:
            self._layer_repair = asyncio.get_running_loop().create_task(self._rejoin())

    def _log_failure(self, what: str) -> None:
        if layer_outage(self.channel_layer).ongoing:
            logger.debug("channel layer: %s failed (down)", what, exc_info=True)
        else:
            logger.warning("channel layer: %s failed", what, exc_info=True)

    async def _rejoin(self) -> None:
        try:
            while True:
                # shield: a socket that closes stops waiting, the prober goes on for the rest
                await asyncio.shield(layer_outage(self.channel_layer).report())
                await asyncio.sleep(random.uniform(0, REJOIN_SPREAD_S))
                try:
                    for group in sorted(self._layer_groups):
                        async with layer_lanes():
                            await self.channel_layer.group_add(group, self.channel_name)
                    break
                except Exception:  # down again
                    self._log_failure("re-joining groups")
            try:
                await self.layer_restored()
            except Exception:
                logger.exception("repairing a socket after a channel-layer outage failed")
        finally:
            self._layer_repair = None
