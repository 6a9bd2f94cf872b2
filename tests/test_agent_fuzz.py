"""Fuzzing /ws/agent/ with Hypothesis, through the real ASGI app (WebsocketCommunicator).

One agent socket stays open across a property's examples (a fresh one only after the server
closed it). After each fuzzed frame a heartbeat "sentinel" follows; its ack marks the end
of the fuzzed frame's answers, so "exactly one answer" is checked without waiting out a
timeout. Properties, for every frame:
- it gets exactly one `error` (or `ack`, for a valid frame), or a documented close code
  (1009 too big, 4429 rate limited, 4400 before hello);
- the server logs nothing at ERROR (the consumer logs unexpected failures there);
- the database changes only as the protocol says: nothing for a frame that fails to parse,
  a stored answer (AgentMessage) for a refused effectful frame, plus an
  `attempt.stale_write` event for a stale one; another group's rows never change.
"""

import asyncio
import itertools
import json
import logging
import threading
from dataclasses import dataclass, field

import pytest
from django.db import connection
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from apps.checkpoints.models import Checkpoint, CheckpointSource
from apps.checkpoints.services import checkpoint_raise
from apps.devices import consumers
from apps.events.models import Event
from apps.tasks.services import (
    attempt_accept,
    attempt_lose,
    task_assign,
    task_cancel,
    task_create,
)
from claw import protocol
from claw.asgi import application
from tests.conftest import make_agent

# 200 examples a property: on a loaded 2-core machine one has taken over the suite's
# default 120 s. Each wait inside stays bounded.
pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(360)]

FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.filter_too_much,
    ],
)
PARSE_CODES = {"bad_json", "bad_frame", "invalid", "unknown_type"}
MAX = protocol.MAX_FRAME_BYTES
AGENT_NAME = "builder"
HELLO = {
    "type": "hello",
    "versions": [1],
    "agent": {"name": AGENT_NAME, "toolkits": {"shell": "1.0"}, "capacity": 8},
}
EFFECTFUL = (
    "accept",
    "decline",
    "progress",
    "complete",
    "fail",
    "checkpoint_request",
    "decision_received",
)
_ids = itertools.count(1)


def fresh_id(suffix: str = "") -> str:
    return f"{next(_ids)}-{suffix}"[:64]


# --- the world: our agent's attempts, another agent's, another group's --------------------


@dataclass
class World:
    token: str
    agent_id: int
    running: int  # our running attempt, epoch 1
    lost: int  # our attempt that was lost, epoch 1 (its task is ready again)
    checkpoint: int  # a pending checkpoint of our running attempt
    neighbour: int  # an attempt of another agent in our group
    foreign_task: int  # another group's running task, attempt and checkpoint
    foreign: int
    foreign_checkpoint: int


@pytest.fixture
def world(personas) -> World:
    mine = make_agent(personas.group, AGENT_NAME, toolkits={"shell": "1.0"}, capacity=8)

    def running(group, actor, agent, title):
        task = task_create(group=group, actor=actor, title=title)
        attempt = task_assign(task_id=task.id, agent_id=agent.id)
        attempt_accept(attempt_id=attempt.id, agent=agent, epoch=attempt.epoch)
        return task, attempt

    task, attempt = running(personas.group, personas.member, mine, "mine")
    lost_task, lost = running(personas.group, personas.member, mine, "lost")
    attempt_lose(attempt_id=lost.id, reason="lease expired")
    # Not ready again: a hello matches its agent at once, and an offer made while an
    # example runs would count among its changes.
    task_cancel(actor=personas.member, task=lost_task)
    _, neighbour = running(personas.group, personas.member, personas.agent, "neighbour's")
    foreign_task, foreign = running(
        personas.other_group, personas.outsider, personas.other_agent, "theirs"
    )

    def checkpoint(group, task, attempt):
        return checkpoint_raise(
            group=group, task=task, attempt=attempt, source=CheckpointSource.AGENT, title="ok?"
        ).id

    return World(
        token=mine.device.raw_token,
        agent_id=mine.id,
        running=attempt.id,
        lost=lost.id,
        checkpoint=checkpoint(personas.group, task, attempt),
        neighbour=neighbour.id,
        foreign_task=foreign_task.id,
        foreign=foreign.id,
        foreign_checkpoint=checkpoint(personas.other_group, foreign_task, foreign),
    )


