"""The /ws/agent/ consumer, frame by frame, through the real ASGI app (WebsocketCommunicator)."""

import json
from contextlib import asynccontextmanager

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from apps.checkpoints.models import Checkpoint
from apps.checkpoints.services import checkpoint_decide
from apps.devices.models import Agent, AgentMessage, AgentStatus
from apps.devices.services import device_pair, device_revoke, pairing_code_create
from apps.events.models import Event
from apps.tasks.models import Attempt, Task
from apps.tasks.services import attempt_lose, task_assign, task_cancel, task_create
from claw import protocol
from claw.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)

HELLO = {
    "type": "hello",
    "id": "h1",
    "versions": [1],
    "agent": {"name": "builder", "toolkits": {"shell": "1.0"}, "capacity": 2},
}


@pytest.fixture
def device(personas):
    _, code = pairing_code_create(actor=personas.owner, group=personas.group)
    device, token = device_pair(code=code, name="laptop", kind="laptop")
    device.raw_token = token
    return device


@asynccontextmanager
async def connected(token: str | None, *, hello: dict | None = HELLO):
    headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
    ws = WebsocketCommunicator(application, "/ws/agent/", headers=headers)
    ok, _ = await ws.connect()
    assert ok
    try:
        if hello is not None:
            await ws.send_json_to(hello)
            welcome = await ws.receive_json_from(timeout=5)
            assert welcome["type"] == "welcome", welcome
            ws.welcome = welcome
            # The hello matches its agent after the welcome; the socket answers frames in
            # order, so once this is acked that match is over (and took nothing a test
            # creates next).
            settled = await call(ws, {"type": "heartbeat", "id": "settled"})
            assert settled["type"] == "ack", settled
        yield ws
    finally:
        await ws.disconnect()


async def call(ws, frame: dict) -> dict:
    await ws.send_json_to(frame)
    return await ws.receive_json_from(timeout=5)


async def next_of_type(ws, frame_type: str) -> dict:
    while True:
        frame = await ws.receive_json_from(timeout=5)
        if frame["type"] == frame_type:
            return frame


db = database_sync_to_async


@db
def new_task(personas, **kwargs):
    return task_create(group=personas.group, actor=personas.member, title="Build it", **kwargs)


@db
def offer(task, agent_id):
    return task_assign(task_id=task.id, agent_id=agent_id)


async def running_attempt(ws, personas):
    task = await new_task(personas, steps=[{"tool": "shell", "args": {"cmd": "make"}}])
    attempt = await offer(task, ws.welcome["agent_id"])
    assignment = await next_of_type(ws, "assignment")
    ack = await call(
        ws, {"type": "accept", "id": "acc", "attempt_id": attempt.id, "epoch": attempt.epoch}
    )
    assert ack == {
        "type": "ack",
        "re": "acc",
        "result": {"status": "running", "lease_expires_at": ack["result"]["lease_expires_at"]},
    }
    return task, attempt, assignment


# --- handshake and hello -----------------------------------------------------------------


async def test_hello_registers_the_agent_and_welcomes_it(personas, device):
    async with connected(device.raw_token) as ws:
        welcome = ws.welcome
        agent = await db(Agent.objects.get)(device=device, name="builder")
        assert welcome["agent_id"] == agent.id
        assert welcome["version"] == 1 and welcome["re"] == "h1"
        assert welcome["group"] == "research"
        assert (welcome["heartbeat_interval_s"], welcome["lease_timeout_s"]) == (10, 30)
        assert welcome["limits"]["max_frame_bytes"] == protocol.MAX_FRAME_BYTES
        assert welcome["owned"] == [] and welcome["decisions"] == []
        assert (agent.status, agent.capacity, agent.toolkits) == ("online", 2, {"shell": "1.0"})


@pytest.mark.parametrize("token", [None, "clawd_wrong", "clawp_not-a-device-token"])
async def test_a_bad_or_missing_token_is_refused_with_4001(token):
    ws = WebsocketCommunicator(
        application,
        "/ws/agent/",
        headers=[(b"authorization", f"Bearer {token}".encode())] if token else [],
    )
    await ws.connect()
    try:
        error = await ws.receive_json_from()
        assert (error["type"], error["code"]) == ("error", "unauthorized")
        assert (await ws.receive_output())["code"] == protocol.CLOSE_UNAUTHORIZED
    finally:
        await ws.disconnect()


async def test_a_token_in_the_url_is_not_accepted(device):
    ws = WebsocketCommunicator(application, f"/ws/agent/?token={device.raw_token}")
    await ws.connect()
    assert (await ws.receive_json_from())["code"] == "unauthorized"
    await ws.disconnect()


