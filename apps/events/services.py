from django.db import connection, transaction
from django.utils import timezone

from apps.events.broadcast import broadcast_on_commit, group_channel
from apps.events.models import Event, ProcessBeat


def _next_seq(group_id: int) -> int:
    # UPDATE … RETURNING (PostgreSQL, SQLite >= 3.35) locks the group's row until commit, so
    # writers in one group take numbers one at a time and a rollback gives the number back.
    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE groups_group SET event_seq = event_seq + 1 WHERE id = %s RETURNING event_seq",
            [group_id],
        )
        row = cursor.fetchone()
    if row is None:
        raise ValueError(f"group {group_id} does not exist")
    return row[0]


def event_append(
    *,
    group_id: int,
    kind: str,
    task_id: int | None = None,
    attempt_id: int | None = None,
    agent_id: int | None = None,
    actor_id: int | None = None,
    payload: dict | None = None,
) -> Event:
    """Append an event inside the caller's transaction and broadcast it after commit.

    Call it after the state change it records: every writer takes the group's row lock
    last, so lock order is the same everywhere.
    """
    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("event_append must run inside the transaction of the change")
    event = Event.objects.create(
        group_id=group_id,
        seq=_next_seq(group_id),
        kind=kind,
        task_id=task_id,
        attempt_id=attempt_id,
        agent_id=agent_id,
        actor_id=actor_id,
        payload=payload or {},
    )
    broadcast_on_commit(
        group_channel(group_id),
        {
            "type": "event.appended",
            "group_id": group_id,
            "seq": event.seq,
            "kind": kind,
            "task_id": task_id,
            "attempt_id": attempt_id,
            "agent_id": agent_id,
        },
    )
    return event


def process_beat_record(*, name: str) -> None:
    ProcessBeat.objects.update_or_create(name=name, defaults={"last_seen_at": timezone.now()})
