"""Progress frames are written in batches (group commit): agent_progress_many for the batch,
the consumer's ProgressBatcher for the socket. Each frame keeps its own exactly-once
answer, a stale frame fails alone, and an attempt's progress keeps its order."""

import asyncio

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import IntegrityError, OperationalError

from apps.devices import consumers
from apps.devices.frames import agent_message_once, agent_progress_many
from apps.devices.models import AgentMessage
from apps.events.models import Event
from apps.tasks.services import attempt_accept, attempt_lose, task_assign, task_create
from claw import protocol
from claw.asgi import application
from tests.conftest import make_agent


def progress(attempt, seq: int, *, frame_id: str | None = None, epoch: int | None = None):
    return protocol.Progress(
        type="progress",
        id=frame_id or f"p{attempt.id}-{seq}",
        attempt_id=attempt.id,
        epoch=attempt.epoch if epoch is None else epoch,
        seq=seq,
        kind="log",
        data={"line": f"line {seq}"},
    )


def running(personas, agent):
    task = task_create(group=personas.group, actor=personas.member, title="job")
    attempt = task_assign(task_id=task.id, agent_id=agent.id)
    return attempt_accept(attempt_id=attempt.id, agent=agent, epoch=attempt.epoch)


# --- agent_progress_many -----------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_batch_gets_one_ack_per_frame_numbered_in_arrival_order(personas):
    beta = make_agent(personas.group, "beta")
    mine, theirs = running(personas, personas.agent), running(personas, beta)
    frames = [(personas.agent.id, progress(mine, 1)), (beta.id, progress(theirs, 1))]
    frames += [(personas.agent.id, progress(mine, 2)), (beta.id, progress(theirs, 2))]

    answers = agent_progress_many(frames=frames)

    assert [a["type"] for a in answers] == ["ack"] * 4
    assert [a["re"] for a in answers] == [frame.id for _, frame in frames]
    seqs = [a["result"]["event_seq"] for a in answers]
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    events = Event.objects.filter(kind="progress.log").order_by("seq")
    assert [(e.attempt_id, e.payload["seq"]) for e in events] == [
        (mine.id, 1),
        (theirs.id, 1),
        (mine.id, 2),
        (theirs.id, 2),
    ]
    assert AgentMessage.objects.count() == 4


@pytest.mark.django_db(transaction=True)
def test_a_stale_frame_gets_its_error_while_the_others_land(personas):
    beta = make_agent(personas.group, "beta")
    mine, lost = running(personas, personas.agent), running(personas, beta)
    attempt_lose(attempt_id=lost.id, reason="lease expired")
    frames = [
        (personas.agent.id, progress(mine, 1)),
        (beta.id, progress(lost, 1)),
        (personas.agent.id, progress(mine, 2)),
        (personas.agent.id, progress(lost, 1, frame_id="not-mine")),
    ]

    answers = agent_progress_many(frames=frames)

    assert [a["type"] for a in answers] == ["ack", "error", "ack", "error"]
    assert (answers[1]["code"], answers[1]["re"]) == ("stale_attempt", frames[1][1].id)
    assert answers[3]["code"] == "not_found"
    assert Event.objects.filter(kind="progress.log", attempt=mine).count() == 2
    assert Event.objects.filter(kind="progress.log", attempt=lost).count() == 0
    assert Event.objects.filter(kind="attempt.stale_write", attempt=lost).count() == 1
    assert AgentMessage.objects.count() == 4  # errors are answers too


