"""Browser socket for a group's live event stream (session auth, origin checked in asgi).

On connect the client may send {"type": "resume", "after": SEQ}; the consumer replays the
events after SEQ from the database, then streams new ones as the channel layer delivers
them. Each frame carries its seq, so a client can dedupe and resume after a reconnect.

Membership is checked again with every read of the log: a person removed from the group
gets nothing more and the socket closes with 4403, as /ws/live/ does."""

import json

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from apps.events.broadcast import group_channel
from apps.events.layer import LayerTolerant
from apps.events.models import Event
from apps.events.selectors import events_since
from apps.groups.models import Group
from apps.groups.selectors import membership_role

MAX_FRAME_BYTES = 4096
CLOSE_FORBIDDEN = 4403


def event_frame(event: Event) -> dict:
    return {
        "type": "event",
        "seq": event.seq,
        "kind": event.kind,
        "task_id": event.task_id,
        "attempt_id": event.attempt_id,
        "agent_id": event.agent_id,
        "payload": event.payload,
        "created_at": event.created_at.isoformat(),
    }


class GroupEventsConsumer(LayerTolerant, AsyncWebsocketConsumer):
    group_id: int | None = None
    # The highest seq sent (or the client's resume point): where a repair replays from.
    sent_seq: int | None = None

    async def connect(self) -> None:
        slug = self.scope["url_route"]["kwargs"]["slug"]
        self.group_id = await self._authorized_group_id(slug)
        # Accept before closing: a refused handshake reaches a browser as a bare 1006 and it
        # would retry forever; 4403 tells it not to.
        await self.accept()
        if self.group_id is None:
            await self.close(code=CLOSE_FORBIDDEN)
            return
        await self.layer_join(group_channel(self.group_id))

    async def disconnect(self, code: int) -> None:
        await self._leave()

    async def _leave(self) -> None:
        if self.group_id is not None:
            group_id, self.group_id = self.group_id, None
            await self.layer_leave(group_channel(group_id))

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if self.group_id is None:
            return
        if text_data is None or len(text_data) > MAX_FRAME_BYTES:
            await self._error(
                "bad_frame", f"Send JSON text frames of at most {MAX_FRAME_BYTES} bytes."
            )
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
        after = message.get("after", 0)
        if not isinstance(after, int) or isinstance(after, bool) or not 0 <= after < 2**63:
            await self._error("bad_after", "after must be a non-negative integer.")
            return
        self.sent_seq = max(self.sent_seq or 0, after)
        await self._send_frames(await self._frames_since(after))

    async def event_appended(self, message: dict) -> None:
        if self.group_id is None:
            return
        await self._send_frames(await self._frames_since(message["seq"] - 1, limit=1))

    async def events_appended(self, message: dict) -> None:
        """A batch (event_append_many): the events first_seq..last_seq, in order."""
        after, last = message["first_seq"] - 1, message["last_seq"]
        while after < last and self.group_id is not None:
            frames = await self._frames_since(after, limit=min(last - after, 500))
            if not await self._send_frames(frames):
                return
            if not frames:
                break
            after = frames[-1]["seq"]

    async def layer_restored(self) -> None:
        """Back from a channel-layer outage, whose messages were lost: the events after
        the last one sent, from the database (the client dedupes by seq)."""
        after = self.sent_seq
        while after is not None and self.group_id is not None:
            frames = await self._frames_since(after)
            if not await self._send_frames(frames):
                return
            after = frames[-1]["seq"] if len(frames) == 500 else None

    async def _send_frames(self, frames: list[dict] | None) -> bool:
        """Send what a read returned; None means access is gone: close, and say so."""
        if frames is None:
            await self._leave()
            await self.close(code=CLOSE_FORBIDDEN)
            return False
        for frame in frames:
            await self.send(text_data=json.dumps(frame))
            self.sent_seq = max(self.sent_seq or 0, frame["seq"])
        return True

    async def _error(self, code: str, text: str) -> None:
        await self.send(text_data=json.dumps({"type": "error", "code": code, "message": text}))

    @database_sync_to_async
    def _authorized_group_id(self, slug: str) -> int | None:
        user = self.scope.get("user")
        group = Group.objects.filter(slug=slug).values_list("id", flat=True).first()
        if group is None or user is None or membership_role(user=user, group_id=group) is None:
            return None
        return group

    @database_sync_to_async
    def _frames_since(self, after: int, limit: int = 500) -> list[dict] | None:
        """The events after `after`, or None when the user is no longer a member."""
        group_id = self.group_id
        if group_id is None or membership_role(user=self.scope["user"], group_id=group_id) is None:
            return None
        return [event_frame(e) for e in events_since(group_id=group_id, after=after, limit=limit)]
