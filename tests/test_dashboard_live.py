"""The page socket (/ws/live/) through the real ASGI app with WebsocketCommunicator:
session auth and origin, who may connect, frame validation, resume replay, coalescing,
resync, and the approvals badge across groups."""

import json
import re
from contextlib import asynccontextmanager

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import transaction
from django.test import Client

from apps.checkpoints.services import checkpoint_raise
from apps.dashboard import consumers
from apps.dashboard.live import PAGES
from apps.groups.models import Group, Membership
from apps.tasks.services import task_create
from claw.asgi import application

pytestmark = pytest.mark.django_db(transaction=True)

db = database_sync_to_async


@db
def session_cookie(user) -> str:
    client = Client()
    client.force_login(user)
    return client.cookies["sessionid"].value


@db
def seq_of(group) -> int:
    return Group.objects.get(id=group.id).event_seq


@db
def new_tasks(personas, n: int = 1, *, group=None) -> None:
    with transaction.atomic():  # one commit: the broadcasts leave together, as a burst
        for i in range(n):
            group = group or personas.group
            owner = personas.owner if group.id == personas.group.id else personas.outsider
            task_create(group=group, actor=owner, title=f"T{i}")


@db
def raise_checkpoint(group, title: str = "Ship it?"):
    return checkpoint_raise(group=group, title=title, source="human")


def communicator(query: str, cookie: str | None = None, origin: str = "http://testserver"):
    headers = [(b"origin", origin.encode())]
    if cookie:
        headers.append((b"cookie", f"sessionid={cookie}".encode()))
    return WebsocketCommunicator(application, f"/ws/live/?{query}", headers=headers)


@asynccontextmanager
async def page_socket(user, query: str, *, resume: int | None = None):
    ws = communicator(query, await session_cookie(user))
    connected, _ = await ws.connect()
    assert connected
    try:
        if resume is not None:
            await ws.send_json_to({"type": "resume", "after": resume})
        yield ws
    finally:
        await ws.disconnect()


async def closed_with(ws) -> int:
    while True:
        output = await ws.receive_output(timeout=5)
        if output["type"] == "websocket.close":
            return output["code"]


def ids_in(frame: str) -> list[str]:
    return re.findall(r'<[a-z]+ id="([^"]+)"[^>]*hx-swap-oob="true"', frame)


def live_seq(frame: str) -> int:
    return int(re.search(r'id="live-seq" data-seq="(\d+)"', frame).group(1))


def badge_count(frame: str) -> int:
    return int(re.search(r'id="approvals-badge"[^>]*data-count="(\d+)"', frame).group(1))


# --- who may connect ----------------------------------------------------------------------


async def test_signed_out_sockets_are_closed_with_4403(personas):
    ws = communicator("page=overview&group=research")
    connected, _ = await ws.connect()
    assert connected  # accepted, then closed: browsers do not retry a 44xx close
    assert await closed_with(ws) == 4403
    await ws.disconnect()


async def test_outsiders_are_closed_with_4403_whether_or_not_the_group_exists(personas):
    cookie = await session_cookie(personas.outsider)
    for query in ("page=overview&group=research", "page=overview&group=nope"):
        ws = communicator(query, cookie)
        await ws.connect()
        assert await closed_with(ws) == 4403, query
        await ws.disconnect()


@pytest.mark.parametrize(
    "query",
    [
        "page=nope&group=research",
        "group=research",
        "page=overview",
        "page=overview&group=research&page=agents",
        "page=overview&group=research&" + "&".join(f"x{i}=1" for i in range(20)),
        "page=overview&group=" + "r" * 200,
        "page=task&group=research",
        "page=task&group=research&task=abc",
        "page=task&group=research&task=0",
    ],
)
async def test_bad_queries_are_closed_with_4400_and_say_why(personas, query):
    ws = communicator(query, await session_cookie(personas.member))
    await ws.connect()
    error = await ws.receive_json_from(timeout=5)
    assert error["type"] == "error" and error["code"] == "bad_query" and error["message"]
    assert await closed_with(ws) == 4400
    await ws.disconnect()