@pytest.mark.parametrize(
    ("first", "code"),
    [
        ({"type": "heartbeat", "id": "x"}, "hello_first"),
        ({**HELLO, "versions": [99]}, "unsupported_version"),
        ("not json", "bad_json"),
        ({**HELLO, "agent": {"name": "", "toolkits": {}}}, "invalid"),
    ],
)
async def test_a_connection_must_start_with_a_valid_hello(device, first, code):
    async with connected(device.raw_token, hello=None) as ws:
        if isinstance(first, str):
            await ws.send_to(text_data=first)
        else:
            await ws.send_json_to(first)
        assert (await ws.receive_json_from())["code"] == code
        assert (await ws.receive_output())["code"] == protocol.CLOSE_PROTOCOL
    assert not await db(Agent.objects.filter(device=device).exists)()


async def test_a_second_hello_is_an_error(device):
    async with connected(device.raw_token) as ws:
        assert (await call(ws, {**HELLO, "id": "h2"}))["code"] == "already_hello"


async def test_a_newer_connection_of_the_same_agent_replaces_the_old(device):
    async with connected(device.raw_token) as old, connected(device.raw_token) as new:
        error = await old.receive_json_from(timeout=5)
        assert error["code"] == "replaced"
        assert (await old.receive_output(timeout=5))["code"] == protocol.CLOSE_REPLACED
        assert (await call(new, {"type": "heartbeat", "id": "hb"}))["type"] == "ack"
        agent = await db(Agent.objects.get)(id=new.welcome["agent_id"])
        assert agent.status == "online"


async def test_closing_marks_the_agent_suspect(device):
    async with connected(device.raw_token) as ws:
        agent_id = ws.welcome["agent_id"]
    agent = await db(Agent.objects.get)(id=agent_id)
    assert (agent.status, agent.connection) == (AgentStatus.SUSPECT, "")
    assert await db(Event.objects.filter(kind="agent.disconnected", agent_id=agent_id).exists)()


# --- heartbeat, assignment, progress, completion -----------------------------------------


async def test_heartbeats_extend_leases_and_are_acked(personas, device):
    async with connected(device.raw_token) as ws:
        await running_attempt(ws, personas)
        ack = await call(ws, {"type": "heartbeat", "id": "hb1"})
        assert ack == {"type": "ack", "re": "hb1", "result": {"leases_extended": 1}}


async def test_an_assignment_is_pushed_with_the_task_spec(personas, device):
    async with connected(device.raw_token) as ws:
        _task, attempt, assignment = await running_attempt(ws, personas)
        assert assignment["attempt_id"] == attempt.id and assignment["epoch"] == 1
        assert assignment["task"]["steps"] == [{"tool": "shell", "args": {"cmd": "make"}}]
        assert assignment["task"]["title"] == "Build it"
        assert assignment["status"] == "offered"


async def test_an_assignment_carries_the_groups_skills_for_the_tasks_toolkits(personas, device):
    from apps.devices.models import Toolkit
    from apps.devices.skills import skill_edit

    async with connected(device.raw_token) as ws:
        shell = await db(Toolkit.objects.get)(slug="shell")  # registered by the hello
        await db(skill_edit)(
            actor=personas.owner, group=personas.group, toolkit=shell, text="Use `set -e`."
        )
        needs_shell = await new_task(personas, required_toolkits=["shell"])
        await offer(needs_shell, ws.welcome["agent_id"])
        assignment = await next_of_type(ws, "assignment")
        assert assignment["task"]["skills"] == {"shell": "Use `set -e`."}
        plain = await new_task(personas)
        await offer(plain, ws.welcome["agent_id"])
        assert "skills" not in (await next_of_type(ws, "assignment"))["task"]


async def test_progress_complete_and_replays_have_one_effect(personas, device):
    async with connected(device.raw_token) as ws:
        task, attempt, _ = await running_attempt(ws, personas)
        progress = {
            "type": "progress",
            "id": "p1",
            "attempt_id": attempt.id,
            "epoch": 1,
            "seq": 1,
            "kind": "tool_call",
            "data": {"tool": "shell", "output": "ok"},
        }
        first = await call(ws, progress)
        assert first["type"] == "ack" and first["result"]["event_seq"] > 0
        assert await call(ws, progress) == first  # replayed: same answer
        complete = {
            "type": "complete",
            "id": "c1",
            "attempt_id": attempt.id,
            "epoch": 1,
            "result": {"built": True},
        }
        done = await call(ws, complete)
        assert done == {"type": "ack", "re": "c1", "result": {"status": "succeeded"}}
        assert await call(ws, complete) == done
    assert await db(Event.objects.filter(kind="progress.tool_call").count)() == 1
    assert await db(Event.objects.filter(kind="task.succeeded").count)() == 1
    stored = await db(Task.objects.get)(id=task.id)
    assert (stored.status, stored.result) == ("succeeded", {"built": True})