SNAPSHOT_SQL = """
SELECT
  (SELECT count(*) FROM tasks_task) AS tasks,
  (SELECT count(*) FROM tasks_attempt) AS attempts,
  (SELECT count(*) FROM events_event) AS events,
  (SELECT count(*) FROM checkpoints_checkpoint) AS checkpoints,
  (SELECT count(*) FROM devices_agentmessage) AS messages,
  (SELECT count(*) FROM devices_agent) AS agents,
  (SELECT status || ':' || epoch FROM tasks_task WHERE id = %(foreign_task)s) AS foreign_task,
  (SELECT status || ':' || epoch || ':' || COALESCE(CAST(lease_expires_at AS TEXT), '')
     FROM tasks_attempt WHERE id = %(foreign)s) AS foreign_attempt,
  (SELECT status || ':' || COALESCE(CAST(delivered_at AS TEXT), '')
     FROM checkpoints_checkpoint WHERE id = %(foreign_checkpoint)s) AS foreign_checkpoint,
  (SELECT status || ':' || epoch || ':' || COALESCE(CAST(lease_expires_at AS TEXT), '')
     FROM tasks_attempt WHERE id = %(neighbour)s) AS neighbour,
  (SELECT status || ':' || epoch FROM tasks_attempt WHERE id = %(running)s) AS running,
  (SELECT status || ':' || epoch FROM tasks_attempt WHERE id = %(lost)s) AS lost,
  (SELECT status || ':' || COALESCE(CAST(delivered_at AS TEXT), '')
     FROM checkpoints_checkpoint WHERE id = %(checkpoint)s) AS checkpoint
"""


def snapshot(w: World) -> dict:
    """Row counts, and the state of every watched row, in one query."""
    with connection.cursor() as cursor:
        cursor.execute(SNAPSHOT_SQL, vars(w))
        names = [col[0] for col in cursor.description]
        return dict(zip(names, cursor.fetchone(), strict=True))


def changes(before: dict, after: dict) -> dict:
    """What changed: count deltas for counts, (before, after) for states."""
    out = {}
    for key, old in before.items():
        new = after[key]
        if new != old:
            out[key] = new - old if isinstance(old, int) else (old, new)
    return out


# --- the socket, driven from the test thread --------------------------------------------


@dataclass
class Outcome:
    answers: list[dict]
    close: int | None


async def _send(ws, payload: str | bytes) -> None:
    # send_to() refuses empty frames, which a real socket can carry.
    key = "bytes" if isinstance(payload, bytes) else "text"
    await ws.send_input({"type": "websocket.receive", key: payload})


