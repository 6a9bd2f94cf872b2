"""AgentClient against a scripted websocket server in this process: the outbox resends
unanswered frames with the same ids after a reconnect, welcome.owned is resumed, pushes are
answered, and fatal close codes stop the client instead of looping."""

import asyncio
import contextlib
import json
from collections.abc import Awaitable, Callable

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from claw import protocol
from claw.device.client import EXIT_REPLACED, EXIT_UNAUTHORIZED, AgentClient, Backoff
from claw.device.client import FatalConnectionError as Fatal
from claw.device.config import DeviceConfig
from claw.device.toolkits import builtin_toolkits

Script = Callable[[ServerConnection, int, list[dict]], Awaitable[None]]


def welcome(re: str, *, owned=(), decisions=(), heartbeat: int = 10) -> str:
    return protocol.Welcome(
        re=re,
        version=1,
        agent_id=9,
        device_id=3,
        group="devs",
        heartbeat_interval_s=heartbeat,
        lease_timeout_s=30,
        limits=protocol.Limits(max_frame_bytes=262144, rate_per_s=50, burst=200),
        owned=list(owned),
        decisions=list(decisions),
    ).model_dump_json()


def ack(frame: dict, **result) -> str:
    return json.dumps({"type": "ack", "re": frame["id"], "result": result})


def assignment(attempt_id: int, steps: list, status: str = "offered") -> protocol.Assignment:
    return protocol.Assignment(
        attempt_id=attempt_id,
        epoch=1,
        status=status,
        deadline="2030-01-01T00:00:00+00:00",
        task=protocol.TaskSpec(
            id=attempt_id * 10,
            title=f"task {attempt_id}",
            instructions="",
            steps=steps,
            required_toolkits=[],
            parent_id=None,
            root_id=None,
        ),
    )


class FakeServer:
    """Runs `script(ws, connection_index, frames)` for every connection; `frames` collects
    what that connection received (hello first)."""

    def __init__(self, script: Script):
        self.script = script
        self.connections: list[list[dict]] = []
        self.headers: list[str | None] = []

    async def handler(self, ws: ServerConnection) -> None:
        frames: list[dict] = []
        self.connections.append(frames)
        self.headers.append(ws.request.headers.get("Authorization"))
        hello = json.loads(await ws.recv())
        frames.append(hello)
        with contextlib.suppress(ConnectionClosed):
            await self.script(ws, len(self.connections) - 1, frames)

    def all_frames(self) -> list[dict]:
        return [frame for frames in self.connections for frame in frames]


async def ack_everything(ws, frames, *, welcome_text=None):
    """Welcome, then answer every frame (checkpoint_request gets checkpoint 77)."""
    await ws.send(welcome_text or welcome(frames[0]["id"]))
    async for text in ws:
        frame = json.loads(text)
        frames.append(frame)
        extra = {"checkpoint_id": 77} if frame["type"] == "checkpoint_request" else {}
        await ws.send(ack(frame, **extra))