async def test_a_foreign_origin_is_refused(personas):
    ws = communicator(
        "page=overview&group=research",
        await session_cookie(personas.member),
        origin="https://evil.example",
    )
    connected, _ = await ws.connect()
    assert not connected
    await ws.disconnect()


# --- frames -------------------------------------------------------------------------------


async def test_malformed_frames_get_error_frames_and_the_socket_stays_open(personas):
    async with page_socket(personas.member, "page=overview&group=research") as ws:
        cases = [
            ({"bytes_data": b"\x00\x01"}, "bad_frame"),
            ({"text_data": "x" * 5000}, "frame_too_large"),
            ({"text_data": "{not json"}, "bad_json"),
            ({"text_data": "[1, 2]"}, "unknown_type"),
            ({"text_data": json.dumps({"type": "subscribe"})}, "unknown_type"),
            ({"text_data": json.dumps({"type": "resume", "after": -1})}, "bad_after"),
            ({"text_data": json.dumps({"type": "resume", "after": "3"})}, "bad_after"),
            ({"text_data": json.dumps({"type": "resume", "after": True})}, "bad_after"),
            ({"text_data": json.dumps({"type": "resume"})}, "bad_after"),
            ({"text_data": json.dumps({"type": "resume", "after": 1, "x": 1})}, "unknown_field"),
        ]
        for frame, code in cases:
            await ws.send_to(**frame)
            error = await ws.receive_json_from(timeout=5)
            assert (error["type"], error["code"]) == ("error", code), frame
            assert error["message"]
        # Still serving: a valid resume works after all that.
        await ws.send_json_to({"type": "resume", "after": await seq_of(personas.group)})
        assert ids_in(await ws.receive_from(timeout=5)) == ["approvals-badge"]
        await new_tasks(personas)
        assert "overview-stats" in ids_in(await ws.receive_from(timeout=5))


# --- resume, coalescing, resync -----------------------------------------------------------


async def test_resume_replays_what_happened_since_the_page_was_rendered(personas):
    rendered_at = await seq_of(personas.group)
    await new_tasks(personas, 2)  # while the page was loading
    async with page_socket(
        personas.viewer, "page=overview&group=research", resume=rendered_at
    ) as ws:
        frame = await ws.receive_from(timeout=5)
        assert ids_in(frame)[:3] == ["overview-stats", "throughput", "recent-events"]
        assert live_seq(frame) == await seq_of(personas.group)
        assert 'id="count-ready"' in frame and '<span class="n">2</span>' in frame
        assert await ws.receive_nothing(timeout=0.3)


async def test_an_up_to_date_page_gets_nothing_on_resume_but_the_badge(personas):
    async with page_socket(
        personas.viewer, "page=overview&group=research", resume=await seq_of(personas.group)
    ) as ws:
        frame = await ws.receive_from(timeout=5)
        assert ids_in(frame) == ["approvals-badge"]
        assert await ws.receive_nothing(timeout=0.3)


async def test_a_burst_of_events_arrives_as_one_frame(personas):
    async with page_socket(
        personas.viewer, "page=overview&group=research", resume=await seq_of(personas.group)
    ) as ws:
        await ws.receive_from(timeout=5)  # the badge, on resume
        await new_tasks(personas, 20)
        frame = await ws.receive_from(timeout=5)
        assert ids_in(frame) == ["overview-stats", "throughput", "recent-events", "live-seq"]
        assert live_seq(frame) == await seq_of(personas.group)
        assert '<span class="n">20</span>' in frame
        assert await ws.receive_nothing(timeout=0.5)


async def test_a_page_too_far_behind_is_redrawn_from_scratch(personas, monkeypatch):
    calls = []
    real = PAGES["overview"]

    def spy(ctx):
        calls.append((len(ctx.events), ctx.resync))
        return real(ctx)

    monkeypatch.setitem(PAGES, "overview", spy)
    monkeypatch.setattr(consumers, "RESYNC_AFTER", 3)
    start = await seq_of(personas.group)
    await new_tasks(personas, 5)
    async with page_socket(personas.viewer, "page=overview&group=research", resume=start) as ws:
        frame = await ws.receive_from(timeout=5)
        assert calls == [(0, True)]
        assert live_seq(frame) == await seq_of(personas.group)
        await new_tasks(personas, 2)
        await ws.receive_from(timeout=5)
        assert calls[1] == (2, False)