async def test_decline_returns_the_task_to_the_pool(personas, device):
    async with connected(device.raw_token) as ws:
        task = await new_task(personas)
        attempt = await offer(task, ws.welcome["agent_id"])
        await next_of_type(ws, "assignment")
        ack = await call(
            ws,
            {
                "type": "decline",
                "id": "d",
                "attempt_id": attempt.id,
                "epoch": 1,
                "reason": "missing_tool",
                "message": "no gpu",
            },
        )
        assert ack["result"] == {"status": "declined"}
    assert (await db(Task.objects.get)(id=task.id)).status == "ready"


async def test_a_retryable_failure_is_acked_with_the_tasks_next_status(personas, device):
    async with connected(device.raw_token) as ws:
        _task, attempt, _ = await running_attempt(ws, personas)
        ack = await call(
            ws,
            {
                "type": "fail",
                "id": "f",
                "attempt_id": attempt.id,
                "epoch": 1,
                "error": "flaky network",
                "retryable": True,
            },
        )
        assert ack["result"] == {"task_status": "ready"}


async def test_a_stale_epoch_is_rejected_recorded_and_changes_nothing(personas, device):
    async with connected(device.raw_token) as ws:
        task, attempt, _ = await running_attempt(ws, personas)
        await db(attempt_lose)(attempt_id=attempt.id, reason="lease expired")
        error = await call(
            ws,
            {
                "type": "complete",
                "id": "late",
                "attempt_id": attempt.id,
                "epoch": 1,
                "result": "stale",
            },
        )
        assert (error["type"], error["code"], error["re"]) == ("error", "stale_attempt", "late")
        again = await call(
            ws,
            {
                "type": "complete",
                "id": "late",
                "attempt_id": attempt.id,
                "epoch": 1,
                "result": "stale",
            },
        )
        assert again == error
    stored = await db(Task.objects.get)(id=task.id)
    assert (stored.status, stored.result) == ("ready", None)
    assert await db(Event.objects.filter(kind="attempt.stale_write").count)() == 1


async def test_an_oversized_result_is_refused(personas, device):
    async with connected(device.raw_token) as ws:
        task, attempt, _ = await running_attempt(ws, personas)
        error = await call(
            ws,
            {
                "type": "complete",
                "id": "big",
                "attempt_id": attempt.id,
                "epoch": 1,
                "result": "x" * (protocol.MAX_RESULT_BYTES + 10),
            },
        )
        assert error["code"] == "too_big"
    assert (await db(Task.objects.get)(id=task.id)).status == "running"


async def test_cancel_is_pushed_to_the_holder(personas, device):
    async with connected(device.raw_token) as ws:
        task, attempt, _ = await running_attempt(ws, personas)
        await db(task_cancel)(actor=personas.member, task=task)
        cancel = await next_of_type(ws, "cancel")
        assert (cancel["attempt_id"], cancel["epoch"]) == (attempt.id, 1)


# --- checkpoints -------------------------------------------------------------------------


async def test_a_checkpoint_decision_reaches_the_waiting_agent(personas, device):
    async with connected(device.raw_token) as ws:
        _task, attempt, _ = await running_attempt(ws, personas)
        ack = await call(
            ws,
            {
                "type": "checkpoint_request",
                "id": "cp",
                "attempt_id": attempt.id,
                "epoch": 1,
                "title": "Ship it?",
                "options": ["ship", "hold"],
            },
        )
        checkpoint = await db(Checkpoint.objects.get)(id=ack["result"]["checkpoint_id"])
        await db(checkpoint_decide)(
            actor=personas.approver,
            checkpoint=checkpoint,
            verdict="request_changes",
            note="add tests",
        )
        decision = await next_of_type(ws, "decision")
        assert decision == {
            "type": "decision",
            "checkpoint_id": checkpoint.id,
            "attempt_id": attempt.id,
            "status": "changes_requested",
            "note": "add tests",
        }
        seen = await call(
            ws, {"type": "decision_received", "id": "seen", "checkpoint_id": checkpoint.id}
        )
        assert seen["result"] == {"first_delivery": True}


async def test_a_decision_made_while_away_arrives_on_reconnect(personas, device):
    async with connected(device.raw_token) as ws:
        _task, attempt, _ = await running_attempt(ws, personas)
        ack = await call(
            ws,
            {
                "type": "checkpoint_request",
                "id": "cp",
                "attempt_id": attempt.id,
                "epoch": 1,
                "title": "Ship it?",
            },
        )
    checkpoint = await db(Checkpoint.objects.get)(id=ack["result"]["checkpoint_id"])
    await db(checkpoint_decide)(
        actor=personas.approver, checkpoint=checkpoint, verdict="approve", note="go"
    )
    async with connected(device.raw_token) as ws:
        assert [a["attempt_id"] for a in ws.welcome["owned"]] == [attempt.id]
        assert ws.welcome["owned"][0]["status"] == "running"
        assert ws.welcome["decisions"] == [
            {
                "type": "decision",
                "checkpoint_id": checkpoint.id,
                "attempt_id": attempt.id,
                "status": "approved",
                "note": "go",
            }
        ]