@dataclass
class AgentLink:
    """An agent socket on an event loop in a background thread, so that Hypothesis (which
    is synchronous) can keep one connection open across examples."""

    token: str
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    ws: object = None
    closed: bool = False
    stored: list[tuple[str, dict]] = field(default_factory=list)  # (id, answer) of effects

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro, timeout: float = 60):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _open(self, hello: bool):
        from channels.testing import WebsocketCommunicator

        headers = [(b"authorization", f"Bearer {self.token}".encode())]
        ws = WebsocketCommunicator(application, "/ws/agent/", headers=headers)
        ok, _ = await ws.connect(timeout=10)
        assert ok
        if hello:
            await ws.send_json_to({**HELLO, "id": fresh_id("hello")})
            welcome = await ws.receive_json_from(timeout=10)
            assert welcome["type"] == "welcome", welcome
        return ws

    async def _drop(self) -> None:
        if self.ws is not None:
            await self.ws.disconnect(timeout=10)  # waits until the consumer has finished
        self.ws, self.closed = None, False

    def ready(self) -> None:
        """An open socket that has said hello (a new one if the server closed the last)."""
        if self.closed:
            self.run(self._drop())
        if self.ws is None:
            self.ws = self.run(self._open(hello=True))

    async def _answers(self, ws, until: str | None) -> Outcome:
        answers = []
        while True:
            output = await ws.receive_output(timeout=20)  # re-raises a crash of the consumer
            if output["type"] == "websocket.close":
                return Outcome(answers, output.get("code", 1000))
            frame = json.loads(output["text"])
            if until is not None and frame.get("re") == until and frame["type"] == "ack":
                return Outcome(answers, None)
            answers.append(frame)

    async def _exchange(self, payload: str | bytes) -> Outcome:
        sentinel = fresh_id("sentinel")
        await _send(self.ws, payload)
        await self.ws.send_json_to({"type": "heartbeat", "id": sentinel})
        return await self._answers(self.ws, sentinel)

    def exchange(self, payload: str | bytes) -> Outcome:
        """Send one frame on the hello'd socket; its answers up to the sentinel's ack."""
        self.ready()
        outcome = self.run(self._exchange(payload))
        self.closed = outcome.close is not None
        return outcome

    async def _first(self, payload: str | bytes) -> Outcome:
        ws = await self._open(hello=False)
        try:
            await _send(ws, payload)
            return await self._answers(ws, None)
        finally:
            await ws.disconnect(timeout=10)

    def first_frame(self, payload: str | bytes) -> Outcome:
        """A new socket whose first frame is `payload`."""
        return self.run(self._first(payload))

    async def _flood(self, frames: list[str]) -> Outcome:
        for frame in frames:
            await self.ws.send_to(text_data=frame)
        answers: list[dict] = []
        while len(answers) < len(frames):
            output = await self.ws.receive_output(timeout=20)
            if output["type"] == "websocket.close":
                return Outcome(answers, output.get("code", 1000))
            answers.append(json.loads(output["text"]))
        return Outcome(answers, None)

    def flood(self, frames: list[str]) -> Outcome:
        """Send all frames at once, then read an answer per frame (or up to a close)."""
        self.ready()
        outcome = self.run(self._flood(frames))
        self.closed = True  # leftover answers are not worth reading: start afresh
        return outcome

    def close(self) -> None:
        try:
            self.run(self._drop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def check(self) -> None:
        if self.records:
            shown = "\n".join(
                f"{r.name}: {r.getMessage()}\n{self.format(r) if r.exc_info else ''}"
                for r in self.records
            )
            self.records.clear()
            raise AssertionError(f"the server logged errors:\n{shown}")


@pytest.fixture
def server_errors():
    handler = ErrorLog()
    handler.setFormatter(logging.Formatter())
    loggers = [logging.getLogger(name) for name in ("apps", "django", "channels", "daphne")]
    for logger in loggers:
        logger.addHandler(handler)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)
    handler.check()


@pytest.fixture
def link(world, monkeypatch):
    # A sentinel follows every fuzzed frame; the rate limit has its own property below.
    monkeypatch.setattr(consumers, "BURST", 1_000_000)
    link = AgentLink(world.token)
    yield link
    link.close()


# --- strategies --------------------------------------------------------------------------

