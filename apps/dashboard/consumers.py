"""The page socket (`/ws/live/`): keeps one dashboard page live. The contract it implements
is in apps.dashboard.live; in short: validate the query, wait for the page's resume, load
the page group's events after the seq it shows from the database, render at most once per
COALESCE_SECONDS, and send the fragments as one text frame.

It follows every group of the user's, so the navigation's approvals badge stays right
across groups; page fragments are rendered for the page's own group only, except for the
pages in CROSS_GROUP_PAGES (the approvals inbox, the groups list), which are redrawn when
something that changes them happens in any of the user's groups."""

import asyncio
import contextlib
import json
import logging
from urllib.parse import parse_qsl

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from apps.dashboard.live import (
    BADGE_KINDS,
    COALESCE_SECONDS,
    PAGE_FOLLOWS,
    PAGE_PARAMS,
    PAGES,
    RESYNC_AFTER,
    LiveContext,
)
from apps.events.broadcast import group_channel
from apps.events.layer import LayerTolerant
from apps.events.models import Event
from apps.groups.models import Group, Membership
from apps.groups.selectors import membership_role

logger = logging.getLogger(__name__)

MAX_FRAME_BYTES = 1024
MAX_QUERY_BYTES = 1024
MAX_PARAMS = 16
MAX_PARAM_CHARS = 100

CLOSE_BAD_REQUEST = 4400
CLOSE_FORBIDDEN = 4403

CROSS_GROUP_PAGES = frozenset({"approvals", "groups"})


def _parse_query(raw: bytes) -> tuple[str, str, dict[str, str]] | str:
    """(page, group slug, other params), or the problem as a string."""
    if len(raw) > MAX_QUERY_BYTES:
        return "query string too long"
    try:
        pairs = parse_qsl(
            raw.decode("ascii"),
            keep_blank_values=True,
            strict_parsing=bool(raw),
            max_num_fields=MAX_PARAMS,
        )
    except (UnicodeDecodeError, ValueError) as error:
        return f"bad query string: {error}"
    params: dict[str, str] = {}
    for key, value in pairs:
        if key in params:
            return f"{key} is given twice"
        if len(value) > MAX_PARAM_CHARS:
            return f"{key} is too long"
        params[key] = value
    page = params.pop("page", "")
    slug = params.pop("group", "")
    if page not in PAGES:
        return f"unknown page {page!r}"
    if not slug:
        return "group is required"
    for name in PAGE_PARAMS[page]:
        value = params.get(name, "")
        if not (value.isascii() and value.isdigit() and 0 < int(value) < 2**63):
            return f"{name} must be a positive integer id"
    return page, slug, params


