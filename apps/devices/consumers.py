"""`/ws/agent/`: the socket device agents dial out to (protocol in docs/protocol.md).

The consumer is an adapter: it authenticates the device at the handshake, enforces frame
size and rate limits, parses frames with claw.protocol, and calls services. Server pushes
arrive from services as channel-layer messages (after commit) and are re-read from the
database before they are sent, so a frame always reflects committed state.
"""

import asyncio
import json
import logging
import time
import weakref
from functools import wraps

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.db import (
    DEFAULT_DB_ALIAS,
    IntegrityError,
    InterfaceError,
    OperationalError,
    close_old_connections,
    connections,
)

from apps.devices import selectors
from apps.devices.frames import agent_message_once, agent_progress_many
from apps.devices.servers import current_server_id
from apps.devices.services import (
    agent_connection_closed,
    agent_connection_opened,
    agent_drain_self,
    agent_heartbeat,
    device_authenticate,
)
from apps.events.broadcast import agent_channel, device_channel
from apps.events.layer import LayerTolerant
from apps.tasks.matching import agent_matches_deferred
from claw import protocol
from claw.errors import pool_timed_out
from claw.metrics import AGENT_FRAMES
from claw.protocol import FrameError

logger = logging.getLogger(__name__)


# Channels runs database_sync_to_async calls "thread-sensitively" by default: every
# consumer of the process queues its ORM calls on ONE shared thread, one call at a time, so
# a server's whole agent traffic (hellos, heartbeats, progress) is serialized behind the
# round trips of single queries, and a burst of reconnects starves heartbeats for seconds.
# The services called here are self-contained (each opens, commits and closes its own
# work, and no state lives in a thread), so any worker thread of the loop's pool will do.
# A consumer still awaits its calls one by one: one socket's frames keep their order.
def db(func):
    return database_sync_to_async(_connection_returned(func), thread_sensitive=False)


