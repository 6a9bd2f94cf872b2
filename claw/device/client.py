"""AgentClient: one agent's connection to the server (docs/protocol.md), kept up for as long
as the agent runs.

* **Connect**: `ws(s)://SERVER/ws/agent/` with `Authorization: Bearer <device token>`, then
  `hello` → `welcome`; a heartbeat every `heartbeat_interval_s` ± 10 %.
* **Outbox**: every frame gets a fresh id (a random per-process prefix + a counter). Each
  frame with an effect stays in the outbox until the server answers it (`ack` or `error`);
  after a reconnect the unanswered ones are sent again with the same ids, in order, and the
  server's per-id dedupe makes each take effect exactly once. Work pauses at its next frame
  while the connection is down (each runner awaits its answers) and carries on afterwards.
* **Reconnect**: any drop reconnects with exponential backoff (1 s doubling to 60 s, full
  jitter). After `welcome`: attempts running here but missing from `welcome.owned` are
  stopped; owned attempts not running here are resumed (an `offered` one is accepted, a
  `running` one continues from its journal, or from step 0 without one); decisions in
  `welcome.decisions` wake their checkpoints; then the outbox is resent.
* **Pushes**: `assignment` → accept if capacity and toolkits allow, else decline (`busy`,
  `missing_tool`, `shutting_down`); `cancel` → stop that attempt; `decision` → wake the
  checkpoint and confirm with `decision_received`.
* **Stop** (SIGTERM/SIGINT → stop()): send `drain`, decline new work, let running attempts
  finish for `grace_s`, fail what is left with `retryable: true`, close. A second signal
  skips the rest of the grace period.
* **Fatal closes**: 4001 (unauthorized), 4003 (revoked), 4409 (replaced), 4400 (protocol)
  end run() with FatalConnectionError; nothing reconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import random
import signal
import time
import typing
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, WebSocketException

from claw import protocol
from claw.device.config import DeviceConfig, ws_url
from claw.device.runner import AttemptRunner, FrameRejected, Journal, check_task
from claw.device.toolkits import Toolkit

logger = logging.getLogger("claw.device")

CLIENT_VERSION = "claw-agent/0.1"
EXIT_UNAUTHORIZED = 3
EXIT_REPLACED = 4
EXIT_PROTOCOL = 5
SEND_RATE_PER_S = 40.0  # under the server's 50/s, so we are never rate limited
SEND_BURST = 100


class FatalConnectionError(Exception):
    """The server ended the connection for good (unauthorized, revoked, replaced, protocol
    error): reconnecting would not help. `exit_code` is what the CLI exits with."""

    def __init__(self, message: str, exit_code: int, close_code: int | None = None):
        super().__init__(message)
        self.message, self.exit_code, self.close_code = message, exit_code, close_code


class Backoff:
    """Exponential backoff with full jitter: the n-th delay is uniform in
    [0, min(cap, base * 2**n)]."""

    def __init__(self, base: float = 1.0, cap: float = 60.0, rng: random.Random | None = None):
        self.base, self.cap, self.failures = base, cap, 0
        self.rng = rng or random.Random()

    def ceiling(self) -> float:
        return min(self.cap, self.base * 2 ** min(self.failures, 32))

    def next(self) -> float:
        delay = self.rng.uniform(0, self.ceiling())
        self.failures += 1
        return delay

    def reset(self) -> None:
        self.failures = 0


class FrameIds:
    """Client message ids: unique per process run (random prefix) and across runs."""

    def __init__(self, prefix: str | None = None):
        self.prefix = prefix or uuid.uuid4().hex[:12]
        self.counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self.prefix}-{next(self.counter)}"


class Outbox:
    """Frames sent but not yet answered, in the order they were first sent."""

    def __init__(self) -> None:
        self._texts: dict[str, str] = {}
        self._futures: dict[str, asyncio.Future] = {}

    def add(self, frame_id: str, text: str) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._texts[frame_id] = text
        self._futures[frame_id] = future
        return future

    def pending(self) -> list[str]:
        """The unanswered frames, oldest first, exactly as first sent (same ids)."""
        return list(self._texts.values())

    def items(self) -> list[tuple[str, str]]:
        return list(self._texts.items())

    def answer(self, frame_id: str, result: dict | None = None, error: Exception | None = None):
        """Resolve the frame's waiter; False for ids that are not (or no longer) pending."""
        self._texts.pop(frame_id, None)
        future = self._futures.pop(frame_id, None)
        if future is None:
            return False
        if not future.done():
            if error is not None:
                future.set_exception(error)
                future.exception()  # consumed here too: a waiter may be gone (cancelled)
            else:
                future.set_result(result or {})
        return True

    def __len__(self) -> int:
        return len(self._texts)

    def __contains__(self, frame_id: str) -> bool:
        return frame_id in self._texts