class LivePageConsumer(LayerTolerant, AsyncWebsocketConsumer):
    page: str = ""
    group: Group | None = None
    group_ids: tuple[int, ...] = ()

    async def connect(self) -> None:
        self.flusher: asyncio.Task | None = None
        # Accept before closing: a refused handshake reaches a browser as a bare 1006, which
        # htmx's ws extension retries forever; 4400/4403 tell it not to.
        await self.accept()
        parsed = _parse_query(self.scope.get("query_string", b""))
        if isinstance(parsed, str):
            await self._error("bad_query", parsed)
            await self.close(code=CLOSE_BAD_REQUEST)
            return
        page, slug, params = parsed
        found = await self._membership(slug)
        if found is None:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.page, self.params = page, params
        self.group, self.role, self.group_ids = found
        # The seq the page has shown: unknown until its resume frame.
        self.after: int | None = None
        self.page_due = False
        self.badge_due = False
        self.redraw_due = False
        self.wake = asyncio.Event()
        for group_id in self.group_ids:
            await self.layer_join(group_channel(group_id))
        for channel_group in PAGE_FOLLOWS[page]:
            await self.layer_join(channel_group)
        self.flusher = asyncio.create_task(self._flush_loop())

    async def disconnect(self, code: int) -> None:
        if self.flusher is not None:
            self.flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.flusher
        for group_id in self.group_ids:
            await self.layer_leave(group_channel(group_id))
        for channel_group in PAGE_FOLLOWS.get(self.page, ()):
            await self.layer_leave(channel_group)

    # --- client frames ------------------------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.group is None:
            return
        if text_data is None:
            await self._error("bad_frame", "Send JSON text frames, not binary ones.")
            return
        if len(text_data) > MAX_FRAME_BYTES:
            await self._error("frame_too_large", f"Frames are at most {MAX_FRAME_BYTES} bytes.")
            return
        try:
            message = json.loads(text_data)
        except ValueError:
            await self._error("bad_json", "The frame is not valid JSON.")
            return
        if not isinstance(message, dict) or message.get("type") != "resume":
            await self._error(
                "unknown_type", 'The only client frame is {"type": "resume", "after": N}.'
            )
            return
        if set(message) - {"type", "after"}:
            await self._error("unknown_field", 'A resume frame has only "type" and "after".')
            return
        after = message.get("after")
        if not isinstance(after, int) or isinstance(after, bool) or not 0 <= after < 2**63:
            await self._error("bad_after", "after must be a non-negative integer.")
            return
        self.after = after
        # After a (re)connect anything may have changed elsewhere: the badge is recounted
        # and cross-group pages are redrawn; the page's own group is replayed from `after`.
        self.page_due = self.badge_due = True
        self.redraw_due = self.page in CROSS_GROUP_PAGES
        self.wake.set()

    # --- channel-layer messages (apps.events.services) ------------------------------------

    async def event_appended(self, message: dict) -> None:
        self._note(message["group_id"], message["seq"], message.get("kind", ""))

    async def events_appended(self, message: dict) -> None:
        # A batch names only its seq range; for other groups only checkpoint kinds matter,
        # and batches are matcher assignments.
        self._note(message["group_id"], message["last_seq"], "")

    async def live_redraw(self, message: dict) -> None:
        """Something a followed page shows changed outside the event log (PAGE_FOLLOWS)."""
        if self.group is None or self.after is None:
            return  # before the resume, the page is redrawn from its seq anyway
        self.redraw_due = True
        self.wake.set()

    async def layer_restored(self) -> None:
        """Back from a channel-layer outage, whose messages were lost: as after a resume,
        the page's group is replayed from its seq, the badge recounted and what the page
        follows outside the event log redrawn."""
        if self.group is None or self.after is None:
            return
        self.page_due = self.badge_due = True
        self.redraw_due = self.page in CROSS_GROUP_PAGES or bool(PAGE_FOLLOWS[self.page])
        self.wake.set()

    def _note(self, group_id: int, last_seq: int, kind: str) -> None:
        if self.group is None:
            return
        if group_id == self.group.id:
            if self.after is not None and last_seq > self.after:
                self.page_due = True
                self.wake.set()
        elif kind.startswith(BADGE_KINDS):
            self.badge_due = True
            self.redraw_due = self.redraw_due or self.page in CROSS_GROUP_PAGES
            self.wake.set()

    # --- rendering ----------------------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            await self.wake.wait()
            # Coalesce: whatever arrives in this window is rendered once.
            await asyncio.sleep(COALESCE_SECONDS)
            self.wake.clear()
            page_due, badge_due, redraw_due = self.page_due, self.badge_due, self.redraw_due
            self.page_due = self.badge_due = self.redraw_due = False
            try:
                result = await self._render(
                    after=self.after if page_due else None, badge=badge_due, redraw=redraw_due
                )
            except Exception:
                logger.exception("live page %s failed to render", self.page)
                continue
            if result is None:  # no longer a member
                await self.close(code=CLOSE_FORBIDDEN)
                return
            frame, new_after = result
            if new_after is not None and self.after is not None:
                self.after = max(self.after, new_after)
            if frame:
                try:
                    await self.send(text_data=frame)
                except Exception:  # the page closed its socket while we rendered
                    logger.debug("live page %s closed during a send", self.page, exc_info=True)
                    return

    @database_sync_to_async
    def _render(self, *, after: int | None, badge: bool, redraw: bool) -> tuple[str, int] | None:
        from apps.dashboard.model_views import BACKEND_KINDS, backend_banner_html
        from apps.dashboard.views import approvals_badge_html

        user, group = self.scope["user"], self.group
        role = membership_role(user=user, group_id=group.id)
        if role is None:
            return None
        renderer = PAGES[self.page]
        fragments: list[str] = []
        new_after = None
        rendered = False
        banner = False
        if after is not None:
            events = list(
                Event.objects.filter(group_id=group.id, seq__gt=after)
                .select_related("actor", "agent", "task")
                .order_by("seq")[: RESYNC_AFTER + 1]
            )
            resync = len(events) > RESYNC_AFTER
            if resync:
                # Too far behind: read the seq first, then redraw everything.
                new_after = Group.objects.filter(id=group.id).values_list("event_seq", flat=True)[0]
                events = []
            elif events:
                new_after = events[-1].seq
                badge = badge or any(e.kind.startswith(BADGE_KINDS) for e in events)
                banner = any(e.kind in BACKEND_KINDS for e in events)
            if resync or events or redraw:
                context = LiveContext(
                    user=user,
                    group=group,
                    role=role,
                    params=dict(self.params),
                    events=events,
                    resync=resync or (redraw and not events),
                )
                fragments += renderer(context)
                rendered = True
        if redraw and not rendered:
            fragments += renderer(
                LiveContext(
                    user=user, group=group, role=role, params=dict(self.params), resync=True
                )
            )
        if badge:
            fragments.append(approvals_badge_html(user=user))
        if banner:
            fragments.append(backend_banner_html())
        if new_after is not None:
            fragments.append(
                f'<span id="live-seq" data-seq="{int(new_after)}" hidden hx-swap-oob="true"></span>'
            )
        return "\n".join(fragments), new_after

    @database_sync_to_async
    def _membership(self, slug: str) -> tuple[Group, str, tuple[int, ...]] | None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            return None
        group = Group.objects.filter(slug=slug).first()
        if group is None:
            return None
        roles = dict(Membership.objects.filter(user_id=user.pk).values_list("group_id", "role"))
        if group.id not in roles:
            return None
        return group, roles[group.id], tuple(sorted(roles))

    async def _error(self, code: str, text: str) -> None:
        await self.send(text_data=json.dumps({"type": "error", "code": code, "message": text}))