async def wait_until(predicate, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


def make_client(port: int, tmp_path, **kwargs) -> AgentClient:
    config = DeviceConfig(
        server=f"http://127.0.0.1:{port}", device_id=3, token="clawd_t", name="dev", kind="cloud"
    )
    kwargs.setdefault("toolkits", builtin_toolkits(["shell"]))
    return AgentClient(
        config=config,
        name="a1",
        workdir=tmp_path / "work",
        state_dir=tmp_path / "state",
        grace_s=2,
        backoff=Backoff(base=0.01, cap=0.05),
        **kwargs,
    )


async def test_unanswered_frames_are_resent_with_the_same_ids_after_a_reconnect(tmp_path):
    async def script(ws, index, frames):
        if index == 0:
            await ws.send(welcome(frames[0]["id"]))
            frames.append(json.loads(await ws.recv()))
            await ws.close(1011)  # drop it unanswered
        else:
            await ack_everything(ws, frames)

    server = FakeServer(script)
    async with serve(server.handler, "127.0.0.1", 0) as ws_server:
        port = ws_server.sockets[0].getsockname()[1]
        client = make_client(port, tmp_path)
        running = asyncio.create_task(client.run(handle_signals=False))
        await wait_until(lambda: client._ready)
        answer = await asyncio.wait_for(
            client.request(
                protocol.Progress, attempt_id=1, epoch=1, seq=1, kind="log", data={"n": 1}
            ),
            5,
        )
        assert answer == {}
        first, second = server.connections[0], server.connections[1]
        assert first[1] == second[1]  # the same frame, id and all
        assert first[1]["type"] == "progress" and first[0]["id"] != second[0]["id"]
        assert len(client.outbox) == 0
        assert server.headers == ["Bearer clawd_t", "Bearer clawd_t"]
        client.stop()
        assert await asyncio.wait_for(running, 5) == 0
    assert server.connections[-1][-1]["type"] == "drain"


async def test_welcome_owned_attempts_are_resumed_and_decisions_confirmed(tmp_path):
    owned = [
        assignment(1, [{"tool": "shell", "args": {"cmd": "echo one"}}]),
        assignment(2, [{"tool": "shell", "args": {"cmd": "echo two"}}], status="running"),
    ]
    lost = protocol.Decision(checkpoint_id=5, attempt_id=99, status="approved")

    async def script(ws, index, frames):
        await ack_everything(
            ws, frames, welcome_text=welcome(frames[0]["id"], owned=owned, decisions=[lost])
        )

    server = FakeServer(script)
    async with serve(server.handler, "127.0.0.1", 0) as ws_server:
        client = make_client(ws_server.sockets[0].getsockname()[1], tmp_path, capacity=2)
        running = asyncio.create_task(client.run(handle_signals=False))
        await wait_until(lambda: sum(f["type"] == "complete" for f in server.all_frames()) == 2)
        client.stop()
        assert await asyncio.wait_for(running, 5) == 0
    frames = server.all_frames()
    by_attempt = {
        attempt: [f["type"] for f in frames if f.get("attempt_id") == attempt] for attempt in (1, 2)
    }
    assert by_attempt == {1: ["accept", "progress", "complete"], 2: ["progress", "complete"]}
    assert {"type": "decision_received", "checkpoint_id": 5, "id": ANY_ID} in frames


class _AnyId:
    def __eq__(self, other):
        return isinstance(other, str) and bool(other)


ANY_ID = _AnyId()


async def test_offers_are_declined_when_busy_or_without_steps_and_cancel_stops_work(tmp_path):
    pushes = [
        assignment(1, [{"tool": "shell", "args": {"cmd": "sleep 30"}}]),
        assignment(2, [{"tool": "shell", "args": {"cmd": "true"}}]),
        assignment(3, []),
    ]

    async def script(ws, index, frames):
        await ws.send(welcome(frames[0]["id"], heartbeat=1))
        for push in pushes:
            await ws.send(push.model_dump_json())
        async for text in ws:
            frame = json.loads(text)
            frames.append(frame)
            await ws.send(ack(frame))
            if frame["type"] == "accept":
                cancel = protocol.Cancel(attempt_id=1, epoch=1, reason="cancelled by alice")
                await ws.send(cancel.model_dump_json())

    server = FakeServer(script)
    async with serve(server.handler, "127.0.0.1", 0) as ws_server:
        client = make_client(ws_server.sockets[0].getsockname()[1], tmp_path)
        running = asyncio.create_task(client.run(handle_signals=False))
        await wait_until(lambda: any(f["type"] == "heartbeat" for f in server.all_frames()), 3)
        await wait_until(lambda: not client.attempts)  # the cancel stopped the sleep
        client.stop()
        assert await asyncio.wait_for(running, 5) == 0
    frames = server.all_frames()
    declines = {
        f["attempt_id"]: (f["reason"], f["message"]) for f in frames if f["type"] == "decline"
    }
    assert declines[2][0] == "busy"
    assert declines[3] == (
        "missing_tool",
        "no model runtime yet: this agent runs explicit steps only",
    )
    assert not [f for f in frames if f.get("attempt_id") == 1 and f["type"] != "accept"]


async def test_shutdown_fails_attempts_that_outlive_the_grace_period_as_retryable(tmp_path):
    async def script(ws, index, frames):
        await ws.send(welcome(frames[0]["id"]))
        await ws.send(
            assignment(1, [{"tool": "shell", "args": {"cmd": "sleep 30"}}]).model_dump_json()
        )
        async for text in ws:
            frame = json.loads(text)
            frames.append(frame)
            await ws.send(ack(frame))

    server = FakeServer(script)
    async with serve(server.handler, "127.0.0.1", 0) as ws_server:
        client = make_client(ws_server.sockets[0].getsockname()[1], tmp_path)
        running = asyncio.create_task(client.run(handle_signals=False))
        await wait_until(lambda: any(f["type"] == "accept" for f in server.all_frames()))
        client.stop()
        assert await asyncio.wait_for(running, 8) == 0
    types = [f["type"] for f in server.all_frames()[1:]]
    assert types[:2] == ["accept", "drain"]
    fail = server.all_frames()[-1]
    assert fail["type"] == "fail" and fail["retryable"] is True and "grace" in fail["error"]


@pytest.mark.parametrize(
    ("code", "before_welcome", "exit_code", "message"),
    [
        (4001, True, EXIT_UNAUTHORIZED, "refused this device's token"),
        (4003, False, EXIT_UNAUTHORIZED, "this device was revoked"),
        (4409, False, EXIT_REPLACED, "took over"),
    ],
)
async def test_fatal_close_codes_stop_the_client_without_reconnecting(
    tmp_path, code, before_welcome, exit_code, message
):
    error = {4001: "unauthorized", 4003: "revoked", 4409: "replaced"}[code]

    async def script(ws, index, frames):
        if not before_welcome:
            await ws.send(welcome(frames[0]["id"]))
        await ws.send(json.dumps({"type": "error", "re": None, "code": error, "message": "no"}))
        await ws.close(code)

    server = FakeServer(script)
    async with serve(server.handler, "127.0.0.1", 0) as ws_server:
        client = make_client(ws_server.sockets[0].getsockname()[1], tmp_path)
        with pytest.raises(Fatal) as fatal:
            await asyncio.wait_for(client.run(handle_signals=False), 5)
    assert fatal.value.exit_code == exit_code and fatal.value.close_code == code
    assert message in fatal.value.message and f"server: {error}: no" in fatal.value.message
    assert len(server.connections) == 1


async def test_an_abnormal_close_reconnects_with_backoff(tmp_path):
    async def script(ws, index, frames):
        if index < 2:
            await ws.close(1011)
            return
        await ack_everything(ws, frames)

    server = FakeServer(script)
    async with serve(server.handler, "127.0.0.1", 0) as ws_server:
        client = make_client(ws_server.sockets[0].getsockname()[1], tmp_path)
        running = asyncio.create_task(client.run(handle_signals=False))
        await wait_until(lambda: client._ready)
        assert len(server.connections) == 3
        client.stop()
        assert await asyncio.wait_for(running, 5) == 0


async def test_a_local_attempt_missing_from_welcome_owned_is_stopped(tmp_path):
    async def script(ws, index, frames):
        await ws.send(welcome(frames[0]["id"]))
        if index == 0:
            push = assignment(1, [{"tool": "shell", "args": {"cmd": "sleep 30"}}])
            await ws.send(push.model_dump_json())
            frame = json.loads(await ws.recv())
            frames.append(frame)
            await ws.send(ack(frame, status="running"))
            await asyncio.sleep(0.2)
            await ws.close(1011)  # meanwhile the server gave the task to someone else
            return
        async for text in ws:
            frames.append(json.loads(text))
            await ws.send(ack(frames[-1]))

    server = FakeServer(script)
    async with serve(server.handler, "127.0.0.1", 0) as ws_server:
        client = make_client(ws_server.sockets[0].getsockname()[1], tmp_path)
        running = asyncio.create_task(client.run(handle_signals=False))
        await wait_until(lambda: 1 in client.attempts)
        await wait_until(lambda: len(server.connections) == 2 and not client.attempts)
        client.stop()
        assert await asyncio.wait_for(running, 5) == 0
    assert [f["type"] for f in server.connections[0][1:]] == ["accept"]
    assert [f["type"] for f in server.connections[1][1:]] == ["drain"]  # no fail, no progress


def test_server_frames_with_fields_from_a_newer_server_still_parse():
    frame = json.loads(welcome("h1"))
    frame["region"] = "eu"  # a field this runtime does not know yet
    frame["limits"]["max_tools"] = 8
    parsed = protocol.SERVER_FRAMES.validate_python(frame)
    assert isinstance(parsed, protocol.Welcome) and parsed.agent_id == 9
    with pytest.raises(protocol.FrameError) as caught:  # agent frames stay exact
        protocol.parse_client_frame(json.dumps({"type": "heartbeat", "id": "x", "extra": 1}))
    assert caught.value.code == "invalid"


async def test_the_next_offer_right_behind_a_completes_ack_is_accepted(tmp_path):
    """The server frees the slot when it acks a complete and may offer the next task in
    the very next frame: an agent of capacity 1 takes it, it does not decline "busy"."""
    first = assignment(1, [{"tool": "shell", "args": {"cmd": "true"}}])
    second = assignment(2, [{"tool": "shell", "args": {"cmd": "true"}}])

    async def script(ws, index, frames):
        await ws.send(welcome(frames[0]["id"]))
        await ws.send(first.model_dump_json())
        async for text in ws:
            frame = json.loads(text)
            frames.append(frame)
            if frame["type"] == "complete" and frame["attempt_id"] == 1:
                await ws.send(ack(frame))  # the ack, then the offer at once
                await ws.send(second.model_dump_json())
            else:
                await ws.send(ack(frame))

    server = FakeServer(script)
    async with serve(server.handler, "127.0.0.1", 0) as ws_server:
        client = make_client(ws_server.sockets[0].getsockname()[1], tmp_path, capacity=1)
        running = asyncio.create_task(client.run(handle_signals=False))
        await wait_until(
            lambda: any(
                f["type"] in ("complete", "decline") and f.get("attempt_id") == 2
                for f in server.all_frames()
            )
        )
        client.stop()
        assert await asyncio.wait_for(running, 5) == 0
    kinds = [(f["type"], f.get("attempt_id")) for f in server.all_frames()]
    assert ("decline", 2) not in kinds
    assert ("accept", 2) in kinds and ("complete", 2) in kinds