async def test_an_agent_cannot_touch_another_agents_attempt_or_checkpoint(personas, device):
    other = await db(task_create)(group=personas.group, actor=personas.member, title="theirs")
    theirs = await offer(other, personas.agent.id)
    async with connected(device.raw_token) as ws:
        error = await call(ws, {"type": "accept", "id": "a", "attempt_id": theirs.id, "epoch": 1})
        assert error["code"] == "not_found"
        error = await call(ws, {"type": "decision_received", "id": "d", "checkpoint_id": 1})
        assert error["code"] == "not_found"
    assert (await db(Attempt.objects.get)(id=theirs.id)).status == "offered"


# --- limits and revocation ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ('{"type": "teleport", "id": "t"}', "unknown_type"),
        ('{"type": "accept", "id": "a", "attempt_id": "one", "epoch": 1}', "invalid"),
        ('{"type": "heartbeat", "id": "h", "extra": true}', "invalid"),
        ('{"type": "accept", "id": "a", "attempt_id": 1, "epoch": 0}', "invalid"),
        (
            '{"type": "progress", "id": "p", "attempt_id": 1, "epoch": 1, "seq": 1, "kind": "x"}',
            "invalid",
        ),
        ("[]", "bad_frame"),
        ("{", "bad_json"),
    ],
)
async def test_bad_frames_get_an_error_naming_the_problem(device, frame, code):
    async with connected(device.raw_token) as ws:
        await ws.send_to(text_data=frame)
        error = await ws.receive_json_from()
        assert (error["type"], error["code"]) == ("error", code)
        assert (await call(ws, {"type": "heartbeat", "id": "still-alive"}))["type"] == "ack"
    assert not await db(AgentMessage.objects.exists)()


async def test_an_oversized_frame_closes_with_1009(device):
    async with connected(device.raw_token) as ws:
        await ws.send_to(text_data="x" * (protocol.MAX_FRAME_BYTES + 1))
        assert (await ws.receive_output())["code"] == protocol.CLOSE_TOO_BIG


async def test_flooding_gets_rate_limited_then_closed(device):
    async with connected(device.raw_token) as ws:
        frames = [json.dumps({"type": "heartbeat", "id": f"h{i}"}) for i in range(400)]
        for frame in frames:
            await ws.send_to(text_data=frame)
        codes = []
        while True:
            output = await ws.receive_output(timeout=10)
            if output["type"] == "websocket.close":
                assert output["code"] == protocol.CLOSE_RATE_LIMITED
                break
            codes.append(json.loads(output["text"]).get("code"))
        assert "rate_limited" in codes


async def test_revoking_the_device_closes_its_socket_within_a_second(personas, device):
    async with connected(device.raw_token) as ws:
        await db(device_revoke)(actor=personas.owner, device=device)
        error = await ws.receive_json_from(timeout=1)
        assert error["code"] == "revoked"
        assert (await ws.receive_output(timeout=1))["code"] == protocol.CLOSE_REVOKED
    ws = WebsocketCommunicator(
        application,
        "/ws/agent/",
        headers=[(b"authorization", f"Bearer {device.raw_token}".encode())],
    )
    await ws.connect()
    assert (await ws.receive_json_from())["code"] == "unauthorized"
    await ws.disconnect()


async def test_a_completes_ack_does_not_wait_for_the_agents_next_offer(
    personas, device, monkeypatch
):
    """Completing frees the agent's slot and it is matched again at once, but beside the
    ack, not before it: complete -> ack stays quick however long matching takes, and the
    next offer arrives after the ack."""
    from apps.tasks import matching

    real_match = matching.tasks_match

    def slow_match(**kwargs):
        import time

        time.sleep(1.5)
        return real_match(**kwargs)

    async with connected(
        device.raw_token, hello={**HELLO, "agent": {**HELLO["agent"], "capacity": 1}}
    ) as ws:
        _, attempt, _ = await running_attempt(ws, personas)
        waiting = await new_task(personas, steps=[{"tool": "shell", "args": {"cmd": "next"}}])
        monkeypatch.setattr(matching, "tasks_match", slow_match)
        await ws.send_json_to(
            {
                "type": "complete",
                "id": "done",
                "attempt_id": attempt.id,
                "epoch": attempt.epoch,
                "result": {"ok": True},
            }
        )
        ack = await ws.receive_json_from(timeout=1)
        assert (ack["type"], ack["re"]) == ("ack", "done")
        assignment = await ws.receive_json_from(timeout=5)
        assert (assignment["type"], assignment["task"]["id"]) == ("assignment", waiting.id)