client_ids = st.from_regex(r"\A[A-Za-z0-9_.:-]{0,30}\Z").map(fresh_id)
storable_text = st.text(
    st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=40
)
storable_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(min_value=-1e12, max_value=1e12, allow_nan=False)
    | storable_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(storable_text, inner, max_size=4),
    max_leaves=20,
)
any_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)
not_int = st.one_of(
    st.text(max_size=10),
    st.from_regex(r"\A-?[0-9]{1,5}\Z"),  # "5" is not 5
    st.floats(),  # neither is 5.0
    st.booleans(),
    st.none(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)
not_str = st.one_of(
    st.integers(), st.floats(), st.booleans(), st.none(), st.lists(st.text(max_size=3))
)
not_bool = st.one_of(
    st.integers(), st.sampled_from(["true", "yes", "1", "on"]), st.none(), st.floats()
)
not_dict = st.one_of(st.integers(), st.text(max_size=5), st.none(), st.lists(st.integers()))
not_list = st.one_of(
    st.integers(), st.text(max_size=5), st.none(), st.dictionaries(st.text(), st.integers())
)
unstorable_text = st.tuples(
    st.text(max_size=10),
    st.sampled_from(["\x00"]) | st.characters(categories=["Cs"]),
    st.text(max_size=10),
).map("".join)


def long_text(limit: int) -> st.SearchStrategy[str]:
    return st.integers(limit + 1, limit + 40).flatmap(
        lambda n: st.sampled_from(["x", "é", "字"]).map(lambda ch: ch * n)
    )


def out_of_range(low: int, high: int) -> st.SearchStrategy[int]:
    return st.integers(max_value=low - 1) | st.integers(min_value=high + 1, max_value=high * 64)


POSITIVE, EPOCH = (1, 2**62), (1, 2**31)
ENUMS = {
    "kind": {"step", "tool_call", "log", "artifact"},
    "reason": {"busy", "missing_tool", "shutting_down", "other"},
}
TEXT_LIMITS = {"message": 1000, "error": 2000, "title": 200, "details": 20000}
REQUIRED_TEXT = {"error", "title"}


def wrong_values(name: str) -> st.SearchStrategy:
    """Values that make field `name` invalid, whatever the rest of the frame says."""
    if name == "id":
        return st.one_of(
            not_str,
            st.just(""),
            st.from_regex(r"\A[A-Za-z0-9]{65,80}\Z"),
            st.from_regex(r"\A[A-Za-z0-9]{0,5}[ /\"'{é\x00!][A-Za-z0-9]{0,5}\Z"),
        )
    if name in {"attempt_id", "checkpoint_id"}:
        return not_int | out_of_range(*POSITIVE)
    if name in {"epoch", "seq"}:
        return not_int | out_of_range(*EPOCH)
    if name in ENUMS:
        return not_str | st.text(max_size=12).filter(lambda s: s not in ENUMS[name])
    if name in TEXT_LIMITS:
        bad = not_str | long_text(TEXT_LIMITS[name]) | unstorable_text
        return bad | st.just("") if name in REQUIRED_TEXT else bad
    if name == "retryable":
        return not_bool
    if name == "data":
        return not_dict | st.dictionaries(st.text(max_size=5), unstorable_text, min_size=1)
    if name == "options":
        return (
            not_list
            | st.lists(st.text(max_size=5), min_size=11, max_size=14)
            | st.lists(not_str, min_size=1, max_size=2)
            | long_text(100).map(lambda s: [s])
        )
    if name == "result":
        return unstorable_text | st.lists(unstorable_text, min_size=1, max_size=2)
    if name == "versions":
        return not_list | st.just([]) | st.lists(not_int, min_size=1, max_size=2)
    if name == "agent":
        return not_dict | st.sampled_from(
            [
                {"name": "", "toolkits": {}},
                {"name": "x" * 101, "toolkits": {}},
                {"name": "n", "toolkits": {"Not A Slug": "1"}},
                {"name": "n", "toolkits": {}, "capacity": 0},
                {"name": "n", "toolkits": {}, "capacity": 257},
                {"name": "n", "toolkits": {}, "capacity": "2"},
                {"name": "n", "toolkits": {}, "surprise": 1},
                {"name": "n\x00", "toolkits": {}},
                {"toolkits": {}},
            ]
        )
    raise AssertionError(name)


def templates(w: World) -> dict[str, dict]:
    """A well-formed frame of every type (the effectful ones aimed at our running attempt),
    without its id."""
    on = {"attempt_id": w.running, "epoch": 1}
    return {
        "hello": HELLO,
        "heartbeat": {"type": "heartbeat"},
        "drain": {"type": "drain"},
        "accept": {"type": "accept", **on},
        "decline": {"type": "decline", **on, "reason": "busy", "message": "later"},
        "progress": {"type": "progress", **on, "seq": 1, "kind": "log", "data": {"line": "ok"}},
        "complete": {"type": "complete", **on, "result": {"ok": True}},
        "fail": {"type": "fail", **on, "error": "boom", "retryable": True},
        "checkpoint_request": {"type": "checkpoint_request", **on, "title": "Ship?"},
        "decision_received": {"type": "decision_received", "checkpoint_id": w.checkpoint},
    }


@st.composite
def mutated_frames(draw, w: World, types=None) -> tuple[dict, set[str]]:
    """A frame made invalid by construction: one field of the wrong type or out of range,
    a required field missing, an unknown field, an unknown type. Returns the frame and
    the error codes it may get."""
    kind = draw(st.sampled_from(sorted(types or templates(w))))
    frame = {**templates(w)[kind], "id": draw(client_ids)}
    how = draw(st.sampled_from(["wrong", "wrong", "wrong", "missing", "unknown", "type"]))
    if how == "wrong":
        name = draw(st.sampled_from(sorted(set(frame) - {"type"} | set(_optional(kind)))))
        frame[name] = draw(wrong_values(name))
        return frame, {"invalid", "bad_json"}  # bad_json: a NaN or ±Infinity was drawn
    if how == "missing":
        name = draw(st.sampled_from(sorted(set(frame) - set(_optional(kind)))))
        del frame[name]
        return frame, {"invalid"}
    if how == "unknown":
        name = draw(st.text(max_size=20).filter(lambda s: s not in _fields(kind)))
        frame[name] = draw(any_json)
        return frame, {"invalid", "bad_json"}
    frame["type"] = draw(not_str | st.text(max_size=20).filter(lambda s: s not in templates(w)))
    return frame, {"unknown_type", "invalid", "bad_json"}


def _fields(kind: str) -> set[str]:
    model = {
        "hello": protocol.Hello,
        "heartbeat": protocol.Heartbeat,
        "drain": protocol.Drain,
        "accept": protocol.Accept,
        "decline": protocol.Decline,
        "progress": protocol.Progress,
        "complete": protocol.Complete,
        "fail": protocol.Fail,
        "checkpoint_request": protocol.CheckpointRequest,
        "decision_received": protocol.DecisionReceived,
    }[kind]
    return set(model.model_fields)


def _optional(kind: str) -> list[str]:
    return {
        "decline": ["message"],
        "progress": ["data"],
        "complete": ["result"],
        "checkpoint_request": ["details", "options"],
    }.get(kind, [])


garbage_text = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.sampled_from(["", " ", "{", "}", "[]", "null", "NaN", "-Infinity", "1e999", '"x"']),
    st.integers(min_value=4301, max_value=6000).map(lambda n: "9" * n),
    st.integers(min_value=900, max_value=40_000).flatmap(  # all under the frame limit
        lambda n: st.sampled_from(["[" * n + "]" * n, '{"a":' * n + "1" + "}" * n, "[" * n])
    ),
    st.integers(min_value=900, max_value=20_000).map(
        lambda n: '{"type":"heartbeat","id":"deep","x":' + "[" * n + "]" * n + "}"
    ),
)


