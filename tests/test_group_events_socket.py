"""The group event socket (/ws/groups/SLUG/events/) through the real ASGI app: who may
connect, and that losing access closes it."""

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from apps.groups.services import membership_remove
from apps.tasks.services import task_create
from claw.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)

db = database_sync_to_async


@db
def session_cookie(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


async def events_socket(user, slug: str = "research") -> WebsocketCommunicator:
    headers = [
        (b"origin", b"http://testserver"),
        (b"cookie", f"sessionid={await session_cookie(user)}".encode()),
    ]
    ws = WebsocketCommunicator(application, f"/ws/groups/{slug}/events/", headers=headers)
    connected, _ = await ws.connect()
    assert connected
    return ws


async def closed_with(ws) -> int:
    while True:
        output = await ws.receive_output(timeout=5)
        if output["type"] == "websocket.close":
            return output["code"]


@db
def new_task(personas, title: str):
    return task_create(group=personas.group, actor=personas.owner, title=title)


async def test_a_member_gets_the_groups_events(personas):
    ws = await events_socket(personas.viewer)
    try:
        task = await new_task(personas, "visible")
        frame = await ws.receive_json_from(timeout=5)
        assert frame["kind"] == "task.created" and frame["task_id"] == task.id
    finally:
        await ws.disconnect()


async def test_an_outsider_is_closed_with_4403(personas):
    ws = await events_socket(personas.outsider)
    assert await closed_with(ws) == 4403


async def test_a_removed_member_is_closed_with_4403_and_gets_nothing_more(personas):
    ws = await events_socket(personas.viewer)
    try:
        await db(membership_remove)(
            actor=personas.owner, group=personas.group, user=personas.viewer
        )
        assert await closed_with(ws) == 4403
        await new_task(personas, "secret plans")
        assert await ws.receive_nothing(timeout=0.3)
    finally:
        await ws.disconnect()


async def test_a_removed_member_cannot_replay_the_log(personas):
    ws = await events_socket(personas.viewer)
    try:
        await new_task(personas, "before")
        await ws.receive_json_from(timeout=5)
        await db(
            lambda: personas.group.memberships.filter(user=personas.viewer).delete()
        )()  # removed without an event reaching this socket
        await ws.send_json_to({"type": "resume", "after": 0})
        assert await closed_with(ws) == 4403
    finally:
        await ws.disconnect()


async def test_a_resume_beyond_64_bits_is_refused(personas):
    ws = await events_socket(personas.viewer)
    try:
        await ws.send_json_to({"type": "resume", "after": 2**64})
        frame = await ws.receive_json_from(timeout=5)
        assert frame["code"] == "bad_after"
    finally:
        await ws.disconnect()