@pytest.mark.django_db(transaction=True)
def test_replayed_ids_get_the_same_answer_and_change_nothing(personas):
    mine = running(personas, personas.agent)
    first, stale = progress(mine, 1), progress(mine, 2, epoch=mine.epoch + 1)
    frames = [(personas.agent.id, first), (personas.agent.id, stale)]
    answers = agent_progress_many(frames=frames)
    events = Event.objects.count()

    # Again in a batch (twice in the same one), and through the one-frame path.
    again = agent_progress_many(frames=[*frames, (personas.agent.id, first)])
    assert again == [*answers, answers[0]]
    assert agent_message_once(agent_id=personas.agent.id, frame=first) == answers[0]
    assert agent_message_once(agent_id=personas.agent.id, frame=stale) == answers[1]
    assert Event.objects.count() == events
    # A frame answered one by one is answered the same in a batch.
    later = progress(mine, 3)
    alone = agent_message_once(agent_id=personas.agent.id, frame=later)
    assert agent_progress_many(frames=[(personas.agent.id, later)]) == [alone]


@pytest.mark.django_db(transaction=True)
def test_a_frame_repeated_within_one_batch_lands_once(personas):
    mine = running(personas, personas.agent)
    frame = progress(mine, 1)
    answers = agent_progress_many(frames=[(personas.agent.id, frame)] * 3)
    assert answers[0]["type"] == "ack" and answers == [answers[0]] * 3
    assert Event.objects.filter(kind="progress.log").count() == 1


# --- through the socket ------------------------------------------------------------------


async def _connected(token: str, name: str = "alpha") -> WebsocketCommunicator:
    ws = WebsocketCommunicator(
        application, "/ws/agent/", headers=[(b"authorization", f"Bearer {token}".encode())]
    )
    ok, _ = await ws.connect()
    assert ok
    hello = {"type": "hello", "id": "h", "versions": [1], "agent": {"name": name, "capacity": 2}}
    hello["agent"]["toolkits"] = {"shell": "1", "python": "3"}
    await ws.send_json_to(hello)
    assert (await ws.receive_json_from(timeout=5))["type"] == "welcome"
    return ws


async def _answers(ws, count: int) -> dict[str, dict]:
    answers = {}
    while len(answers) < count:
        frame = await ws.receive_json_from(timeout=5)
        if frame["type"] in {"ack", "error"}:
            assert frame["re"] not in answers, frame  # one answer per frame
            answers[frame["re"]] = frame
    return answers


@pytest.mark.django_db(transaction=True)
async def test_a_burst_of_progress_gets_one_ack_each_in_order(personas):
    mine = await database_sync_to_async(running)(personas, personas.agent)
    ws = await _connected(personas.agent.device.raw_token)
    try:
        frames = [progress(mine, seq).model_dump(mode="json") for seq in range(1, 41)]
        for frame in frames:  # without waiting for the acks
            await ws.send_json_to(frame)
        answers = await _answers(ws, len(frames))
        assert {a["type"] for a in answers.values()} == {"ack"}
        seqs = [answers[f["id"]]["result"]["event_seq"] for f in frames]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(frames)
        # Replayed after a reconnect's resend: the same answers.
        for frame in frames[:5]:
            await ws.send_json_to(frame)
        assert await _answers(ws, 5) == {f["id"]: answers[f["id"]] for f in frames[:5]}
        assert await ws.receive_nothing(timeout=0.2)
    finally:
        await ws.disconnect()
    stored = await database_sync_to_async(
        lambda: list(
            Event.objects.filter(attempt=mine, kind="progress.log")
            .order_by("seq")
            .values_list("payload__seq", flat=True)
        )
    )()
    assert stored == list(range(1, 41))


@pytest.mark.django_db(transaction=True)
async def test_progress_then_complete_sent_at_once_land_in_order(personas):
    mine = await database_sync_to_async(running)(personas, personas.agent)
    ws = await _connected(personas.agent.device.raw_token)
    try:
        for seq in range(1, 6):
            await ws.send_json_to(progress(mine, seq).model_dump(mode="json"))
        complete = {"type": "complete", "id": "done", "attempt_id": mine.id, "epoch": mine.epoch}
        await ws.send_json_to(complete)
        answers = await _answers(ws, 6)
    finally:
        await ws.disconnect()
    assert {a["type"] for a in answers.values()} == {"ack"}
    assert answers["done"]["result"] == {"status": "succeeded"}
    kinds = await database_sync_to_async(
        lambda: list(
            Event.objects.filter(attempt=mine).order_by("seq").values_list("kind", flat=True)
        )
    )()
    assert kinds[-6:] == ["progress.log"] * 5 + ["task.succeeded"]