async def test_events_before_the_resume_are_not_lost(personas):
    rendered_at = await seq_of(personas.group)
    async with page_socket(personas.viewer, "page=overview&group=research") as ws:
        await new_tasks(personas)  # before the page said where it is: nothing yet
        assert await ws.receive_nothing(timeout=0.3)
        await ws.send_json_to({"type": "resume", "after": rendered_at})
        frame = await ws.receive_from(timeout=5)
        assert "overview-stats" in ids_in(frame)


async def test_agents_page_fragments_follow_agent_and_task_events(personas):
    async with page_socket(
        personas.viewer, "page=agents&group=research", resume=await seq_of(personas.group)
    ) as ws:
        await ws.receive_from(timeout=5)  # badge
        await new_tasks(personas)
        frame = await ws.receive_from(timeout=5)
        assert ids_in(frame) == ["agents", "devices", "live-seq"]
        assert f'id="agent-{personas.agent.id}"' in frame


async def test_other_groups_events_do_not_redraw_the_page(personas):
    Membership_create = db(Membership.objects.create)
    await Membership_create(group=personas.other_group, user=personas.viewer, role="viewer")
    async with page_socket(
        personas.viewer, "page=overview&group=research", resume=await seq_of(personas.group)
    ) as ws:
        await ws.receive_from(timeout=5)
        await new_tasks(personas, group=personas.other_group)
        assert await ws.receive_nothing(timeout=0.4)


# --- the approvals badge and inbox --------------------------------------------------------


async def test_a_raised_checkpoint_updates_the_badge(personas):
    async with page_socket(
        personas.approver, "page=overview&group=research", resume=await seq_of(personas.group)
    ) as ws:
        assert badge_count(await ws.receive_from(timeout=5)) == 0
        await raise_checkpoint(personas.group)
        frame = await ws.receive_from(timeout=5)
        assert badge_count(frame) == 1 and "overview-stats" in ids_in(frame)


async def test_the_badge_follows_checkpoints_in_the_users_other_groups(personas):
    await db(Membership.objects.create)(
        group=personas.other_group, user=personas.approver, role="approver"
    )
    async with page_socket(
        personas.approver, "page=overview&group=research", resume=await seq_of(personas.group)
    ) as ws:
        await ws.receive_from(timeout=5)
        await raise_checkpoint(personas.other_group, "Elsewhere?")
        frame = await ws.receive_from(timeout=5)
        assert ids_in(frame) == ["approvals-badge"]  # no overview fragments for another group
        assert badge_count(frame) == 1


async def test_the_inbox_is_redrawn_for_checkpoints_in_any_group(personas):
    await db(Membership.objects.create)(
        group=personas.other_group, user=personas.approver, role="approver"
    )
    async with page_socket(
        personas.approver, "page=approvals&group=research", resume=await seq_of(personas.group)
    ) as ws:
        first = await ws.receive_from(timeout=5)  # on resume: the inbox and the badge
        assert set(ids_in(first)) >= {"approvals", "approvals-badge"}
        checkpoint = await raise_checkpoint(personas.other_group, "Elsewhere?")
        frame = await ws.receive_from(timeout=5)
        assert f'id="checkpoint-{checkpoint.id}"' in frame and badge_count(frame) == 1


async def test_a_viewer_never_sees_the_badge_count_rise(personas):
    async with page_socket(
        personas.viewer, "page=overview&group=research", resume=await seq_of(personas.group)
    ) as ws:
        await ws.receive_from(timeout=5)
        await raise_checkpoint(personas.group)
        assert badge_count(await ws.receive_from(timeout=5)) == 0


async def test_a_removed_member_is_disconnected_at_the_next_change(personas):
    async with page_socket(
        personas.viewer, "page=overview&group=research", resume=await seq_of(personas.group)
    ) as ws:
        await ws.receive_from(timeout=5)
        await db(Membership.objects.filter(user=personas.viewer, group=personas.group).delete)()
        await new_tasks(personas)
        assert await closed_with(ws) == 4403
