"""The browser event socket through a real Daphne on real Redis and PostgreSQL.

The trap this guards: redis-py 8 defaults socket_timeout to 5 s, the same as
channels_redis's blocking pop, so every idle consumer crashed after ~5 s. A socket held
open for longer than that must still deliver the next event."""

import asyncio
import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.live import PYTHON, Browser, dedicated_services, free_port, manage, running
from tests.live import child_env as _child_env
from tests.live import wait_listening as _wait_listening

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

SETUP = """
from django.contrib.auth import get_user_model
from apps.groups.services import group_create
User = get_user_model()
alice = User.objects.create_user("alice", password="alice-pw-123")
charlie = User.objects.create_user("charlie", password="charlie-pw-123")
group_create(user=alice, name="Live", slug="live")
group_create(user=charlie, name="Elsewhere", slug="elsewhere")
"""

CREATE_TASK = """
from django.contrib.auth import get_user_model
from apps.groups.models import Group
from apps.tasks.services import task_create
task = task_create(
    group=Group.objects.get(slug="live"),
    actor=get_user_model().objects.get(username="alice"),
    title={title!r},
)
print(task.id)
"""

# A matcher batch appends its task.assigned events with one seq range and announces them
# with one events.appended message; the socket sends each event.
MATCH_BATCH = """
from apps.devices.models import Agent, Device
from apps.groups.models import Group
from apps.tasks.matching import tasks_match
from apps.tasks.models import Task
group = Group.objects.get(slug="live")
device = Device.objects.create(
    group=group, name="batch", token_hash="b" * 64, token_prefix="b",
    paired_at="2026-01-01T00:00:00Z",
)
Agent.objects.create(group=group, device=device, name="wide", capacity=50, status="online")
for i in range(3):
    Task.objects.create(group=group, title=f"batch {{i}}", max_attempts=3)
print(len(tasks_match(group_id=group.id)))
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Daphne serving claw.asgi on a dedicated database, with alice (owner of "live") and
    charlie (an outsider to it) signed in."""
    with dedicated_services("live", tmp_path_factory.mktemp("live")) as services:
        manage(services, "shell", "-v", "0", "-c", SETUP)
        port = free_port()
        command = [PYTHON, "-m", "claw.web", "-b", "127.0.0.1", "-p", str(port)]
        env = _child_env(DJANGO_SETTINGS_MODULE="claw.settings", **services)
        with running("daphne", [*command, "claw.asgi:application"], env) as daphne:
            _wait_listening(port, 30, daphne)
            base = f"http://127.0.0.1:{port}"
            sessions = {}
            for name in ("alice", "charlie"):
                browser = Browser(base)
                browser.sign_in(name, f"{name}-pw-123")
                sessions[name] = browser.cookie("sessionid")
            yield {
                "port": port,
                "origin": base,
                "services": services,
                "sessions": sessions,
                "daphne": daphne,
            }
            assert not [line for line in daphne.lines if "Traceback" in line], daphne.output()


def _socket(server, *, user="alice", origin=None, slug="live"):
    return connect(
        f"ws://127.0.0.1:{server['port']}/ws/groups/{slug}/events/",
        origin=origin or server["origin"],
        additional_headers={"Cookie": f"sessionid={server['sessions'][user]}"},
        proxy=None,
        open_timeout=10,
    )


async def _frames_until(ws, predicate, timeout: float) -> list[dict]:
    frames: list[dict] = []
    async with asyncio.timeout(timeout):
        while not frames or not predicate(frames[-1]):
            frames.append(json.loads(await ws.recv()))
    return frames


def _create_task(server, title: str) -> int:
    output = manage(server["services"], "shell", "-v", "0", "-c", CREATE_TASK.format(title=title))
    return int(output.split()[-1])


def test_a_socket_idle_for_12s_still_gets_the_next_event(server):
    async def scenario():
        async with _socket(server) as ws:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(ws.recv(), 12)  # idle, and nothing arrives
            task_id = await asyncio.to_thread(_create_task, server, "after the quiet")
            frames = await _frames_until(ws, lambda f: f.get("task_id") == task_id, 10)
            frame = frames[-1]
            assert frame["type"] == "event" and frame["kind"] == "task.created"
            assert frame["payload"]["title"] == "after the quiet"

    asyncio.run(scenario())


def test_a_matched_batch_reaches_the_socket_as_one_frame_per_event(server):
    async def scenario():
        async with _socket(server) as ws:
            output = await asyncio.to_thread(
                manage, server["services"], "shell", "-v", "0", "-c", MATCH_BATCH.format()
            )
            matched = int(output.split()[-1])
            assert matched >= 3
            assigned: list[dict] = []

            def all_assigned(frame: dict) -> bool:
                if frame.get("kind") == "task.assigned":
                    assigned.append(frame)
                return len(assigned) == matched

            await _frames_until(ws, all_assigned, 10)
            first = assigned[0]["seq"]
            assert [f["seq"] for f in assigned] == list(range(first, first + matched))

    asyncio.run(scenario())


def test_resume_replays_the_groups_events_from_the_database(server):
    task_id = _create_task(server, "before connecting")

    async def scenario():
        async with _socket(server) as ws:
            await ws.send(json.dumps({"type": "resume", "after": 0}))
            frames = await _frames_until(ws, lambda f: f.get("task_id") == task_id, 10)
            assert frames[0]["kind"] == "group.created"
            assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))

            await ws.send(json.dumps({"type": "resume", "after": frames[-2]["seq"]}))
            again = await _frames_until(ws, lambda f: f.get("task_id") == task_id, 10)
            assert again == frames[-1:]

    asyncio.run(scenario())


def test_a_socket_from_another_origin_is_refused(server):
    async def scenario():
        with pytest.raises(InvalidStatus) as refused:
            async with _socket(server, origin="http://evil.example"):
                pass
        assert refused.value.response.status_code == 403

    asyncio.run(scenario())


def test_an_outsider_is_closed_with_4403(server):
    async def scenario():
        async with _socket(server, user="charlie") as ws:
            with pytest.raises(ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 5)
        assert closed.value.rcvd.code == 4403

    asyncio.run(scenario())


def test_the_outsider_can_follow_their_own_group(server):
    async def scenario():
        async with _socket(server, user="charlie", slug="elsewhere") as ws:
            await ws.send(json.dumps({"type": "resume", "after": 0}))
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert frame["kind"] == "group.created"
            assert frame["payload"]["slug"] == "elsewhere"

    asyncio.run(scenario())