def _answer_of(outcome: Outcome) -> dict:
    assert outcome.close is None, f"closed with {outcome.close}, answers {outcome.answers}"
    assert len(outcome.answers) == 1, f"{len(outcome.answers)} answers: {outcome.answers}"
    return outcome.answers[0]


def _readable_id(frame) -> str | None:
    if isinstance(frame, dict) and isinstance(frame.get("id"), str) and len(frame["id"]) <= 64:
        return frame["id"]
    return None


# --- properties on an open, hello'd socket ------------------------------------------------


@FUZZ
@given(text=garbage_text)
def test_garbage_gets_one_parse_error_and_changes_nothing(world, link, server_errors, text):
    link.ready()
    before = snapshot(world)
    answer = _answer_of(link.exchange(text))
    server_errors.check()
    assert (answer["type"], answer["code"] in PARSE_CODES) == ("error", True), answer
    assert changes(before, snapshot(world)) == {}


@FUZZ
@given(value=any_json, data=st.data())
def test_random_json_gets_one_parse_error_and_changes_nothing(
    world, link, server_errors, value, data
):
    if data.draw(st.booleans()) and isinstance(value, dict):  # sometimes dressed as a frame
        value["type"] = data.draw(st.sampled_from([*templates(world), "teleport"]))
        value.setdefault("id", data.draw(client_ids))
    text = json.dumps(value)
    try:  # the odd random dict that is a valid frame is not this property's business
        protocol.parse_client_frame(text)
        assume(False)
    except protocol.FrameError:
        pass
    link.ready()
    before = snapshot(world)
    answer = _answer_of(link.exchange(text))
    server_errors.check()
    assert answer["type"] == "error" and answer["code"] in PARSE_CODES, answer
    assert answer["re"] in {None, _readable_id(value)}
    assert changes(before, snapshot(world)) == {}