def _connection_returned(func):
    """The call's connection goes back (to the process's pool: CONN_MAX_AGE is 0 with it)
    when the call ends, from inside the call's own context. Channels closes old
    connections around its calls too, but outside the context asgiref runs the function
    in; a call made as a socket connected and closed at once (a bad token, a bad hello)
    kept its connection that way, and 20 such sockets emptied a pool."""

    @wraps(func)
    def run(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        finally:
            close_old_connections()

    return run


def retried_without_health_check(func):
    """For the calls that are safe to run twice (heartbeats, reads, and effectful frames,
    whose answers are stored with their effect): skip the SELECT 1 that CONN_HEALTH_CHECKS
    costs on every call, and instead run once more on a fresh connection if the call fails
    on a connection error (a restarted server, a cut connection)."""

    @wraps(func)
    def run(**kwargs):
        connection = connections[DEFAULT_DB_ALIAS]
        connection.health_check_done = True
        try:
            return func(**kwargs)
        except (OperationalError, InterfaceError) as exc:
            if connection.in_atomic_block or pool_timed_out(exc):
                raise
            logger.warning("%s failed on its connection; once more", func.__name__, exc_info=True)
            connection.close()
            return func(**kwargs)

    return run


def matches_deferred(func):
    """Run `func` keeping the agent's own match on commit for later (agent_matches_deferred):
    returns (its result, the matches to run once the frame is answered)."""

    @wraps(func)
    def run(**kwargs):
        with agent_matches_deferred() as matches:
            return func(**kwargs), matches

    return run


def matches_run(*, matches: list) -> None:
    for match in matches:
        match()


class ProgressBatcher:
    """Group commit for progress frames, one per event loop (so per server process).

    Consumers submit frames and get futures. WRITERS tasks each drain their own queue (a
    group's frames always go to the same one: writers never wait for each other's lock on
    the group's event numbers), taking what is waiting (up to MAX_FRAMES, after at most
    WAIT_S for company), writing it in one transaction (agent_progress_many) and resolving
    each frame's future with its own ack or error. While a batch is being written the next
    one gathers, so under load the group's lock is taken once per batch instead of once
    per frame. Queues are FIFO and each writer writes one batch at a time: an agent's
    frames keep their arrival order.
    """

    MAX_FRAMES = 200
    WAIT_S = 0.002
    WRITERS = 2

    def __init__(self) -> None:
        self.queues = [asyncio.Queue() for _ in range(self.WRITERS)]
        self.writers: list[asyncio.Task | None] = [None] * self.WRITERS

    def submit(self, group_id: int, agent_id: int, frame: protocol.Progress) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        index = group_id % self.WRITERS
        if self.writers[index] is None or self.writers[index].done():
            self.writers[index] = loop.create_task(self._drain(self.queues[index]))
        future = loop.create_future()
        self.queues[index].put_nowait((agent_id, frame, future))
        return future

    async def _drain(self, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.WAIT_S
            while len(batch) < self.MAX_FRAMES:
                try:
                    batch.append(queue.get_nowait())
                except asyncio.QueueEmpty:
                    if loop.time() >= deadline:
                        break
                    await asyncio.sleep(min(0.001, deadline - loop.time()))
            await self._write(batch)

    async def _write(self, batch: list) -> None:
        frames = [(agent_id, frame) for agent_id, frame, _ in batch]
        try:
            try:
                answers = await db(retried_without_health_check(agent_progress_many))(frames=frames)
            except IntegrityError:
                # An id that raced in through another socket: one by one, each frame gets
                # its stored answer or lands.
                logger.warning("a batch of %d progress frames collided; one by one", len(batch))
                answers = []
                for agent_id, frame in frames:
                    try:
                        answers.append(await db(agent_message_once)(agent_id=agent_id, frame=frame))
                    except Exception as exc:
                        answers.append(exc)
            except Exception as exc:
                # Anything else (the database away) fails every frame of the batch at once:
                # each gets internal_error and its agent sends it again.
                answers = [exc] * len(batch)
            for (_, _, future), answer in zip(batch, answers, strict=True):
                if future.done():
                    continue
                if isinstance(answer, Exception):
                    future.set_exception(answer)
                else:
                    future.set_result(answer)
        finally:
            for _, _, future in batch:  # never leave a socket waiting (a cancelled writer)
                if not future.done():
                    future.set_exception(RuntimeError("the progress writer stopped"))


_batchers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, ProgressBatcher]" = (
    weakref.WeakKeyDictionary()
)


def progress_batcher() -> ProgressBatcher:
    loop = asyncio.get_running_loop()
    if loop not in _batchers:
        _batchers[loop] = ProgressBatcher()
    return _batchers[loop]


RATE_PER_S = 50.0
BURST = 200
MAX_RATE_VIOLATIONS = 50


class TokenBucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")  # one per socket: thousands of them

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = float(burst), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


def _bearer_token(scope: dict) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
    return None


def _connection_opened(**kwargs):
    """agent_connection_opened, on this web process (apps.devices.servers)."""
    return agent_connection_opened(server_id=current_server_id(), **kwargs)