@pytest.mark.django_db(transaction=True)
async def test_sockets_share_batches_and_a_stale_one_fails_alone(personas, monkeypatch):
    beta = await database_sync_to_async(make_agent)(personas.group, "beta")
    mine = await database_sync_to_async(running)(personas, personas.agent)
    lost = await database_sync_to_async(running)(personas, beta)
    await database_sync_to_async(attempt_lose)(attempt_id=lost.id, reason="lease expired")
    sizes = []
    real = consumers.agent_progress_many

    def recording(*, frames):
        sizes.append(len(frames))
        return real(frames=frames)

    monkeypatch.setattr(consumers, "agent_progress_many", recording)
    monkeypatch.setattr(consumers.ProgressBatcher, "WAIT_S", 0.05)  # let both sockets join
    monkeypatch.setattr(consumers.ProgressBatcher, "WRITERS", 1)
    alpha_ws = await _connected(personas.agent.device.raw_token)
    beta_ws = await _connected(beta.device.raw_token, name="beta")
    try:
        for seq in range(1, 4):
            await alpha_ws.send_json_to(progress(mine, seq).model_dump(mode="json"))
            await beta_ws.send_json_to(progress(lost, seq).model_dump(mode="json"))
        alpha, beta_answers = await asyncio.gather(_answers(alpha_ws, 3), _answers(beta_ws, 3))
    finally:
        await alpha_ws.disconnect()
        await beta_ws.disconnect()
    assert {a["type"] for a in alpha.values()} == {"ack"}
    assert {a["code"] for a in beta_answers.values()} == {"stale_attempt"}
    assert max(sizes) > 1  # frames of both sockets went in one transaction


@pytest.mark.django_db(transaction=True)
async def test_a_colliding_batch_falls_back_to_one_frame_at_a_time(personas, monkeypatch):
    mine = await database_sync_to_async(running)(personas, personas.agent)

    def broken(*, frames):
        raise IntegrityError("an id raced in elsewhere")

    monkeypatch.setattr(consumers, "agent_progress_many", broken)
    ws = await _connected(personas.agent.device.raw_token)
    try:
        for seq in range(1, 4):
            await ws.send_json_to(progress(mine, seq).model_dump(mode="json"))
        answers = await _answers(ws, 3)
    finally:
        await ws.disconnect()
    assert {a["type"] for a in answers.values()} == {"ack"}
    count = Event.objects.filter(attempt=mine, kind="progress.log").count
    assert await database_sync_to_async(count)() == 3


@pytest.mark.django_db(transaction=True)
async def test_a_batch_the_database_refuses_fails_each_frame_with_internal_error(
    personas, monkeypatch
):
    mine = await database_sync_to_async(running)(personas, personas.agent)
    single_writes = []

    def broken(*, frames):
        raise OperationalError("the database went away")

    monkeypatch.setattr(consumers, "agent_progress_many", broken)
    monkeypatch.setattr(consumers, "agent_message_once", lambda **kw: single_writes.append(kw))
    ws = await _connected(personas.agent.device.raw_token)
    try:
        for seq in range(1, 4):
            await ws.send_json_to(progress(mine, seq).model_dump(mode="json"))
        answers = await _answers(ws, 3)
    finally:
        await ws.disconnect()
    assert {(a["type"], a["code"]) for a in answers.values()} == {("error", "internal_error")}
    assert single_writes == []  # no slow one-by-one retry against a database that is away
    count = Event.objects.filter(attempt=mine, kind="progress.log").count
    assert await database_sync_to_async(count)() == 0