@FUZZ
@given(data=st.data())
def test_a_frame_with_one_bad_field_is_invalid_and_changes_nothing(
    world, link, server_errors, data
):
    frame, codes = data.draw(mutated_frames(world))
    link.ready()
    before = snapshot(world)
    answer = _answer_of(link.exchange(json.dumps(frame)))
    server_errors.check()
    assert answer["type"] == "error" and answer["code"] in codes, (frame, answer)
    if answer["code"] != "bad_json":
        assert answer["re"] == _readable_id(frame), (frame, answer)
    assert changes(before, snapshot(world)) == {}


@FUZZ
@given(data=st.data())
def test_writes_to_others_or_stale_epochs_are_refused_recorded_and_replay_the_same(
    world, link, server_errors, data
):
    kind = data.draw(st.sampled_from(EFFECTFUL))
    frame = {**templates(world)[kind], "id": data.draw(client_ids)}
    if kind == "decision_received":
        frame["checkpoint_id"] = world.foreign_checkpoint
        expected = "not_found"
    else:
        target = data.draw(st.sampled_from(["foreign", "neighbour", "lost", "epoch"]))
        if target in {"foreign", "neighbour"}:
            frame["attempt_id"] = getattr(world, target)
            frame["epoch"] = data.draw(st.integers(*EPOCH) | st.just(1))
            expected = "not_found"
        elif target == "lost":
            frame["attempt_id"] = world.lost
            frame["epoch"] = data.draw(st.integers(*EPOCH))
            expected = "stale_attempt"
        else:  # our running attempt, at an epoch it does not hold
            frame["epoch"] = data.draw(st.integers(2, EPOCH[1]))
            expected = "stale_attempt"
    link.ready()
    before = snapshot(world)
    answer = _answer_of(link.exchange(json.dumps(frame)))
    server_errors.check()
    assert (answer["type"], answer["code"], answer["re"]) == ("error", expected, frame["id"])
    stale_events = 1 if expected == "stale_attempt" else 0
    assert changes(before, snapshot(world)) == (
        {"messages": 1, "events": 1} if stale_events else {"messages": 1}
    )
    if stale_events:
        last = Event.objects.order_by("-id").first()
        assert (last.kind, last.attempt_id) == ("attempt.stale_write", frame["attempt_id"])

    # The same id again, even dressed as another effectful frame: the same answer, no effect.
    replay = {**templates(world)[data.draw(st.sampled_from(EFFECTFUL))], "id": frame["id"]}
    before = snapshot(world)
    assert _answer_of(link.exchange(json.dumps(replay))) == answer
    server_errors.check()
    assert changes(before, snapshot(world)) == {}