class AgentConsumer(LayerTolerant, AsyncWebsocketConsumer):
    device_id: int | None = None
    agent_id: int | None = None

    async def connect(self) -> None:
        # Accept first: the answer to a bad token is a frame and a close code anyway, and a
        # handshake that waited for the database would hit the server's handshake timeout
        # (Daphne: 5 s) whenever the database is busy. Frames wait until connect() returns.
        await self.accept()
        token = _bearer_token(self.scope)
        device = await db(device_authenticate)(raw_token=token) if token else None
        if device is None:
            await self._error(
                None, "unauthorized", "Send a valid device token as Authorization: Bearer …"
            )
            await self.close(code=protocol.CLOSE_UNAUTHORIZED)
            return
        self.device_id = device.id
        self.bucket = TokenBucket(RATE_PER_S, BURST)
        self.violations = 0
        await self.layer_join(device_channel(device.id))

    async def disconnect(self, code: int) -> None:
        # The database first: when thousands of sockets drop at once the channel layer can
        # refuse (Redis pool exhausted), and the agent must still become suspect.
        if self.agent_id is not None:
            await db(agent_connection_closed)(agent_id=self.agent_id, connection=self.channel_name)
        if self.device_id is not None:
            await self.layer_leave(device_channel(self.device_id))
        if self.agent_id is not None:
            await self.layer_leave(agent_channel(self.agent_id))

    async def dispatch(self, message: dict) -> None:
        # Channels' dispatch first closes the old database connections of its one shared
        # sync thread, a hop to that thread for every frame of every socket. This consumer
        # never uses that thread: its calls run in pool threads (db above), which close
        # their own old connections (database_sync_to_async). So straight to the handler.
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    # --- inbound ---------------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.device_id is None:
            return
        if text_data is None:
            await self._error(None, "text_only", "Frames are JSON text, not binary.")
            if self.agent_id is None:
                await self.close(code=protocol.CLOSE_PROTOCOL)
            return
        # The limit is in bytes: a frame of 200,000 "é" is 400,000 bytes.
        if len(text_data.encode("utf-8", "surrogatepass")) > protocol.MAX_FRAME_BYTES:
            await self.close(code=protocol.CLOSE_TOO_BIG)
            return
        if not self.bucket.take():
            self.violations += 1
            if self.violations > MAX_RATE_VIOLATIONS:
                await self.close(code=protocol.CLOSE_RATE_LIMITED)
            else:
                await self._error(
                    None, "rate_limited", f"Slow down: at most {RATE_PER_S:.0f} frames/s."
                )
            return
        try:
            frame = protocol.parse_client_frame(text_data)
        except FrameError as exc:
            await self._error(exc.re, exc.code, exc.message)
            if self.agent_id is None:
                await self.close(code=protocol.CLOSE_PROTOCOL)
            return
        AGENT_FRAMES.labels(type=frame.type).inc()
        if self.agent_id is None and not isinstance(frame, protocol.Hello):
            await self._error(frame.id, "hello_first", "The first frame must be hello.")
            await self.close(code=protocol.CLOSE_PROTOCOL)
            return
        try:
            await self._dispatch(frame)
        except Exception:
            logger.exception("agent frame %s failed", frame.type)
            await self._error(
                frame.id, "internal_error", "The server failed on this frame; retry it."
            )

    async def _dispatch(self, frame) -> None:
        match frame:
            case protocol.Hello():
                await self._hello(frame)
            case protocol.Heartbeat():
                extended = await db(retried_without_health_check(agent_heartbeat))(
                    agent_id=self.agent_id, lease_timeout_s=self.lease_timeout_s
                )
                await self._send(protocol.Ack(re=frame.id, result={"leases_extended": extended}))
            case protocol.Drain():
                await db(agent_drain_self)(agent_id=self.agent_id)
                await self._send(protocol.Ack(re=frame.id))
            case protocol.Progress():
                # Written with other sockets' progress, in one transaction (ProgressBatcher).
                written = progress_batcher().submit(self.group_id, self.agent_id, frame)
                await self.send(text_data=json.dumps(await written))
            case _:
                answer = retried_without_health_check(matches_deferred(agent_message_once))
                response, matches = await db(answer)(agent_id=self.agent_id, frame=frame)
                await self.send(text_data=json.dumps(response))
                await self._match(matches)

    async def _hello(self, frame: protocol.Hello) -> None:
        if self.agent_id is not None:
            await self._error(frame.id, "already_hello", "hello is sent once per connection.")
            return
        common = set(frame.versions) & set(protocol.SUPPORTED_VERSIONS)
        if not common:
            await self._error(
                frame.id,
                "unsupported_version",
                f"This server speaks protocol versions {list(protocol.SUPPORTED_VERSIONS)}.",
            )
            await self.close(code=protocol.CLOSE_PROTOCOL)
            return
        try:
            agent, matches = await db(matches_deferred(_connection_opened))(
                device_id=self.device_id, info=frame.agent, connection=self.channel_name
            )
        except Exception as exc:  # a DomainError from validation, or a revoked device
            code = getattr(exc, "code", "internal_error")
            await self._error(frame.id, code, getattr(exc, "message", "Registration failed."))
            await self.close(code=protocol.CLOSE_PROTOCOL)
            return
        agent_id = agent.id
        # Another live socket of this agent (a reconnect racing an old connection) steps down.
        # (While the layer is down the old one learns it when the layer is back.)
        await self.layer_send(
            agent_channel(agent_id), {"type": "agent.replaced", "by": self.channel_name}
        )
        self.agent_id, self.group_id = agent_id, agent.group_id

        await self.layer_join(agent_channel(agent_id))
        welcome = await db(selectors.welcome_frame)(
            agent_id=agent_id,
            re=frame.id,
            version=max(common),
            limits=protocol.Limits(
                max_frame_bytes=protocol.MAX_FRAME_BYTES, rate_per_s=RATE_PER_S, burst=BURST
            ),
        )
        self.lease_timeout_s = welcome.lease_timeout_s
        await self._send(welcome)
        await self._match(matches)

    # --- pushes from services (channel layer) ----------------------------------------------

    async def attempt_offered(self, message: dict) -> None:
        frame = await db(retried_without_health_check(selectors.assignment_frame))(
            attempt_id=message["attempt_id"]
        )
        if frame is not None:
            await self._send(frame)

    async def attempt_cancel(self, message: dict) -> None:
        await self._send(
            protocol.Cancel(
                attempt_id=message["attempt_id"],
                epoch=message["epoch"],
                reason=message.get("reason", ""),
            )
        )

    async def checkpoint_resolved(self, message: dict) -> None:
        await self._send(
            protocol.Decision(
                checkpoint_id=message["checkpoint_id"],
                attempt_id=message["attempt_id"],
                status=message["status"],
                note=message.get("note", ""),
            )
        )

    async def device_revoked(self, message: dict) -> None:
        await self._error(None, "revoked", "This device was revoked.")
        await self.close(code=protocol.CLOSE_REVOKED)

    async def agent_replaced(self, message: dict) -> None:
        if message["by"] != self.channel_name:
            await self._error(None, "replaced", "A newer connection of this agent took over.")
            self_agent, self.agent_id = self.agent_id, None
            await self.layer_leave(agent_channel(self_agent))
            await self.close(code=protocol.CLOSE_REPLACED)

    async def layer_restored(self) -> None:
        """Back from a channel-layer outage: what the pushes lost meanwhile would have said
        is read from the database. Offers are sent again (the runtime ignores one it
        already has), as are decisions not yet confirmed; a revocation or a newer socket
        of this agent closes this one."""
        if self.device_id is None:
            return
        missed = await db(retried_without_health_check(selectors.missed_pushes))(
            device_id=self.device_id, agent_id=self.agent_id, connection=self.channel_name
        )
        if missed.revoked:
            await self.device_revoked({})
        elif missed.replaced:
            await self.agent_replaced({"by": None})
        else:
            for frame in missed.frames:
                await self._send(frame)

    # --- helpers ---------------------------------------------------------------------------

    async def _match(self, matches: list) -> None:
        """The agent's own match, after its frame was answered (matches_deferred)."""
        if matches:
            await db(matches_run)(matches=matches)

    async def _send(self, frame: protocol.Frame) -> None:
        await self.send(text_data=frame.model_dump_json())

    async def _error(self, re: str | None, code: str, message: str) -> None:
        await self._send(protocol.Error(re=re, code=code, message=message))