class _RateLimiter:
    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.tokens, self.stamp = float(burst), time.monotonic()

    async def take(self) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            await asyncio.sleep((1 - self.tokens) / self.rate)


def _frame_type(model: type[protocol.Frame]) -> str:
    return typing.get_args(model.model_fields["type"].annotation)[0]


@dataclass
class _Local:
    """An attempt this process is working on."""

    runner: AttemptRunner
    task: asyncio.Task
    epoch: int
    stopped_by: str = ""  # why we stopped it ourselves (cancel, not owned, shutdown)
    # Its complete or fail was answered: the server freed its slot and may offer the next
    # task in the very next frame, before this attempt's coroutine has wound down.
    released: bool = False


class AgentClient:
    def __init__(
        self,
        *,
        config: DeviceConfig,
        name: str,
        toolkits: dict[str, Toolkit],
        capacity: int = 1,
        workdir: Path | str = ".",
        state_dir: Path | str | None = None,
        grace_s: float = 30.0,
        client_version: str = CLIENT_VERSION,
        open_timeout: float = 10.0,
        backoff: Backoff | None = None,
    ):
        if not 1 <= capacity <= 256:
            raise ValueError("capacity must be from 1 to 256")
        self.config = config
        self.name = name
        self.toolkits = toolkits
        self.capacity = capacity
        self.workdir = Path(workdir)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.grace_s = grace_s
        self.client_version = client_version
        self.open_timeout = open_timeout
        self.url = ws_url(config.server)
        self.backoff = backoff or Backoff()

        self.ids = FrameIds()
        self.outbox = Outbox()
        self.welcome: protocol.Welcome | None = None
        self.attempts: dict[int, _Local] = {}
        self.decisions: dict[int, protocol.Decision] = {}
        self._decision_waiters: dict[int, asyncio.Future] = {}
        self._ws: ClientConnection | None = None
        self._ready = False
        self._draining = False
        self._last_error: protocol.Error | None = None
        self._limiter = _RateLimiter(SEND_RATE_PER_S, SEND_BURST)
        self._background: set[asyncio.Task] = set()
        self._stop_requested: asyncio.Event | None = None
        self._force_stop: asyncio.Event | None = None
        self._pruned = False
        self._closing = False
        self._keep_journals = False
        self._ending_frames: dict[str, int] = {}  # complete/fail frame id -> attempt id

    # --- running -------------------------------------------------------------------------

    async def run(self, *, handle_signals: bool = True) -> int:
        """Connect and work until stop() (returns 0) or a fatal close (raises
        FatalConnectionError)."""
        self._stop_requested, self._force_stop = asyncio.Event(), asyncio.Event()
        self.workdir.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT) if handle_signals else ()
        for signum in signals:
            loop.add_signal_handler(signum, self.stop)
        connection = asyncio.create_task(self._connection_loop(), name="claw-connection")
        stop = asyncio.create_task(self._stop_requested.wait())
        try:
            await asyncio.wait({connection, stop}, return_when=asyncio.FIRST_COMPLETED)
            if connection.done():
                # A fatal close: keep the journals (a replacing process may resume them).
                self._keep_journals = True
                connection.result()  # raises the FatalConnectionError
                return 1
            await self._shutdown(connection)
            return 0
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)
            stop.cancel()
            connection.cancel()
            await self._stop_all("the agent stopped")
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await connection
            for task in list(self._background):
                task.cancel()

    def stop(self) -> None:
        """Begin a graceful stop; called again, skip the rest of the grace period."""
        if self._stop_requested is None:
            return
        if self._stop_requested.is_set():
            logger.warning("stopping now: failing the attempts still running")
            self._force_stop.set()
        else:
            logger.info(
                "stopping: no new work; waiting up to %g s for running attempts", self.grace_s
            )
            self._stop_requested.set()

    async def _shutdown(self, connection: asyncio.Task) -> None:
        self._draining = True
        drain = self._spawn(self._quiet(self.request(protocol.Drain)))
        running = {local.task for local in self.attempts.values()}
        if running:
            force = asyncio.create_task(self._force_stop.wait())
            finished = asyncio.gather(*running, return_exceptions=True)
            await asyncio.wait(
                {finished, force}, timeout=self.grace_s, return_when=asyncio.FIRST_COMPLETED
            )
            force.cancel()
        leftovers = list(self.attempts.values())
        for local in leftovers:
            local.stopped_by = "shutdown"
            local.task.cancel()
        await asyncio.gather(*(local.task for local in leftovers), return_exceptions=True)
        answers = [drain]
        for local in leftovers:
            runner = local.runner
            logger.warning("attempt %s: not finished in time; failing it", runner.ids["attempt_id"])
            if runner.accepted:
                frame = self.request(
                    protocol.Fail,
                    **runner.ids,
                    error="the agent shut down before finishing (grace period over)",
                    retryable=True,
                )
            else:
                frame = self.request(
                    protocol.Decline,
                    **runner.ids,
                    reason="shutting_down",
                    message="the agent is shutting down",
                )
            answers.append(self._quiet(frame))
        # What is still unanswered (the fails, the drain) gets a few seconds to go through;
        # an idle agent's drain is a courtesy (its socket closing says the same), so it
        # does not hold up the exit when the server is already gone.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10 if leftovers else 1):
                await asyncio.gather(*answers)
                while len(self.outbox) and not connection.done():
                    await asyncio.sleep(0.05)
        self._closing = True
        ws = self._ws
        if ws is not None:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(5):
                    await ws.close()
        logger.info("stopped")

    async def _stop_all(self, reason: str) -> None:
        locals_ = list(self.attempts.values())
        for local in locals_:
            local.stopped_by = local.stopped_by or reason
            local.task.cancel()
        await asyncio.gather(*(local.task for local in locals_), return_exceptions=True)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _quiet(self, awaitable) -> dict | None:
        """Await a request whose refusal is only worth a log line."""
        try:
            return await awaitable
        except FrameRejected as exc:
            logger.info("the server refused a frame: %s", exc)
            return None

    # --- the connection ------------------------------------------------------------------

    async def _connection_loop(self) -> None:
        headers = {"Authorization": f"Bearer {self.config.token}"}
        while True:
            welcomed = False
            try:
                async with connect(
                    self.url,
                    additional_headers=headers,
                    user_agent_header=self.client_version,
                    open_timeout=self.open_timeout,
                    close_timeout=5,
                    max_size=16 * protocol.MAX_FRAME_BYTES,
                ) as ws:
                    welcomed = await self._session(ws)
            except FatalConnectionError:
                raise
            except InvalidStatus as exc:
                logger.warning(
                    "%s refused the websocket handshake: HTTP %s",
                    self.url,
                    exc.response.status_code,
                )
            except (OSError, TimeoutError, WebSocketException) as exc:
                logger.warning("connection to %s failed: %s", self.url, exc or type(exc).__name__)
            finally:
                self._ws, self._ready = None, False
            if self._closing:
                return
            if welcomed:
                self.backoff.reset()
            delay = self.backoff.next()
            logger.info("reconnecting in %.1f s", delay)
            await asyncio.sleep(delay)

    def _hello(self, frame_id: str) -> protocol.Hello:
        return protocol.Hello(
            type="hello",
            id=frame_id,
            versions=list(protocol.SUPPORTED_VERSIONS),
            agent=protocol.AgentInfo(
                name=self.name,
                toolkits={slug: toolkit.version for slug, toolkit in self.toolkits.items()},
                tool_schemas={slug: toolkit.schemas() for slug, toolkit in self.toolkits.items()},
                capacity=self.capacity,
                client_version=self.client_version,
            ),
        )

    async def _session(self, ws: ClientConnection) -> bool:
        """One connection: hello, welcome, reconcile, resend, then frames until it closes.
        Returns True once welcomed; raises FatalConnectionError on a fatal close."""
        self._last_error = None
        hello_id = self.ids()
        try:
            await ws.send(self._hello(hello_id).model_dump_json())
            async with asyncio.timeout(self.open_timeout):
                welcome = await self._await_welcome(ws)
        except ConnectionClosed:
            self._raise_if_fatal(ws)
            raise
        self.welcome = welcome
        logger.info(
            "connected to %s as agent %s %r (group %s, device %s)",
            self.url,
            welcome.agent_id,
            self.name,
            welcome.group,
            welcome.device_id,
        )
        self._ws = ws
        self._reconcile(welcome)
        heartbeat = asyncio.create_task(self._heartbeat(ws, welcome.heartbeat_interval_s))
        try:
            await self._resend(ws)
            self._ready = True
            async for text in ws:
                self._on_text(text)
        except ConnectionClosed:
            pass
        finally:
            heartbeat.cancel()
            self._ws, self._ready = None, False
        self._raise_if_fatal(ws)
        if self._closing:
            return True
        logger.warning(
            "connection lost (close code %s%s)",
            ws.close_code,
            f": {ws.close_reason}" if ws.close_reason else "",
        )
        return True

    async def _await_welcome(self, ws: ClientConnection) -> protocol.Welcome:
        while True:
            text = await ws.recv()
            try:
                raw = json.loads(text)
            except ValueError:
                continue
            if not (isinstance(raw, dict) and raw.get("type") == "welcome"):
                self._on_text(text)
                continue
            try:
                return protocol.Welcome.model_validate(raw)
            except ValidationError as exc:
                raise FatalConnectionError(
                    f"this agent does not understand the server's welcome ({exc.errors()[0]}); "
                    "upgrade the claw package.",
                    EXIT_PROTOCOL,
                ) from None

    async def _resend(self, ws: ClientConnection) -> None:
        """Send every unanswered frame again, oldest first, with its original id — including
        ones added while this runs — before new frames go out directly."""
        sent: set[str] = set()
        while todo := [(i, t) for i, t in self.outbox.items() if i not in sent]:
            if not sent:
                logger.info("resending %d unanswered frame(s)", len(todo))
            for frame_id, text in todo:
                sent.add(frame_id)
                await self._send_text(ws, text)

    def _raise_if_fatal(self, ws: ClientConnection) -> None:
        code = ws.close_code
        error = self._last_error
        detail = f" (server: {error.code}: {error.message})" if error else ""
        if code == protocol.CLOSE_UNAUTHORIZED:
            raise FatalConnectionError(
                f"the server refused this device's token{detail}. The device was revoked or "
                "is unknown there: pair it again with `claw device pair`.",
                EXIT_UNAUTHORIZED,
                code,
            )
        if code == protocol.CLOSE_REVOKED:
            raise FatalConnectionError(
                f"this device was revoked by an owner of its group{detail}; the agent stops. "
                "Pair the device again to reconnect it.",
                EXIT_UNAUTHORIZED,
                code,
            )
        if code == protocol.CLOSE_REPLACED:
            raise FatalConnectionError(
                f"another connection of agent {self.name!r} on this device took over{detail}; "
                "this one stops.",
                EXIT_REPLACED,
                code,
            )
        if code == protocol.CLOSE_PROTOCOL:
            raise FatalConnectionError(
                f"the server refused this agent's hello{detail}.", EXIT_PROTOCOL, code
            )

    async def _heartbeat(self, ws: ClientConnection, interval: float) -> None:
        while True:
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))
            frame = protocol.Heartbeat(type="heartbeat", id=self.ids())
            await self._send_text(ws, frame.model_dump_json())

    async def _send_text(self, ws: ClientConnection, text: str) -> None:
        await self._limiter.take()
        with contextlib.suppress(ConnectionClosed):
            await ws.send(text)

    async def _resend_later(self, ws: ClientConnection | None, delay: float, only: str = ""):
        await asyncio.sleep(delay)
        if ws is None or ws is not self._ws or not self._ready:
            return  # a reconnect resends everything anyway
        for frame_id, text in self.outbox.items():
            if not only or frame_id == only:
                await self._send_text(ws, text)

    # --- frames to the server ------------------------------------------------------------

    async def request(self, model: type[protocol.Frame], **fields: Any) -> dict:
        """Send a frame and wait for its answer: the ack's result, or FrameRejected. The
        frame is resent with the same id after a reconnect until it is answered."""
        frame_id = self.ids()
        text = model(type=_frame_type(model), id=frame_id, **fields).model_dump_json()
        if len(text.encode()) > protocol.MAX_FRAME_BYTES:
            raise ValueError(f"a {_frame_type(model)} frame over {protocol.MAX_FRAME_BYTES} bytes")
        future = self.outbox.add(frame_id, text)
        if model in (protocol.Complete, protocol.Fail):
            self._ending_frames[frame_id] = fields["attempt_id"]
        ws = self._ws
        if self._ready and ws is not None:
            await self._send_text(ws, text)
        return await future

    async def wait_decision(self, checkpoint_id: int) -> protocol.Decision:
        if checkpoint_id in self.decisions:
            return self.decisions[checkpoint_id]
        future = asyncio.get_running_loop().create_future()
        self._decision_waiters[checkpoint_id] = future
        try:
            return await future
        finally:
            if self._decision_waiters.get(checkpoint_id) is future:
                del self._decision_waiters[checkpoint_id]

    async def confirm_decision(self, checkpoint_id: int) -> None:
        self.decisions.pop(checkpoint_id, None)
        await self._quiet(self.request(protocol.DecisionReceived, checkpoint_id=checkpoint_id))

    # --- frames from the server ----------------------------------------------------------

    def _on_text(self, text: str | bytes) -> None:
        try:
            raw = json.loads(text)
        except ValueError:
            logger.warning("ignoring a frame that is not JSON")
            return
        if not isinstance(raw, dict):
            return
        try:
            frame = protocol.SERVER_FRAMES.validate_python(raw)
        except ValidationError:
            # Newer servers may add fields: still match answers to frames.
            if raw.get("type") == "ack" and isinstance(raw.get("re"), str):
                frame = protocol.Ack.model_construct(re=raw["re"], result=raw.get("result") or {})
            elif raw.get("type") == "error":
                frame = protocol.Error.model_construct(
                    re=raw.get("re"), code=str(raw.get("code")), message=str(raw.get("message"))
                )
            else:
                logger.warning("ignoring a frame this agent does not understand: %.200s", text)
                return
        match frame:
            case protocol.Ack():
                self._release_slot(frame.re)
                self.outbox.answer(frame.re, result=frame.result)
            case protocol.Error():
                self._on_error(frame)
            case protocol.Assignment():
                self._on_assignment(frame)
            case protocol.Cancel():
                self._on_cancel(frame)
            case protocol.Decision():
                self._on_decision(frame)

    def _on_error(self, error: protocol.Error) -> None:
        if error.re is None or error.re not in self.outbox:
            if error.re is None:
                self._last_error = error
            logger.warning("server error: %s: %s", error.code, error.message)
            if error.code == "rate_limited":  # a frame was dropped; we don't know which
                self._spawn(self._resend_later(self._ws, 2.0))
            return
        if error.code == "internal_error":
            logger.warning("the server failed on frame %s; resending it", error.re)
            self._spawn(self._resend_later(self._ws, 1.0, only=error.re))
            return
        self._release_slot(error.re)
        self.outbox.answer(error.re, error=FrameRejected(error.code, error.message))

    def _release_slot(self, frame_id: str) -> None:
        attempt_id = self._ending_frames.pop(frame_id, None)
        local = self.attempts.get(attempt_id) if attempt_id is not None else None
        if local is not None:
            local.released = True

    def _busy_slots(self) -> int:
        return sum(not local.released for local in self.attempts.values())

    def _on_assignment(self, assignment: protocol.Assignment) -> None:
        attempt_id, task = assignment.attempt_id, assignment.task
        if attempt_id in self.attempts:
            return  # already ours (a repeated push)
        offered = assignment.status == "offered"
        refusal = None
        if offered and self._draining:
            refusal = ("shutting_down", "the agent is shutting down")
        refusal = refusal or check_task(task, self.toolkits)
        if offered and refusal is None and self._busy_slots() >= self.capacity:
            refusal = ("busy", f"the agent is at capacity ({self.capacity})")
        ids = {"attempt_id": attempt_id, "epoch": assignment.epoch}
        if refusal is not None:
            reason, message = refusal
            if offered:
                logger.info("attempt %s (task %s): declining: %s", attempt_id, task.id, message)
                self._spawn(
                    self._quiet(
                        self.request(protocol.Decline, **ids, reason=reason, message=message)
                    )
                )
            else:
                logger.warning(
                    "attempt %s (task %s): cannot resume: %s", attempt_id, task.id, message
                )
                self._spawn(
                    self._quiet(
                        self.request(
                            protocol.Fail,
                            **ids,
                            error=f"the agent cannot resume this attempt: {message}",
                            retryable=True,
                        )
                    )
                )
            return
        runner = AttemptRunner(
            assignment,
            session=self,
            toolkits=self.toolkits,
            workdir=self.workdir,
            journal=Journal(self.state_dir, attempt_id),
        )
        local = _Local(
            runner=runner, task=asyncio.create_task(runner.run()), epoch=assignment.epoch
        )
        self.attempts[attempt_id] = local
        local.task.add_done_callback(lambda task: self._attempt_done(attempt_id, local, task))

    def _attempt_done(self, attempt_id: int, local: _Local, task: asyncio.Task) -> None:
        if self.attempts.get(attempt_id) is local:
            del self.attempts[attempt_id]
        if not self._keep_journals:
            local.runner.journal.discard()
        if task.cancelled():
            logger.info("attempt %s: stopped (%s)", attempt_id, local.stopped_by or "cancelled")
        elif task.exception() is not None:
            logger.error("attempt %s crashed", attempt_id, exc_info=task.exception())
            self._spawn(
                self._quiet(
                    self.request(
                        protocol.Fail,
                        **local.runner.ids,
                        error=f"the agent crashed: {task.exception()!r}"[:2000],
                        retryable=False,
                    )
                )
            )
        for checkpoint_id, decision in list(self.decisions.items()):
            if decision.attempt_id == attempt_id:
                self._spawn(self.confirm_decision(checkpoint_id))

    def _on_cancel(self, cancel: protocol.Cancel) -> None:
        local = self.attempts.get(cancel.attempt_id)
        if local is None or local.epoch != cancel.epoch:
            return
        logger.info(
            "attempt %s: cancelled by the server%s",
            cancel.attempt_id,
            f" ({cancel.reason})" if cancel.reason else "",
        )
        local.stopped_by = "cancelled by the server"
        local.task.cancel()

    def _on_decision(self, decision: protocol.Decision) -> None:
        self.decisions[decision.checkpoint_id] = decision
        waiter = self._decision_waiters.pop(decision.checkpoint_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(decision)
        if decision.attempt_id not in self.attempts:
            self._spawn(self.confirm_decision(decision.checkpoint_id))

    def _reconcile(self, welcome: protocol.Welcome) -> None:
        owned = {assignment.attempt_id: assignment for assignment in welcome.owned}
        for attempt_id, local in list(self.attempts.items()):
            mine = owned.get(attempt_id)
            if mine is not None and mine.epoch == local.epoch:
                continue
            if local.runner.finishing:
                continue  # its complete/fail is in the outbox: the resend gets the answer
            logger.warning("attempt %s: no longer this agent's (not owned); stopping", attempt_id)
            local.stopped_by = "no longer owned"
            local.task.cancel()
        if not self._pruned:
            Journal.prune(self.state_dir, set(owned))
            self._pruned = True
        for assignment in welcome.owned:
            if assignment.attempt_id not in self.attempts:
                logger.info(
                    "attempt %s (task %s): resuming (%s)",
                    assignment.attempt_id,
                    assignment.task.id,
                    assignment.status,
                )
                self._on_assignment(assignment)
        for decision in welcome.decisions:
            self._on_decision(decision)