@st.composite
def valid_frames(draw, w: World) -> dict:
    kind = draw(st.sampled_from(["progress", "progress", "heartbeat", "checkpoint", "seen"]))
    on = {"attempt_id": w.running, "epoch": 1}
    frame_id = draw(client_ids)
    if kind == "progress":
        data = draw(st.dictionaries(storable_text, storable_json, max_size=5))
        if draw(st.booleans()):  # the protocol's own seq lives beside the agent's data
            data["seq"] = draw(storable_json)
        depth = draw(st.integers(0, 800))
        if depth:
            data["deep"] = json.loads("[" * depth + "]" * depth)
        if draw(st.integers(0, 9)) == 0:
            data["big"] = draw(st.sampled_from("xé字🦀")) * draw(st.integers(1000, 60_000))
        return {
            "type": "progress",
            "id": frame_id,
            **on,
            "seq": draw(st.integers(*EPOCH)),
            "kind": draw(st.sampled_from(sorted(ENUMS["kind"]))),
            "data": data,
        }
    if kind == "heartbeat":
        return {"type": "heartbeat", "id": frame_id}
    if kind == "seen":
        return {"type": "decision_received", "id": frame_id, "checkpoint_id": w.checkpoint}
    title = draw(
        st.text(
            st.characters(exclude_characters="\x00", exclude_categories=["Cs"]),
            min_size=1,
            max_size=200,
        )
    )
    options = st.text(
        st.characters(exclude_characters="\x00", exclude_categories=["Cs"]), max_size=100
    )
    return {
        "type": "checkpoint_request",
        "id": frame_id,
        **on,
        "title": title,
        "details": draw(storable_text),
        "options": draw(st.lists(options, max_size=10)),
    }


@FUZZ
@given(data=st.data())
def test_valid_frames_are_acked_once_and_replays_answer_the_same(world, link, server_errors, data):
    frame = data.draw(valid_frames(world))
    text = json.dumps(frame)
    assume(len(text.encode()) <= MAX)
    link.ready()
    before = snapshot(world)
    answer = _answer_of(link.exchange(text))
    server_errors.check()
    delta = changes(before, snapshot(world))
    assert answer["re"] == frame["id"], answer
    if frame["type"] == "progress" and answer["type"] == "error":
        # Data nested past the decoder's depth: refused before anything happened.
        assert (answer["code"], delta) == ("bad_json", {}), answer
        return
    if frame["type"] == "checkpoint_request" and not frame["title"].strip():
        assert (answer["code"], delta) == ("invalid", {"messages": 1}), answer
        return
    assert answer["type"] == "ack", (frame, answer)
    match frame["type"]:
        case "heartbeat":
            assert (answer["result"], delta) == ({"leases_extended": 1}, {})
            return
        case "decision_received":  # the checkpoint is still pending: nothing to confirm
            assert (answer["result"], delta) == ({"first_delivery": False}, {"messages": 1})
        case "checkpoint_request":
            assert delta == {"messages": 1, "events": 1, "checkpoints": 1}
            stored = Checkpoint.objects.get(id=answer["result"]["checkpoint_id"])
            assert (stored.title, stored.options) == (frame["title"].strip(), frame["options"])
        case "progress":
            assert delta == {"messages": 1, "events": 1}
            event = Event.objects.filter(attempt_id=world.running).order_by("-id").first()
            assert event.seq == answer["result"]["event_seq"]
            assert event.kind == f"progress.{frame['kind']}"
            assert event.payload == {**frame["data"], "seq": frame["seq"]}
    link.stored.append((frame["id"], answer))

    # Replay this frame's id or an earlier one (an index, so that draws never depend on
    # what earlier examples stored).
    replay_id, stored_answer = link.stored[-1 - data.draw(st.integers(0, 50)) % len(link.stored)]
    kind = data.draw(st.sampled_from(EFFECTFUL))
    replay = {**templates(world)[kind], "id": replay_id}
    before = snapshot(world)
    assert _answer_of(link.exchange(json.dumps(replay))) == stored_answer
    server_errors.check()
    assert changes(before, snapshot(world)) == {}


