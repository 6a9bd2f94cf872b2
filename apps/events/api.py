"""The group's event log: gap-free by seq, so a client resumes with ?after=<last seq>."""

from datetime import datetime
from typing import Any

from django.http import HttpRequest
from ninja import Field, Query, Router, Schema

from apps.events.selectors import events_since
from apps.groups.selectors import group_get_for_user
from claw.schema import NonNegative

router = Router()


class EventQuery(Schema):
    after: NonNegative = Field(0, description="Return events with seq greater than this.")
    limit: int = Field(100, ge=1, le=500)


class EventRefs(Schema):
    task_id: int | None
    attempt_id: int | None
    agent_id: int | None
    actor_id: int | None


class EventOut(Schema):
    seq: int
    kind: str
    refs: EventRefs
    payload: dict[str, Any]
    created_at: datetime

    @staticmethod
    def resolve_refs(obj) -> dict:
        return {
            "task_id": obj.task_id,
            "attempt_id": obj.attempt_id,
            "agent_id": obj.agent_id,
            "actor_id": obj.actor_id,
        }


class EventPage(Schema):
    items: list[EventOut]
    next_after: int = Field(description="Pass as ?after= to get the events that follow.")


@router.get("/groups/{slug}/events", response=EventPage)
def event_list(request: HttpRequest, slug: str, query: Query[EventQuery]):
    group = group_get_for_user(user=request.auth, slug=slug)
    events = list(events_since(group_id=group.id, after=query.after, limit=query.limit))
    return {"items": events, "next_after": events[-1].seq if events else query.after}