def _sized_progress(w: World, size: int, pad: str) -> str:
    """A valid progress frame of about `size` UTF-8 bytes (exactly, when `pad` allows)."""
    frame = {
        "type": "progress",
        "id": fresh_id("big"),
        "attempt_id": w.running,
        "epoch": 1,
        "seq": 1,
        "kind": "log",
        "data": {"pad": ""},
    }
    bare = len(json.dumps(frame, ensure_ascii=False).encode())
    n = max(0, (size - bare) // len(pad.encode()))
    frame["data"]["pad"] = pad * n
    return json.dumps(frame, ensure_ascii=False)


@settings(FUZZ, max_examples=40)
@given(
    size=st.integers(MAX - 64, MAX + 64) | st.integers(MAX + 65, 4 * MAX),
    pad=st.sampled_from(["x", "é", "€", "🦀"]),
)
def test_frames_up_to_the_limit_work_and_bigger_ones_close_1009(
    world, link, server_errors, size, pad
):
    text = _sized_progress(world, size, pad)
    link.ready()
    before = snapshot(world)
    outcome = link.exchange(text)
    server_errors.check()
    delta = changes(before, snapshot(world))
    if len(text.encode()) > MAX:
        assert (outcome.answers, outcome.close, delta) == ([], protocol.CLOSE_TOO_BIG, {})
    else:
        answer = _answer_of(outcome)
        assert answer["type"] == "ack", answer
        assert delta == {"messages": 1, "events": 1}


# --- properties on fresh sockets ---------------------------------------------------------


@st.composite
def not_a_hello(draw, w: World) -> str | bytes:
    choice = draw(st.sampled_from(["garbage", "json", "frame", "mutated", "binary", "version"]))
    if choice == "garbage":
        return draw(garbage_text)
    if choice == "json":
        return json.dumps(draw(any_json))
    if choice == "frame":
        kind = draw(st.sampled_from([k for k in templates(w) if k != "hello"]))
        return json.dumps({**templates(w)[kind], "id": draw(client_ids)})
    if choice == "mutated":
        return json.dumps(draw(mutated_frames(w, types=["hello"]))[0])
    if choice == "binary":
        return draw(st.binary(max_size=100))
    versions = draw(st.lists(st.integers(-5, 2**31).filter(lambda v: v != 1), min_size=1))
    return json.dumps({**HELLO, "id": draw(client_ids), "versions": versions[:10]})


# A fresh socket per example (~0.8 s each): 60 keep CI's time in bounds; the frames drawn
# are the same strategies the 200-example properties above send on an open socket.
@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_anything_but_hello_first_gets_an_error_and_4400(world, link, server_errors, data):
    payload = data.draw(not_a_hello(world))
    before = snapshot(world)
    outcome = link.first_frame(payload)
    server_errors.check()
    assert outcome.close == protocol.CLOSE_PROTOCOL, outcome
    assert len(outcome.answers) == 1 and outcome.answers[0]["type"] == "error", outcome
    assert outcome.answers[0]["code"] in PARSE_CODES | {
        "hello_first",
        "unsupported_version",
        "text_only",
    }
    assert changes(before, snapshot(world)) == {}


@settings(FUZZ, max_examples=5)
@given(
    count=st.integers(50, 400),
    mix=st.lists(st.sampled_from(["heartbeat", "garbage", "invalid"]), min_size=1),
)
def test_a_flood_is_answered_frame_by_frame_until_4429(
    world, link, server_errors, monkeypatch, count, mix
):
    monkeypatch.setattr(consumers, "BURST", protocol_burst := 200)
    link.closed = True  # a new socket, with the real bucket
    link.ready()
    kinds = itertools.islice(itertools.cycle(mix), count)
    frames = [
        {
            "heartbeat": json.dumps({"type": "heartbeat", "id": fresh_id("hb")}),
            "garbage": "{not json",
            "invalid": json.dumps({"type": "accept", "id": fresh_id("x"), "attempt_id": "1"}),
        }[kind]
        for kind in kinds
    ]
    before = snapshot(world)
    outcome = link.flood(frames)
    server_errors.check()
    limited = [a for a in outcome.answers if a.get("code") == "rate_limited"]
    if outcome.close is not None:
        assert outcome.close == protocol.CLOSE_RATE_LIMITED, outcome.close
        assert len(limited) == consumers.MAX_RATE_VIOLATIONS
        assert count > protocol_burst + consumers.MAX_RATE_VIOLATIONS
    else:
        assert len(outcome.answers) == count and len(limited) <= consumers.MAX_RATE_VIOLATIONS
    assert all(a["type"] in {"ack", "error"} for a in outcome.answers)
    assert changes(before, snapshot(world)) == {}
